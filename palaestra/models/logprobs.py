"""Per-token log-probabilities of completions under a causal LM (policy, old policy or reference)."""

from __future__ import annotations

import torch

from palaestra.algorithms.grpo import entropy_from_logits, selective_log_softmax


def completion_logprobs(
    model,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs [B, C] of ``completion_ids`` given left-padded prompts, and optionally entropy [B, C].

    Logits are divided by the sampling temperature so the log-probs are those of the distribution
    the completions were drawn from. Only the last C + 1 positions go through the LM head
    (``logits_to_keep``): prompt positions never need a vocabulary projection. Position ids follow
    the attention mask, exactly as ``generate`` numbered the tokens under left padding.
    """
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    device = next(model.parameters()).device
    width = completion_ids.shape[1]
    logits = model(
        input_ids=input_ids.to(device),
        attention_mask=attention_mask.to(device),
        position_ids=position_ids.to(device),
        logits_to_keep=width + 1,
        use_cache=False,
    ).logits[:, :-1, :]
    logits = logits.float() / temperature
    logprobs = selective_log_softmax(logits, completion_ids.to(device))
    entropy = None
    if with_entropy:
        with torch.no_grad():
            entropy = entropy_from_logits(logits.detach())
    return logprobs, entropy
