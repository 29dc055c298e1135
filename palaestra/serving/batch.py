"""One running decode batch of a served model: rows join while it runs and leave when they finish.

Continuous batching needs what :func:`palaestra.rollout.decode.decode` does not: rows that *join* a
batch mid-flight. :class:`LeanBatch` keeps the decode state of
:mod:`palaestra.rollout.fast_llama` (weights packed once, adapters merged in) and manages the
key/value cache itself, so that it can grow:

* every row of the batch writes its next key/value into the same cache slot; rows are left-padded
  (masked slots) so that their last tokens line up, exactly as in a padded prompt batch, and each
  row keeps its own position ids (so padding never shifts the rotary positions);
* joining rows are prefilled on their own (one forward of their prompts), then both sides are
  left-padded to the wider of the two and concatenated along the batch; slots no row attends to
  any more (the padding of rows that left) are cut off at the next join;
* a finished row leaves the batch (its cache rows are dropped), as in the training decode loop.

Models without the lean step (not Llama-family, or a LoRA variant it does not implement) run on
:class:`HFBatch`: the Hugging Face forward and its cache, rows leave but only join an empty batch
(dynamic batching: requests that arrive while it runs make up the next batch).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from palaestra.rollout.decode import HFDecodeState
from palaestra.rollout.fast_llama import LlamaDecodeState, LlamaWeights

__all__ = ["HFBatch", "LeanBatch", "Prefilled"]

_GROWTH = 64  # cache slots added at a time when the batch runs out of room


@dataclass
class Prefilled:
    """Joining rows after their prefill (b rows; P the width of their left-padded prompts)."""

    logits: torch.Tensor  # [b, V] logits at each prompt's last token (they predict completion token 0)
    mask: torch.Tensor  # [b, P] 1 on real prompt tokens
    cache: object  # lean: (keys, values) per layer [b, kv_heads, P, head_dim]; hf: the Hugging Face cache


def _prefill_forward(model, ids: torch.Tensor, mask: torch.Tensor):
    return model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(dim=1) - 1).clamp(min=0),
                 use_cache=True, logits_to_keep=1)


class LeanBatch:
    """A growing batch on the lean Llama step; ``model`` is the plain causal LM (LoRA layers inside,
    their active adapter merged into the packed weights when the batch is made)."""

    joinable = True

    @torch.no_grad()
    def __init__(self, model, dtype: torch.dtype | None = None, weights: LlamaWeights | None = None):
        config = model.config
        heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        self.layers = config.num_hidden_layers
        device = model.model.embed_tokens.weight.device
        empty = torch.zeros(0, self.kv_heads, 0, self.head_dim, device=device)
        # the state of an empty batch: the packed weights; its cache and rotary table are ours to manage
        self.state = LlamaDecodeState(model, _Layers([(empty, empty)] * self.layers), 1, dtype=dtype, weights=weights)
        self.max_positions = int(getattr(config, "max_position_embeddings", 4096))
        self.state.cos, self.state.sin = self.state.weights.rotary_table(self.max_positions)
        self.device = device
        self.mask = torch.zeros(0, 0, dtype=torch.long, device=device)  # [B, slots in use]

    @property
    def rows(self) -> int:
        return self.mask.shape[0]

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor, mask: torch.Tensor) -> Prefilled:
        logits, layers = self.state.weights.prefill(ids, mask)  # on the packed weights, as the decode steps
        return Prefilled(logits, mask, layers)

    def can_join(self) -> bool:
        return True

    @torch.no_grad()
    def join(self, prefilled: Prefilled, rows: torch.Tensor) -> None:
        """Add the prefilled rows ``rows`` (indices into ``prefilled``, repeats allowed) to the batch."""
        dtype = self.state.cache_dtype
        new_mask = prefilled.mask.index_select(0, rows)
        if not self.rows:
            self.mask = self.mask.new_zeros(0, 0)
        else:  # cut the slots no row attends to any more (left by rows that finished)
            first = int(self.mask.any(dim=0).long().argmax())
            if first:
                self.mask = self.mask[:, first:]
                self.state.keys = [k[:, :, first:] for k in self.state.keys]
                self.state.values = [v[:, :, first:] for v in self.state.values]
        old_width, new_width = self.mask.shape[1], new_mask.shape[1]
        width = max(old_width, new_width)
        capacity = width + _GROWTH
        keys, values = [], []
        for index, (new_keys, new_values) in enumerate(prefilled.cache):
            merged = []
            for old, new in ((self.state.keys[index] if self.rows else None, new_keys),
                             (self.state.values[index] if self.rows else None, new_values)):
                new = new.index_select(0, rows).to(dtype)
                cache = new.new_zeros(self.rows + new.shape[0], self.kv_heads, capacity, self.head_dim)
                if old is not None:
                    cache[: self.rows, :, width - old_width : width] = old[:, :, :old_width]
                cache[self.rows :, :, width - new_width : width] = new
                merged.append(cache)
            keys.append(merged[0])
            values.append(merged[1])
        self.state.keys, self.state.values = keys, values
        pad = lambda m, w: torch.cat([m.new_zeros(m.shape[0], w - m.shape[1]), m], dim=1)  # noqa: E731
        self.mask = torch.cat([pad(self.mask, width), pad(new_mask.to(self.mask.dtype), width)])

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Logits [B, V] after feeding each row's newest token at its position."""
        slot = self.mask.shape[1]
        if slot >= self.state.keys[0].shape[2]:  # out of room: grow every layer's cache
            grow = lambda t: torch.cat([t, t.new_zeros(t.shape[0], t.shape[1], _GROWTH, t.shape[3])], dim=2)  # noqa: E731
            self.state.keys = [grow(k) for k in self.state.keys]
            self.state.values = [grow(v) for v in self.state.values]
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.rows, 1)], dim=1)
        return self.state.step(tokens, positions, self.mask)

    def keep(self, rows: torch.Tensor) -> None:
        """Only ``rows`` go on decoding."""
        self.state.keep_rows(rows)
        self.mask = self.mask.index_select(0, rows)


class HFBatch:
    """A batch on the Hugging Face forward: rows leave as they finish; new rows start a new batch."""

    joinable = False

    def __init__(self, model):
        self.model = model
        self.state: HFDecodeState | None = None
        self.mask: torch.Tensor | None = None

    @property
    def rows(self) -> int:
        return 0 if self.mask is None else self.mask.shape[0]

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor, mask: torch.Tensor) -> Prefilled:
        out = _prefill_forward(self.model, ids, mask)
        return Prefilled(out.logits[:, -1], mask, out.past_key_values)

    def can_join(self) -> bool:
        return self.rows == 0

    def join(self, prefilled: Prefilled, rows: torch.Tensor) -> None:
        if self.rows:
            raise RuntimeError("a Hugging Face batch takes new rows only when it is empty")
        prefilled.cache.batch_select_indices(rows)
        self.state = HFDecodeState(self.model, prefilled.cache)
        self.mask = prefilled.mask.index_select(0, rows)

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.rows, 1)], dim=1)
        return self.state.step(tokens, positions, self.mask)

    def keep(self, rows: torch.Tensor) -> None:
        self.state.keep_rows(rows)
        self.mask = self.mask.index_select(0, rows)
        if not self.rows:
            self.state = self.mask = None


class _Layers:
    """Per-layer keys and values in the shape :func:`layer_keys_values` reads."""

    def __init__(self, layers):
        self.layers = [_KeysValues(keys, values) for keys, values in layers]


@dataclass
class _KeysValues:
    keys: torch.Tensor
    values: torch.Tensor
