"""palaestra's own decode loop: sample completions token by token from a prefilled key/value cache.

Why not ``model.generate``: on a CPU a small model's decode step is dominated by per-call overhead,
and ``generate`` adds its own on top of the forward (input preparation, a logits-processor chain,
stopping criteria, a growing attention mask). This loop does only what sampling needs:

1. one forward of one new token per live row, with a preallocated attention mask sliced per step
   (for Llama-family models the lean fused step of :mod:`palaestra.rollout.fast_llama`, for any
   other model the Hugging Face forward);
2. temperature, top-k and top-p applied to the last logits only, then one inverse-CDF draw per row
   (:func:`sample_next`, which the serving engine uses too, one row at a time);
3. rows that produced a stop token leave the batch (their cache rows are dropped), so the last
   long completion does not drag the finished ones through every remaining step.

Greedy decoding gives exactly ``generate``'s tokens (tested); sampling draws from the same
distribution (temperature, top-k, top-p as Hugging Face defines them).
"""

from __future__ import annotations

import torch

__all__ = ["HFDecodeState", "StopStrings", "decode", "draw", "filtered_logits", "sample_next"]


def sample_next(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, greedy: bool,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token per row from last-position logits [B, V]: greedy argmax, or a sample.

    Sampling: :func:`filtered_logits` (logits / temperature, then top-k and top-p), renormalised,
    one :func:`draw` per row from ``generator`` (default: torch's global one). The rollouts call it
    once for the whole batch; the serving engine runs the same two steps per row itself, with the
    row's own settings and generator (keeping the filtered scores for its processed log-probs).

    >>> sample_next(torch.tensor([[0.0, 3.0, 1.0]]), 1.0, 0, 1.0, greedy=True).tolist()
    [1]
    >>> _ = torch.manual_seed(0)
    >>> sample_next(torch.tensor([[0.0, 3.0, 1.0]]), 1.0, 1, 1.0, greedy=False).tolist()  # top-1 is greedy
    [1]
    """
    if greedy:
        return logits.argmax(dim=-1)
    return draw(filtered_logits(logits, temperature, top_k, top_p).softmax(dim=-1), generator)


def filtered_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """The scores [B, V] (float32) that sampling draws from: logits / temperature, then -inf outside
    the top_k largest (0: all) and outside the smallest set whose probability reaches top_p (1.0: all),
    as Hugging Face defines them. The one place where both are written.

    >>> probs = torch.tensor([[0.5, 0.3, 0.2]])
    >>> [round(p, 4) for p in filtered_logits(probs.log(), top_p=0.6).softmax(dim=-1)[0].tolist()]  # 0.5 is short of 0.6
    [0.625, 0.375, 0.0]
    >>> filtered_logits(probs.log(), top_k=1).isinf().tolist()
    [[False, True, True]]
    """
    scores = logits.float() / temperature
    if top_k and top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True, dim=-1)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        # drop a token when the tokens before it already reach top_p (the first one always stays)
        drop_sorted = (cumulative - sorted_scores.softmax(dim=-1)) >= top_p
        scores = scores.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    return scores


def draw(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One index per row of ``probs`` [B, V], drawn by inverse CDF: one uniform number per row.

    ``torch.multinomial`` on a CPU draws a random number per vocabulary entry, which for a large
    vocabulary cost as much as the decode step itself in a profile; a cumulative sum and a binary
    search need one. A zero-probability entry is never drawn. ``generator``: the random source
    (default: torch's global one).

    >>> _ = torch.manual_seed(0)
    >>> picks = draw(torch.tensor([[0.1, 0.0, 0.6, 0.3]]).repeat(20000, 1))
    >>> [round(share, 1) for share in (torch.bincount(picks, minlength=4) / 20000).tolist()]
    [0.1, 0.0, 0.6, 0.3]
    """
    cumulative = probs.double().cumsum(dim=-1)  # float64: no rounding drift over a large vocabulary
    targets = torch.rand(probs.shape[0], 1, dtype=torch.float64, device=probs.device, generator=generator) * cumulative[:, -1:]
    return torch.searchsorted(cumulative, targets, right=True).squeeze(1).clamp(max=probs.shape[1] - 1)


class HFDecodeState:
    """One decode step through the Hugging Face forward and its key/value cache object."""

    def __init__(self, model, cache):
        self.model, self.cache = model, cache

    def step(self, tokens: torch.Tensor, positions: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Logits [b, V] for one new token per row (``attention_mask``: [b, slots so far + 1])."""
        return self.model(
            input_ids=tokens.unsqueeze(1), attention_mask=attention_mask, position_ids=positions.unsqueeze(1),
            past_key_values=self.cache, use_cache=True,
        ).logits[:, -1]

    def keep_rows(self, keep: torch.Tensor) -> None:
        """Drop finished rows from the cache."""
        self.cache.batch_select_indices(keep)


class StopStrings:
    """Texts that end a completion as a stop token does (a tool call's closing tag): what :func:`decode` checks.

    Checking every row's decoded text at every step would cost a detokenisation per token; instead
    only the rows whose new token's text holds a stop string's last character (the *trigger* tokens,
    found once over the vocabulary) decode their last few tokens and look for the string.

    >>> from palaestra.models.loading import build_tiny_model
    >>> _, tokenizer = build_tiny_model()
    >>> stops = StopStrings(tokenizer, ["</call>"])
    >>> ids = tokenizer("<call>x</call> more", add_special_tokens=False)["input_ids"]
    >>> stops.end(ids)  # the tokens up to and including the string's end
    14
    >>> stops.end(ids[:13]) is None
    True
    """

    def __init__(self, tokenizer, strings: list[str], window: int = 24):
        self.tokenizer, self.strings, self.window = tokenizer, [s for s in strings if s], window
        last = {s[-1] for s in self.strings}
        texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))], skip_special_tokens=True)
        self.trigger_ids = frozenset(i for i, text in enumerate(texts) if any(ch in text for ch in last))
        self.triggers = torch.tensor(sorted(self.trigger_ids), dtype=torch.long)

    def hit(self, ids: list[int]) -> bool:
        """Whether the text of ``ids`` ends in (its last token completes) one of the strings."""
        tail = self.tokenizer.decode(ids[-self.window:], skip_special_tokens=True)  # text: special tokens are not
        last = self.tokenizer.decode(ids[-1:], skip_special_tokens=True)
        return any(s in tail and s not in tail[: len(tail) - len(last)] for s in self.strings)

    def end(self, ids: list[int]) -> int | None:
        """The length of the shortest prefix of ``ids`` whose text holds a stop string, or None."""
        for length in range(1, len(ids) + 1):
            if ids[length - 1] in self.trigger_ids and self.hit(ids[:length]):
                return length
        return None


@torch.no_grad()
def decode(
    state,
    first_logits: torch.Tensor,
    prompt_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    stop_ids: list[int],
    pad_id: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    greedy: bool = False,
    stop_strings: StopStrings | None = None,
    with_logprobs: bool = False,
):
    """Completion tokens [B, C <= max_new_tokens], right-padded with ``pad_id`` after each row's stop token.

    ``stop_strings``: texts that end a row too (the row stops at the token that completes one).
    ``with_logprobs``: return ``(tokens, logprobs)``, ``logprobs`` [B, C] the log-prob of each sampled token under
    the scores it was drawn from (:func:`filtered_logits`: logits / temperature, top-k, top-p; greedy: the logits;
    0 on padding), as a rollout engine reports them for the mismatch correction.

    Args:
        state: what runs one decode step over the prompts' key/value cache (B rows, one per
            completion): an :class:`HFDecodeState`, or the lean
            :class:`~palaestra.rollout.fast_llama.LlamaDecodeState`; it has ``step(tokens,
            positions, attention_mask) -> logits`` and ``keep_rows(indices)``.
        first_logits: [B, V] logits at each prompt's last token (they predict completion token 0).
        prompt_mask: [B, P] 1 on real (left-padded) prompt tokens, as in the cache.
    """
    device = first_logits.device
    batch, prompt_width = prompt_mask.shape
    out = torch.full((batch, max_new_tokens), pad_id, dtype=torch.long)
    logprobs = torch.zeros((batch, max_new_tokens)) if with_logprobs else None
    stops = torch.tensor(stop_ids, device=device)
    live = torch.arange(batch, device=device)  # original row of each row still decoding
    mask = torch.cat([prompt_mask.to(device), torch.ones(batch, max_new_tokens, dtype=prompt_mask.dtype, device=device)], dim=1)
    positions = prompt_mask.sum(dim=1).to(device)  # position id of completion token 0 of each row
    logits = first_logits
    step = 0
    for step in range(max_new_tokens):
        if logprobs is None:
            tokens = sample_next(logits, temperature, top_k, top_p, greedy)
        else:  # the same draw as sample_next, its scores kept
            scores = logits.float() if greedy else filtered_logits(logits, temperature, top_k, top_p)
            tokens = scores.argmax(dim=-1) if greedy else draw(scores.softmax(dim=-1))
            logprobs[live.cpu(), step] = scores.log_softmax(dim=-1).gather(1, tokens.unsqueeze(1)).squeeze(1).cpu()
        out[live.cpu(), step] = tokens.cpu()
        finished = torch.isin(tokens, stops)
        if stop_strings is not None:
            for index in (torch.isin(tokens.cpu(), stop_strings.triggers) & ~finished.cpu()).nonzero().flatten().tolist():
                row = int(live[index])
                finished[index] = stop_strings.hit(out[row, : step + 1].tolist())
        if step == max_new_tokens - 1 or bool(finished.all()):
            break
        if bool(finished.any()):  # finished rows leave the batch, cache rows included
            keep = (~finished).nonzero().squeeze(1)
            state.keep_rows(keep)
            live, tokens, mask, positions = live[keep], tokens[keep], mask[keep], positions[keep]
        logits = state.step(tokens, positions + step, mask[:, : prompt_width + step + 1])
    if logprobs is not None:
        return out[:, : step + 1], logprobs[:, : step + 1]
    return out[:, : step + 1]  # as wide as the longest completion
