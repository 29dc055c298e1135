"""Per-token log-probabilities of completions under a causal LM (policy, old policy or reference)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from palaestra.algorithms.logprob_math import entropy_from_logits, selective_log_softmax
from palaestra.models.shapes import bucket_length
from palaestra.sharding import is_sharded


def head_logprobs(model, hidden: torch.Tensor, targets: torch.Tensor, *, temperature: float, chunk_tokens: int,
                  with_entropy: bool = False, entropy_gradient: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs [N] of ``targets`` [N] (and entropies [N], or None) from the final hidden states [N, H] of the
    positions that predict them: the LM head and the log-softmax over chunks of ``chunk_tokens`` positions,
    each chunk recomputed in the backward pass (``torch.utils.checkpoint``), so that the [N, V] logits never
    exist at once; the figures are those of the whole-matrix computation. ``entropy_gradient``: the entropies
    carry gradients too (an entropy bonus in the loss), computed in the same checkpointed chunk."""
    head = decoder_and_head(model)[1]

    def chunk_logprobs(states: torch.Tensor, chosen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = (head(states).float() / temperature).unsqueeze(0)
        logprobs = selective_log_softmax(logits, chosen.unsqueeze(0))[0]
        if not entropy_gradient:
            return logprobs, logprobs.new_empty(0)
        return logprobs, entropy_from_logits(logits)[0]

    logprobs, entropies = [], []
    for states, chosen in zip(hidden.split(chunk_tokens), targets.split(chunk_tokens)):
        if torch.is_grad_enabled():
            chunk, entropy = checkpoint(chunk_logprobs, states, chosen, use_reentrant=False)
        else:
            chunk, entropy = chunk_logprobs(states, chosen)
        logprobs.append(chunk)
        if with_entropy and not entropy_gradient:
            with torch.no_grad():
                entropy = entropy_from_logits((head(states).float() / temperature).unsqueeze(0))[0]
        entropies.append(entropy)
    return torch.cat(logprobs), (torch.cat(entropies) if with_entropy or entropy_gradient else None)


def decoder_and_head(model):
    """(the decoder body, the LM head) of a causal LM, through a peft wrapper."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder(), base.get_output_embeddings()


def final_hidden_states(model, **inputs) -> torch.Tensor:
    """The decoder's last hidden states [B, T, H] for ``inputs``, without the LM head: the decoder body's
    forward. A sharded model (``train.strategy=fsdp``) runs its own forward with the head passing its input
    through instead, so that its groups are gathered, and their gradients reduced, as in any forward."""
    body, head = decoder_and_head(model)
    if not is_sharded(model):
        return body(**inputs).last_hidden_state
    head.forward = _identity  # an instance attribute: the module's class and hooks stay as they are
    try:
        return model(**inputs).logits
    finally:
        del head.forward


def _identity(states: torch.Tensor) -> torch.Tensor:
    return states


def completion_logprobs(
    model,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
    chunk_tokens: int = 0,
    entropy_gradient: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs [B, C] of ``completion_ids`` given left-padded prompts, and optionally entropy [B, C]
    (``entropy_gradient``: with its gradient, for an entropy bonus in the loss).

    Logits are divided by the sampling temperature so the log-probs are those of the distribution
    the completions were drawn from. Only the last C + 1 positions go through the LM head
    (``logits_to_keep``): prompt positions never need a vocabulary projection. Position ids follow
    the attention mask, exactly as ``generate`` numbered the tokens under left padding.
    ``chunk_tokens`` > 0 runs the LM head over chunks of that many positions (:func:`head_logprobs`).
    """
    width = completion_ids.shape[1]
    device = next(model.parameters()).device
    inputs = padded_inputs(prompt_ids, prompt_mask, completion_ids, completion_mask, device)
    if chunk_tokens:
        kept = inputs.pop("logits_to_keep")
        hidden = final_hidden_states(model, **inputs, use_cache=False)[:, -kept:][:, :width]
        logprobs, entropy = head_logprobs(model, hidden.reshape(-1, hidden.shape[-1]), completion_ids.to(device).reshape(-1),
                                          temperature=temperature, chunk_tokens=chunk_tokens, with_entropy=with_entropy,
                                          entropy_gradient=entropy_gradient)
        return logprobs.view(completion_ids.shape), (entropy.view(completion_ids.shape) if entropy is not None else None)
    logits = model(**inputs, use_cache=False).logits[:, :width, :]
    logits = logits.float() / temperature
    logprobs = selective_log_softmax(logits, completion_ids.to(device))
    return logprobs, _entropy(logits, with_entropy, entropy_gradient)


def _entropy(logits: torch.Tensor, with_entropy: bool, entropy_gradient: bool) -> torch.Tensor | None:
    """The entropies of ``logits``' distributions: with their gradient, without, or None (neither asked)."""
    if entropy_gradient:
        return entropy_from_logits(logits)
    if not with_entropy:
        return None
    with torch.no_grad():
        return entropy_from_logits(logits.detach())


def padded_inputs(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, completion_ids: torch.Tensor,
                  completion_mask: torch.Tensor, device) -> dict[str, torch.Tensor | int]:
    """Model inputs for left-padded prompts [B, P] followed by right-padded completions [B, C].

    Both widths are padded further to bucketed lengths (a bounded set of matrix shapes, see
    :mod:`palaestra.models.shapes`), masked out. Position ids follow the attention mask, exactly as
    ``generate`` numbered the tokens under left padding. ``logits_to_keep`` keeps the positions from
    the prompt's last token on: the first C of them predict completion tokens 0 .. C-1.
    """
    prompt_pad = bucket_length(prompt_ids.shape[1]) - prompt_ids.shape[1]
    kept = bucket_length(completion_ids.shape[1] + 1)
    completion_pad = kept - completion_ids.shape[1] - 1
    filler = int(prompt_ids[0, -1])
    input_ids = F.pad(torch.cat([prompt_ids, completion_ids], dim=1), (prompt_pad, completion_pad), value=filler)
    attention_mask = F.pad(torch.cat([prompt_mask, completion_mask], dim=1), (prompt_pad, completion_pad), value=0)
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    return {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device),
            "position_ids": position_ids.to(device), "logits_to_keep": kept}


def grouped_completion_logprobs(
    model,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    group_size: int = 1,
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
    max_packed_tokens: int = 4096,
    chunk_tokens: int = 0,
    entropy_gradient: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`completion_logprobs` without padding, each shared prompt computed once.

    Shapes: prompt_ids/prompt_mask [B, P] (rows ``g*G .. g*G+G-1`` hold the same prompt; G = 1:
    every row its own), completion_ids/completion_mask [B, C]; returns [B, C], equal to
    :func:`completion_logprobs` where ``completion_mask`` is 1 and 0 elsewhere.

    The micro-batch becomes packed rows: each group's prompt once (its real tokens, no left
    padding), then the real tokens of each of its completions (no right padding). A 4D mask lets a
    completion token see its group's prompt and its own earlier tokens and nothing else, and
    position ids restart after the prompt for every completion, exactly as generation numbered
    them. The LM head runs only at the positions that predict a completion token. A group of G
    completions of mean length m under a longest completion M costs P + G*m tokens instead of
    G*(P + M): with a 150-token prompt, G = 4 and completions of 25 tokens under a 64-token cap,
    250 tokens instead of 856. Groups are packed together up to ``max_packed_tokens`` per
    row (the mask is quadratic in the row's length); larger micro-batches take several forwards.
    ``chunk_tokens`` > 0 runs the LM head over chunks of that many positions (:func:`head_logprobs`).
    """
    batch, width = completion_ids.shape
    if batch % group_size:
        raise ValueError(f"batch of {batch} rows is not a whole number of groups of {group_size}")
    lengths = completion_mask.sum(dim=1).tolist()
    scored = torch.arange(width).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)  # [B, C] real completion tokens
    if not torch.equal(scored, completion_mask.bool().cpu()):
        raise ValueError("completion_mask must cover a prefix of each row (tokens up to the end token)")
    prompts = [prompt_ids[g * group_size][prompt_mask[g * group_size].bool()] for g in range(batch // group_size)]
    chunks, current, size = [], [], 0  # consecutive groups whose packed row stays within max_packed_tokens
    for group, prompt in enumerate(prompts):
        group_tokens = len(prompt) + sum(int(n) for n in lengths[group * group_size : (group + 1) * group_size])
        if current and size + group_tokens > max_packed_tokens:
            chunks.append(current)
            current, size = [], 0
        current.append(group)
        size += group_tokens
    chunks.append(current)
    device = next(model.parameters()).device
    targets = completion_ids[scored].to(device)
    pieces = [_packed_row(model, prompts, completion_ids, lengths, group_size, chunk, device, hidden=bool(chunk_tokens))
              for chunk in chunks]
    if chunk_tokens:  # pieces are final hidden states [real completion tokens, H]
        scores, entropies = head_logprobs(model, torch.cat(pieces), targets, temperature=temperature,
                                          chunk_tokens=chunk_tokens, with_entropy=with_entropy, entropy_gradient=entropy_gradient)
    else:
        logits = torch.cat(pieces).float() / temperature  # [real completion tokens, V], row by row
        scores, entropies = selective_log_softmax(logits, targets), _entropy(logits, with_entropy, entropy_gradient)
    logprobs = torch.zeros(batch, width, device=device, dtype=scores.dtype).masked_scatter(scored.to(device), scores)
    if entropies is None:
        return logprobs, None
    return logprobs, torch.zeros(batch, width, device=device, dtype=entropies.dtype).masked_scatter(scored.to(device), entropies)


def _packed_row(model, prompts: list, completion_ids: torch.Tensor, lengths: list, group_size: int, groups: list[int],
                device, hidden: bool = False) -> torch.Tensor:
    """Logits [n, V] predicting every real completion token of ``groups`` (row by row), from one packed row
    (``hidden``: the final hidden states [n, H] there instead, for the LM head to run in chunks)."""
    tokens, positions, group_of, owners, sources = [], [], [], [], []
    offset = 0
    for group in groups:
        prompt = prompts[group]
        prompt_length = len(prompt)
        tokens.append(prompt)
        positions.append(torch.arange(prompt_length))
        group_of.append(torch.full((prompt_length,), group))
        owners.append(torch.full((prompt_length,), -1))  # prompt tokens belong to every completion of the group
        last_prompt_token = offset + prompt_length - 1
        offset += prompt_length
        for row in range(group * group_size, (group + 1) * group_size):
            length = int(lengths[row])
            tokens.append(completion_ids[row, :length])
            positions.append(torch.arange(prompt_length, prompt_length + length))
            group_of.append(torch.full((length,), group))
            owners.append(torch.full((length,), row))
            # token j is predicted at the position before it: the prompt's last token for j = 0
            sources.append(torch.cat([torch.tensor([last_prompt_token]), torch.arange(offset, offset + length - 1)])[:length])
            offset += length
    # Pad the row and the LM-head positions to bucketed lengths (a bounded set of matrix shapes; see
    # models.shapes): a padding token sees only itself and belongs to no group, so nothing real sees it.
    width = bucket_length(offset)
    tokens.append(torch.full((width - offset,), int(tokens[0][0])))
    positions.append(torch.zeros(width - offset, dtype=torch.long))
    group_of = torch.cat([*group_of, torch.arange(-2, -2 - (width - offset), -1)])
    owners = torch.cat([*owners, torch.full((width - offset,), -2)])
    sources = torch.cat(sources)
    predicted = len(sources)
    sources = torch.cat([sources, sources.new_full((bucket_length(predicted) - predicted,), width - 1)])
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    visible = causal & (group_of[:, None] == group_of[None, :]) & ((owners[None, :] == -1) | (owners[:, None] == owners[None, :]))
    mask_dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else next(model.parameters()).dtype
    mask = torch.zeros(width, width, dtype=mask_dtype).masked_fill(~visible, torch.finfo(mask_dtype).min)
    inputs = {"input_ids": torch.cat(tokens).unsqueeze(0).to(device), "attention_mask": mask[None, None].to(device),
              "position_ids": torch.cat(positions).unsqueeze(0).to(device), "use_cache": False}
    if hidden:
        return final_hidden_states(model, **inputs)[0, sources[:predicted].to(device)]
    return model(**inputs, logits_to_keep=sources.to(device)).logits[0, :predicted]


def batch_logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask, shared_rows: int, *,
                   temperature: float = 1.0, with_entropy: bool = False, chunk_tokens: int = 0,
                   entropy_gradient: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The recipes' choice: packed (:func:`grouped_completion_logprobs`, each run of ``shared_rows``
    rows sharing one prompt) when ``shared_rows`` >= 1, the plain padded forward when it is 0
    (see :func:`shared_prompt_rows`); ``chunk_tokens`` > 0: the LM head in chunks (:func:`head_logprobs`)."""
    batch = (prompt_ids, prompt_mask, completion_ids, completion_mask)
    options = {"temperature": temperature, "with_entropy": with_entropy, "chunk_tokens": chunk_tokens,
               "entropy_gradient": entropy_gradient}
    if shared_rows:
        return grouped_completion_logprobs(model, *batch, shared_rows, **options)
    return completion_logprobs(model, *batch, **options)


def shared_prompt_rows(micro_batch_size: int, group_size: int, enabled: bool = True) -> int:
    """How many consecutive rows of every micro-batch share one prompt (1: none; 0: packing disabled,
    the plain padded forward).

    >>> shared_prompt_rows(8, 4), shared_prompt_rows(2, 4), shared_prompt_rows(6, 4), shared_prompt_rows(8, 4, False)
    (4, 2, 1, 0)
    """
    if not enabled:
        return 0
    if micro_batch_size % group_size == 0:
        return group_size
    return micro_batch_size if group_size % micro_batch_size == 0 else 1
