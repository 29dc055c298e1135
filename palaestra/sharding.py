"""Sharded data parallelism (``train.strategy=fsdp``): each process holds 1/N of the model's parameters, their
gradients and their optimizer state, on PyTorch's FSDP2 (``fully_shard``).

Each decoder layer is one group, whose weights are gathered just before it runs and dropped after; the
rest (embeddings, final norm, LM head) is the root's group, gathered from the forward to the backward, so
that a chunked LM head after the model's forward finds it (see
:func:`palaestra.models.logprobs.final_hidden_states`). The gradients are summed over the processes (a
reduce-scatter: each keeps the sum of its own slice), as
:meth:`palaestra.distributed.Distributed.sum_gradients` sums them under DDP, so a recipe's loss scaling
makes the same update under both strategies. Where the compute precision is bf16 and the weights are fp32,
a mixed-precision policy gathers the weights in bf16 and reduces the gradients in fp32.

Every forward and backward of a sharded model is a collective: every process must make the same number of
them. What a process runs alone (generation, whose lengths differ between processes; evaluation of an
uneven block) runs inside :func:`full_weights`, where every group is gathered once and the forwards talk
to nobody; a process with fewer training micro-batches than another adds :func:`idle_pass` es.

Checkpoints of a sharded model are written by every process through ``torch.distributed.checkpoint``
(:func:`palaestra.checkpoint.save_sharded_checkpoint`) and load with any number of processes.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from palaestra.config.errors import ConfigError
from palaestra.distributed import Distributed

__all__ = ["full_state_dict", "full_weights", "idle_forward", "idle_pass", "is_sharded", "lockstep_passes", "shard_model",
           "whole_model"]

_GROUPS = "_palaestra_fsdp_groups"
"""The attribute of a sharded model listing its FSDP groups and whether each drops its weights after a forward."""


def decoder_layers(model) -> list[torch.nn.Module]:
    """The decoder layers of a causal LM (through a peft wrapper): the units FSDP gathers one at a time."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        body = base.get_decoder()
    except (AttributeError, NotImplementedError):
        return []
    layers = getattr(body, "layers", None)
    return list(layers) if isinstance(layers, torch.nn.ModuleList) else []


def shard_model(model, dist: Distributed, *, precision: str, cpu_offload: bool = False):
    """Shard ``model`` in place over ``dist``'s processes (see the module docstring) and return it.

    ``precision``: the run's compute precision (bf16 with fp32 weights: a bf16 mixed-precision policy).
    ``cpu_offload``: keep the shards, their gradients and the optimizer state in CPU memory (GPU runs).
    A model whose decoder layers cannot be found is a ConfigError.
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard

    layers = decoder_layers(model)
    if not layers:
        raise ConfigError(f"train.strategy=fsdp shards a causal LM's decoder layers, and {type(model).__name__} has no "
                          "`layers` list under its decoder; train it with train.strategy=ddp")
    options = {}
    weights_dtypes = {p.dtype for p in model.parameters()}
    if precision == "bf16" and weights_dtypes == {torch.float32}:
        options["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if cpu_offload:
        options["offload_policy"] = CPUOffloadPolicy()
    groups = []
    for layer in layers:
        fully_shard(layer, **options)
        groups.append((layer, True))
    fully_shard(model, **options)  # the root keeps its weights gathered from the forward to the backward
    groups.append((model, False))
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_force_sum_reduction_for_comms(True)  # gloo has no pre-multiplied sum
            module.set_gradient_divide_factor(1.0)  # summed, not averaged: the recipes scale their losses
    object.__setattr__(model, _GROUPS, groups)
    # one forward through the model sets FSDP up (the root, its groups' order) before anything gathers a group by
    # hand (full_weights); then every group drops its gathered weights, so that the parameters are the shards again
    was_training = model.training
    model.eval()  # no dropout: the set-up draws nothing from the random streams
    idle_forward(model)
    model.train(was_training)
    for module, _ in groups:
        module.reshard()
    return model


def is_sharded(model) -> bool:
    """True for a model :func:`shard_model` sharded."""
    return getattr(model, _GROUPS, None) is not None


def _device(model) -> torch.device:
    parameter = next(model.parameters())
    return parameter.device if not hasattr(parameter, "device_mesh") else torch.device(parameter.device_mesh.device_type)


@contextmanager
def full_weights(model):
    """Every group of a sharded model gathered on every process for the block, whose forwards then talk to
    nobody: generation, evaluation, anything a process runs alone. Every process enters together; the weights
    are dropped again after. A model that is not sharded is left as it is."""
    groups = getattr(model, _GROUPS, None)
    if groups is None:
        yield model
        return
    for module, _ in groups:
        module.unshard()
        module.set_reshard_after_forward(False)
    try:
        yield model
    finally:
        for module, reshard in groups:
            module.set_reshard_after_forward(reshard)
            module.reshard()


def lockstep_passes(model, passes: int, dist: Distributed) -> int:
    """How many :func:`idle_pass` es this process adds to its ``passes`` forward-backward passes so that every
    process of a sharded model makes as many as the busiest one (0 when the model is not sharded). Every process
    asks before its first pass (the question is itself a collective)."""
    if not is_sharded(model) or not dist.enabled:
        return 0
    counts = dist.gather(torch.tensor([passes], device=_device(model)))
    return int(counts.max()) - passes


def idle_pass(model) -> None:
    """A forward and backward of one token whose loss is multiplied by 0: the collectives of a pass, no gradient."""
    output = model(input_ids=torch.zeros((1, 1), dtype=torch.long, device=_device(model)))
    (output.logits.float().sum() * 0.0).backward()


@torch.no_grad()
def idle_forward(model) -> None:
    """A forward of one token without gradients: the collectives of a reference pass."""
    model(input_ids=torch.zeros((1, 1), dtype=torch.long, device=_device(model)))


def full_state_dict(model) -> dict[str, torch.Tensor]:
    """A sharded model's whole state dict on the CPU of the main process (an empty dict on the others); every
    process calls it together."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def whole_model(model, build):
    """The model to export: ``model`` itself when it is not sharded; when it is, ``build()`` (a fresh, unsharded
    model of the same shape) with the gathered weights on the main process and None on the others. Every
    process calls it together."""
    if not is_sharded(model):
        return model
    state = full_state_dict(model)
    if not state:
        return None
    whole = build()
    whole.load_state_dict(state)
    return whole
