"""LoRA adapters and the reference model they give for free.

With LoRA the reference policy (for KL penalties, DPO) is the same network with the adapter switched
off, so no second copy of the weights is needed: `reference_logits_context`. Full fine-tuning has no
adapter to switch off and needs a frozen copy: `frozen_reference_copy`. Checkpoints only need what
trains: `trainable_state_dict` / `load_trainable_state_dict`.
"""
from __future__ import annotations

import copy
import warnings
from contextlib import AbstractContextManager

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer


def apply_lora(
    model, *, r: int, alpha: int, dropout: float, target_modules: list[str] | str, adapter_names: tuple[str, ...] = ("default",)
) -> PeftModel:
    """Wrap ``model`` with fresh LoRA adapters; only the adapter weights stay trainable.

    ``target_modules`` lists module names (e.g. ``["q_proj", "v_proj"]``) or is ``"all-linear"``.
    The adapters start as a no-op (B = 0), so the wrapped model first computes exactly what
    ``model`` did. The base model is modified in place (its layers are wrapped). Several
    ``adapter_names`` give one adapter each over the one base (per-role policies); the first is
    active, ``model.set_adapter(name)`` switches.
    """
    targets = target_modules if isinstance(target_modules, str) else list(target_modules)
    config = LoraConfig(
        task_type="CAUSAL_LM", r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets
    )
    with warnings.catch_warnings():  # peft still asks transformers the deprecated v5 spelling
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        peft_model = get_peft_model(model, config, adapter_name=adapter_names[0])
        for name in adapter_names[1:]:
            peft_model.add_adapter(name, config)
    leave_input_dtype_to_autocast(peft_model)
    return peft_model


def leave_input_dtype_to_autocast(model) -> None:
    """LoRA layers of ``model`` stop copying their input to the adapter's dtype under autocast.

    peft casts an adapted layer's input to the adapter's dtype (fp32) before the adapter's first
    matrix; under bf16 autocast, which casts it straight back to a new bf16 tensor for the product,
    every adapted layer keeps its own copy of its input for the backward pass (the unit test counts
    the saved bytes; ``bench/grpo_vs_trl.py`` reports the peak memory). Outside autocast the input is
    still cast (a hook on the adapter's A matrix), so an fp32 forward over bf16 base weights keeps
    working.
    """
    for module in model.modules():
        if isinstance(module, LoraLayer) and hasattr(module, "cast_input_dtype_enabled"):
            module.cast_input_dtype_enabled = False
            for lora_a in module.lora_A.values():
                lora_a.register_forward_pre_hook(_cast_outside_autocast)


def _cast_outside_autocast(module, args):
    x = args[0]
    if x.dtype != module.weight.dtype and not torch.is_autocast_enabled(x.device.type):
        return (x.to(module.weight.dtype), *args[1:])
    return None


def reference_logits_context(model) -> AbstractContextManager:
    """Context in which ``model`` computes the reference policy: a PeftModel with its adapter off.

    Example: ``with torch.no_grad(), reference_logits_context(policy): ref = policy(ids).logits``.
    Raises ValueError for a model without adapters; use `frozen_reference_copy` for those.
    """
    if not isinstance(model, PeftModel):
        raise ValueError(
            f"reference_logits_context needs a LoRA (peft) model, got {type(model).__name__}; "
            "for full fine-tuning keep a frozen_reference_copy(model) as the reference instead"
        )
    return model.disable_adapter()


def frozen_reference_copy(model):
    """A deep copy of ``model`` in eval mode with no trainable parameters (full fine-tuning's reference)."""
    reference = copy.deepcopy(model)
    reference.eval()
    reference.requires_grad_(False)
    return reference


def trainable_state_dict(model) -> dict[str, torch.Tensor]:
    """The parameters that require grad, by name, detached and cloned to CPU."""
    return {
        name: param.detach().to("cpu", copy=True)
        for name, param in model.named_parameters()
        if param.requires_grad
    }


def load_trainable_state_dict(model, state: dict[str, torch.Tensor]) -> None:
    """Copy ``state`` (from `trainable_state_dict`) into the trainable parameters of ``model``.

    Strict: every trainable parameter must be in ``state`` with the same shape, and ``state`` must
    hold nothing else; a mismatch (e.g. another LoRA rank or target set) raises KeyError/ValueError.
    """
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    missing = sorted(set(params) - set(state))
    unexpected = sorted(set(state) - set(params))
    if missing or unexpected:
        raise KeyError(
            f"trainable state mismatch: {len(missing)} missing (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )
    with torch.no_grad():
        for name, param in params.items():
            value = state[name]
            if value.shape != param.shape:
                raise ValueError(f"shape mismatch for {name}: {tuple(value.shape)} vs {tuple(param.shape)}")
            param.copy_(value.to(device=param.device, dtype=param.dtype))


def count_parameters(model) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts (tied weights counted once)."""
    trainable = total = 0
    for param in model.parameters():
        total += param.numel()
        trainable += param.numel() if param.requires_grad else 0
    return trainable, total
