"""A value head for PPO: one linear layer over the policy's last hidden state of each token.

The policy and the critic share the transformer trunk (as in InstructGPT and TRL's value-head
models): one forward pass of the (LoRA) policy with ``output_hidden_states=True`` gives both the
logits of the completion tokens and, from the same final hidden states, the value of every state
the policy acted from. Only the head itself (``hidden_size + 1`` weights) is new; the trunk's LoRA
adapter learns from both losses.

Alignment: completion token ``t`` is sampled from the state that ends at the token before it, so
its log-prob and its value V(s_t) both come from the hidden state one position to the left.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from palaestra.algorithms.logprob_math import entropy_from_logits, masked_mean, selective_log_softmax
from palaestra.models.logprobs import final_hidden_states, head_logprobs, padded_inputs

__all__ = ["ValueHead", "explained_variance", "logprobs_and_values"]

_WEIGHTS, _CONFIG = "value_head.safetensors", "value_head.json"


class ValueHead(nn.Module):
    """V(s) = w . h + b on the final hidden state h of each position; kept in float32.

    The weights start at zero, so every first estimate is 0: a neutral baseline that the value
    loss moves, and no draw from the random generator (runs stay reproducible).
    """

    def __init__(self, hidden_size: int):
        super().__init__()
        self.hidden_size = hidden_size
        self.linear = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    @classmethod
    def for_model(cls, model) -> "ValueHead":
        """A head sized for ``model``'s hidden states, on the model's device."""
        head = cls(model.config.hidden_size)
        return head.to(next(model.parameters()).device)

    def forward(self, hidden_states: Tensor) -> Tensor:
        """[B, T, H] hidden states (any float dtype) -> [B, T] float32 values."""
        # outside any bf16 autocast: value targets need more than bf16's 8 bits of mantissa
        with torch.autocast(device_type=hidden_states.device.type, enabled=False):
            return self.linear(hidden_states.to(self.linear.weight.dtype)).squeeze(-1)

    def save(self, folder: str | Path) -> Path:
        """Write the head to ``folder`` (weights and size), atomically; return the folder."""
        folder = Path(folder)
        tmp = folder.with_name(f".tmp-{folder.name}-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        state = {name: value.detach().to("cpu", copy=True).contiguous() for name, value in self.state_dict().items()}
        save_file(state, str(tmp / _WEIGHTS))
        (tmp / _CONFIG).write_text(json.dumps({"hidden_size": self.hidden_size}) + "\n")
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
        return folder

    @classmethod
    def load(cls, folder: str | Path, device: str | torch.device = "cpu") -> "ValueHead":
        """A head written by :meth:`save`."""
        folder = Path(folder)
        if not (folder / _CONFIG).is_file():
            raise FileNotFoundError(f"{folder} holds no value head ({_CONFIG} is missing)")
        head = cls(json.loads((folder / _CONFIG).read_text())["hidden_size"])
        head.load_state_dict(load_file(str(folder / _WEIGHTS)))
        return head.to(device)


def logprobs_and_values(
    model,
    value_head: ValueHead,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    completion_ids: Tensor,
    completion_mask: Tensor,
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
    chunk_tokens: int = 0,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """One forward of the policy: completion log-probs, values and (optionally) entropy.

    Args:
        model: a causal LM (a peft model or a plain one).
        value_head: the head reading the model's final hidden states.
        prompt_ids, prompt_mask: [B, P] left-padded prompts.
        completion_ids, completion_mask: [B, C] right-padded completions.
        temperature: the sampling temperature (log-probs are those of the sampling distribution).
        with_entropy: also return the per-token entropy (no gradient).
        chunk_tokens: > 0: the LM head over chunks of that many positions, each recomputed in the backward
            (:func:`palaestra.models.logprobs.head_logprobs`); the same figures.

    Returns:
        (logp [B, C] float32, values [B, C] float32, entropy [B, C] or None). ``values[:, t]`` is
        V of the state from which completion token t was sampled. Only the last C + 1 positions go
        through the LM head; position ids follow the attention mask, as ``generate`` numbered them.
    """
    device = next(model.parameters()).device
    width = completion_ids.shape[1]
    inputs = padded_inputs(prompt_ids, prompt_mask, completion_ids, completion_mask, device)
    if chunk_tokens:
        kept = inputs.pop("logits_to_keep")
        hidden = final_hidden_states(model, **inputs, use_cache=False)[:, -kept:][:, :width]
        logp, entropy = head_logprobs(model, hidden.reshape(-1, hidden.shape[-1]), completion_ids.to(device).reshape(-1),
                                      temperature=temperature, chunk_tokens=chunk_tokens, with_entropy=with_entropy)
        return (logp.view(completion_ids.shape), value_head(hidden),
                entropy.view(completion_ids.shape) if with_entropy else None)
    out = model(**inputs, output_hidden_states=True, use_cache=False)
    # the kept positions from the prompt's last token on: the first C predict completion tokens
    # 0 .. C-1 and are the states they were sampled from
    logits = out.logits[:, :width, :].float() / temperature
    kept = inputs["logits_to_keep"]
    values = value_head(out.hidden_states[-1][:, -kept : -kept + width, :])
    logp = selective_log_softmax(logits, completion_ids.to(device))
    entropy = None
    if with_entropy:
        with torch.no_grad():
            entropy = entropy_from_logits(logits.detach())
    return logp, values, entropy


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> float:
    """1 - Var(returns - values) / Var(returns) over the valid tokens; 1 is a perfect critic.

    Args:
        values: [B, T] the value head's estimates.
        returns: [B, T] the targets (GAE returns).
        mask: [B, T] 1 on tokens that count.

    Returns:
        A float; NaN when the returns do not vary.

    >>> explained_variance(torch.tensor([[1.0, 2.0, 9.0]]), torch.tensor([[1.0, 3.0, 0.0]]), torch.tensor([[1, 1, 0]]))
    0.75
    """
    # population variances over the valid tokens: returns [1, 3] -> 1; residuals [0, 1] -> 0.25
    mask = mask.to(returns.dtype)
    var_returns = masked_mean((returns - masked_mean(returns, mask)) ** 2, mask)
    residual = returns - values
    var_residual = masked_mean((residual - masked_mean(residual, mask)) ** 2, mask)
    if var_returns <= 0:
        return float("nan")
    return float(1.0 - var_residual / var_returns)
