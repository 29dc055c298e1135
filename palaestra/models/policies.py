"""Trainable policies for teams of agents: shared, per-role adapters over one base, or separate models.

- ``shared``: one model with one LoRA adapter; every role uses it (roles differ by prompt).
- ``per_role``: one base model with one LoRA adapter per role; the adapter is switched per agent
  for generation and training, so each adapter learns only from its own role's answers. The base
  weights exist once in memory.
- ``separate``: one model per role (different bases allowed), each with its own adapter.

Each policy has its own optimizer and scheduler and is saved as its own checkpoint part.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from palaestra.checkpoint import CheckpointPart
from palaestra.config.choices import POLICY_MODES
from palaestra.models.loading import load_model_and_tokenizer
from palaestra.models.lora import apply_lora
from palaestra.rollout.hf import HFGenerator


@dataclass
class Policy:
    """A trainable policy serving one or more roles."""

    name: str
    roles: tuple[str, ...]
    model: Any
    tokenizer: Any
    adapter: str | None  # the adapter to switch to before use (per_role), else None
    generator: HFGenerator
    optimizer: torch.optim.Optimizer | None = None
    scheduler: Any = None

    def activate(self) -> None:
        """Make this policy's adapter the active one (a no-op unless adapters are shared)."""
        if self.adapter is not None:
            self.model.set_adapter(self.adapter)

    def parameters(self) -> dict[str, torch.nn.Parameter]:
        """This policy's trainable weights, by name."""
        if self.adapter is not None:
            marker = f".{self.adapter}."
            return {n: p for n, p in self.model.named_parameters() if marker in n}
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def checkpoint_part(self) -> CheckpointPart:
        return CheckpointPart(self.parameters(), self.optimizer, self.scheduler)


def build_policies(
    mode: str, roles: tuple[str, ...], *, model_name: str, model_path: str | None, dtype: str, device: str,
    lora: dict | None, role_models: dict, max_prompt_length: int, precision: str, quantize: str = "none",
) -> tuple[dict[str, Policy], dict[str, str]]:
    """Policies by name and the role -> policy-name map.

    ``lora`` holds apply_lora's keyword arguments (r, alpha, dropout, target_modules), or None
    for full fine-tuning (not possible with ``per_role``). ``quantize``: the generators' rollout weights
    (``HFGenerator``'s: none or int8).
    """
    if mode not in POLICY_MODES:
        raise ValueError(f"policy mode {mode!r} is unknown; use one of {', '.join(POLICY_MODES)}")

    def make(name: str, served: tuple[str, ...], path: str | None, adapter_names=("default",)) -> tuple[Any, Any]:
        load_name = "hf" if path else model_name
        model, tokenizer = load_model_and_tokenizer(load_name, path=path or model_path, dtype=dtype, device=device)
        if lora is not None:
            model = apply_lora(model, adapter_names=adapter_names, **lora)
        model.train()
        return model, tokenizer

    if mode == "shared":
        model, tokenizer = make("shared", roles, None)
        generator = HFGenerator(model, tokenizer, max_prompt_length, precision, quantize=quantize)
        return {"shared": Policy("shared", roles, model, tokenizer, None, generator)}, {r: "shared" for r in roles}
    if mode == "per_role":
        if lora is None:
            raise ValueError("policy mode per_role needs LoRA (one adapter per role over one base)")
        model, tokenizer = make("per_role", roles, None, adapter_names=roles)
        generator = HFGenerator(model, tokenizer, max_prompt_length, precision, quantize=quantize)
        policies = {r: Policy(r, (r,), model, tokenizer, r, generator) for r in roles}
        return policies, {r: r for r in roles}
    policies = {}
    for role in roles:
        model, tokenizer = make(role, (role,), role_models.get(role) or None)
        policies[role] = Policy(role, (role,), model, tokenizer, None, HFGenerator(model, tokenizer, max_prompt_length, precision, quantize=quantize))
    return policies, {r: r for r in roles}


@contextmanager
def exact_sampling(policies: dict[str, Policy]):
    """``with exact_sampling(policies):`` every generator of the team samples at full precision (an evaluation;
    see ``HFGenerator.exact``)."""
    with ExitStack() as stack:
        for generator in {id(p.generator): p.generator for p in policies.values()}.values():
            if hasattr(generator, "exact"):
                stack.enter_context(generator.exact())
        yield


@contextmanager
def reusing_weights(policies: dict[str, Policy]):
    """``with reusing_weights(policies):`` every generator of the team reuses its packed weights
    across the block's generate calls (a rollout or an evaluation: the adapters change only in the
    training phase after it; see ``HFGenerator.reusing_weights``)."""
    with ExitStack() as stack:
        for generator in {id(p.generator): p.generator for p in policies.values()}.values():
            stack.enter_context(generator.reusing_weights())
        yield
