"""Generation from a Hugging Face model: chat prompts in, padded token tensors and texts out.

The engine renders each chat prompt once with the tokenizer's chat template, repeats it for the
group, samples, and returns a :class:`Rollout` whose tensors the training step consumes directly
(no re-tokenisation of the completions). A vLLM engine can sit behind the same ``generate`` call.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch

from palaestra.config.errors import ConfigError
from palaestra.models.precision import autocast
from palaestra.models.shapes import bucket_length
from palaestra.rollout.decode import HFDecodeState, StopStrings, decode
from palaestra.rollout.fast_llama import LlamaDecodeState, LlamaWeights, PackedWeightsCache, supports_fast_decode
from palaestra.rollout.int8 import Int8Sampling


@dataclass
class SamplingParams:
    """How to decode one batch."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    greedy: bool = False


@dataclass
class Rollout:
    """Completions for a batch of prompts; B = number of prompts x samples per prompt.

    Completion tensors are right-padded; ``completion_mask`` covers the generated tokens up to and
    including the end-of-sequence token.
    """

    prompt_ids: torch.Tensor  # [B, P] left-padded prompt tokens
    prompt_mask: torch.Tensor  # [B, P] 1 on real prompt tokens
    completion_ids: torch.Tensor  # [B, C] generated tokens, right-padded
    completion_mask: torch.Tensor  # [B, C] 1 on generated tokens up to and including EOS
    truncated: torch.Tensor  # [B] bool: hit max_new_tokens without an end token
    texts: list[str]  # decoded completions (special tokens removed)
    sampler_logprobs: torch.Tensor | None = None
    """[B, C] the log-prob the sampling engine gave each completion token (0 on padding), when another engine
    than the trainer sampled (a server, vLLM): what the mismatch correction compares the trainer's with."""
    trained_mask: torch.Tensor | None = None
    """[B, C] 1 on the tokens the policy sampled, 0 on tokens it did not (a tool's output between its turns), when
    they differ from ``completion_mask``: the loss counts these; None: every completion token is the policy's."""

    @property
    def num_completion_tokens(self) -> int:
        """The tokens the policy sampled."""
        return int(self.sampled_mask.sum())

    @property
    def sampled_mask(self) -> torch.Tensor:
        """[B, C] 1 on the completion tokens the policy sampled (what the loss may count)."""
        return self.completion_mask if self.trained_mask is None else self.trained_mask

    def select(self, rows: torch.Tensor) -> "Rollout":
        """The rollout of the rows where ``rows`` (a [B] bool mask) is true, in order."""
        chosen = [index for index, keep in enumerate(rows.tolist()) if keep]
        index = torch.tensor(chosen, dtype=torch.long)
        return Rollout(self.prompt_ids[index], self.prompt_mask[index], self.completion_ids[index],
                       self.completion_mask[index], self.truncated[index], [self.texts[i] for i in chosen],
                       None if self.sampler_logprobs is None else self.sampler_logprobs[index],
                       None if self.trained_mask is None else self.trained_mask[index])

    @staticmethod
    def concat(parts: list["Rollout"]) -> "Rollout":
        """The rollouts one after the other: prompts padded on the left and completions on the right to the widest
        (one part is returned as it is)."""
        if len(parts) == 1:
            return parts[0]
        prompt_width = max(part.prompt_ids.shape[1] for part in parts)
        completion_width = max(part.completion_ids.shape[1] for part in parts)

        def padded(tensor: torch.Tensor, width: int, left: bool) -> torch.Tensor:
            pad = (width - tensor.shape[1], 0) if left else (0, width - tensor.shape[1])
            return torch.nn.functional.pad(tensor, pad)

        sampled = None
        if all(p.sampler_logprobs is not None for p in parts):
            sampled = torch.cat([padded(p.sampler_logprobs, completion_width, False) for p in parts])
        trained = None
        if any(p.trained_mask is not None for p in parts):
            trained = torch.cat([padded(p.sampled_mask, completion_width, False) for p in parts])
        return Rollout(torch.cat([padded(p.prompt_ids, prompt_width, True) for p in parts]),
                       torch.cat([padded(p.prompt_mask, prompt_width, True) for p in parts]),
                       torch.cat([padded(p.completion_ids, completion_width, False) for p in parts]),
                       torch.cat([padded(p.completion_mask, completion_width, False) for p in parts]),
                       torch.cat([p.truncated for p in parts]), [text for p in parts for text in p.texts], sampled,
                       trained)


class HFGenerator:
    """Samples completions from a (possibly LoRA-wrapped) Hugging Face causal LM.

    ``decoder="palaestra"`` (default) runs our own decode loop (:mod:`palaestra.rollout.decode`:
    finished rows leave the batch, no per-step processor chain) with, for Llama-family models, the
    lean fused decode step of :mod:`palaestra.rollout.fast_llama` (``fast_step=False``: the Hugging
    Face forward per step instead); ``decoder="hf"`` calls ``model.generate``. All prefill each
    distinct prompt once and sample on merged weights.

    ``quantize="int8"``: the small decode steps run on int8 copies of the frozen base weights
    (:mod:`palaestra.rollout.int8`; the lean path of a Llama-family model on a CPU), and every rollout carries the
    sampler's log-probs (``Rollout.sampler_logprobs``) for the update's mismatch correction. Inside
    :meth:`exact` the generator samples at full precision (an evaluation measures the policy itself).
    """

    def __init__(self, model, tokenizer, max_prompt_length: int = 512, precision: str = "fp32", decoder: str = "palaestra",
                 fast_step: bool = True, prefill_rows: int = 16, quantize: str = "none"):
        if decoder not in ("palaestra", "hf"):
            raise ValueError(f"decoder must be 'palaestra' or 'hf', got {decoder!r}")
        if quantize not in ("none", "int8"):
            raise ValueError(f"quantize must be 'none' or 'int8', got {quantize!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.max_prompt_length = max_prompt_length
        self.precision = precision  # "bf16": sample under bf16 autocast
        self.decoder = decoder
        self.fast_step = fast_step
        self.prefill_rows = prefill_rows  # distinct prompts per prefill forward (the lean path)
        self._reused: PackedWeightsCache | None = None  # the packed weights kept inside reusing_weights()
        self.tokenizer.padding_side = "left"
        self.stop_ids = stop_token_ids(model, tokenizer)
        self.int8: Int8Sampling | None = None
        if quantize == "int8":
            plain = model.get_base_model() if hasattr(model, "get_base_model") else model
            if decoder != "palaestra" or not fast_step or not supports_fast_decode(plain):
                raise ConfigError(f"rollout.quantize=int8 samples on the lean decode step of Llama-family models (Llama, "
                                 f"Qwen2) with plain LoRA; {type(plain).__name__} has none: use rollout.quantize=none")
            if next(model.parameters()).device.type != "cpu":
                raise ConfigError("rollout.quantize=int8 samples on a CPU (its int8 kernel is PyTorch's CPU one); on a "
                                  "GPU use rollout.quantize=none, or rollout.engine=vllm")
            self.int8 = Int8Sampling()
        self._exact = False

    @contextmanager
    def exact(self):
        """``with generator.exact():`` sample at full precision in the block (no int8 weights, no sampler log-probs)."""
        outer, self._exact = self._exact, True
        try:
            yield self
        finally:
            self._exact = outer

    @property
    def _int8(self) -> Int8Sampling | None:
        return None if self._exact else self.int8

    def encode_prompts(self, prompts: list[list[dict]]) -> list[list[int]]:
        """Render chat prompts with the chat template; keep the last max_prompt_length tokens.

        A prompt that ends with an assistant message is the start of the answer: it is rendered
        open (no end-of-turn) and the model continues it.
        """
        return [encode_chat(self.tokenizer, messages)[-self.max_prompt_length :] for messages in prompts]

    @torch.no_grad()
    def generate(self, prompts: list[list[dict]], num_samples: int, sampling: SamplingParams) -> Rollout:
        """Sample ``num_samples`` completions per prompt; rows are grouped prompt by prompt.

        Each distinct prompt is prefilled once: its key/value cache is computed for the unique
        prompts and repeated ``num_samples`` times before decoding, instead of re-reading the
        same prompt for every sample of the group.
        """
        prompt_ids, prompt_mask, completion_ids, logprobs = self._sample(self.encode_prompts(prompts), num_samples, sampling)
        completion_mask, truncated = completion_mask_from_ids(completion_ids, self.stop_ids)
        completion_ids = completion_ids.masked_fill(completion_mask == 0, self.tokenizer.pad_token_id)
        texts = self.tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
        sampled = None if logprobs is None else logprobs * completion_mask
        return Rollout(prompt_ids, prompt_mask, completion_ids, completion_mask, truncated, texts, sampled)

    @torch.no_grad()
    def generate_ids(self, prefixes: list[list[int]], num_samples: int, sampling: SamplingParams,
                     stop_strings: StopStrings | None = None) -> list[tuple[list[int], str]]:
        """Continue token sequences as they are (no chat template, no cut to max_prompt_length): for each prefix,
        ``num_samples`` continuations (rows grouped prefix by prefix), each ``(ids, end)`` with ``ids`` up to and
        including the stop token or the token completing a stop string, and ``end`` "stop", "string" or "length".

        The multi-turn agent loop calls it: a continuation is appended to the sampled tokens it continues, so the
        trained sequence is exactly what was sampled.
        """
        _, _, completion_ids, _ = self._sample(prefixes, num_samples, sampling, stop_strings)
        results = []
        for row in completion_ids.tolist():
            stop = next((i + 1 for i, token in enumerate(row) if token in self.stop_ids), None)
            string = stop_strings.end(row[: stop or len(row)]) if stop_strings is not None else None
            if string is not None:
                results.append((row[:string], "string"))
            elif stop is not None:
                results.append((row[:stop], "stop"))
            else:
                results.append((row[: sampling.max_new_tokens], "length"))
        return results

    def _sample(self, unique: list[list[int]], num_samples: int, sampling: SamplingParams,
                stop_strings: StopStrings | None = None):
        """Left-padded prompts [B, P] and their mask, the sampled tokens [B, C] (right-padded, rows grouped prompt by
        prompt) for the token lists ``unique``, and with int8 sampling their log-probs [B, C] (else None)."""
        pad_id = self.tokenizer.pad_token_id
        # prompts left-padded to a bucketed width: the prefill meets a bounded set of shapes (models.shapes)
        width = bucket_length(max(len(ids) for ids in unique))
        unique_ids = torch.full((len(unique), width), pad_id, dtype=torch.long)
        unique_mask = torch.zeros((len(unique), width), dtype=torch.long)
        for row, ids in enumerate(unique):
            unique_ids[row, width - len(ids) :] = torch.tensor(ids)
            unique_mask[row, width - len(ids) :] = 1
        prompt_ids = unique_ids.repeat_interleave(num_samples, dim=0)
        prompt_mask = unique_mask.repeat_interleave(num_samples, dim=0)
        device = next(self.model.parameters()).device
        kwargs = dict(max_new_tokens=sampling.max_new_tokens, pad_token_id=pad_id, eos_token_id=self.stop_ids)
        if sampling.greedy:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k or None)
        was_training = self.model.training
        self.model.eval()
        cast = torch.bfloat16 if self.precision == "bf16" else None
        plain = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        lean = self.decoder == "palaestra" and self.fast_step and supports_fast_decode(plain)
        # the lean step packs (and merges adapters into) its own copy of the weights; the other
        # paths sample from temporary merged (and cast) weights
        weights = torch.no_grad() if lean else _inference_weights(self.model, cast)
        logprobs = None
        with weights, autocast(self.precision, device.type):
            if self.decoder == "palaestra":
                completion_ids = self._decode(unique_ids.to(device), unique_mask.to(device), prompt_mask, num_samples,
                                              sampling, lean, stop_strings)
                if isinstance(completion_ids, tuple):
                    completion_ids, logprobs = completion_ids
            else:  # model.generate stops at stop tokens only; generate_ids cuts at a stop string afterwards
                if num_samples > 1 and width > 1:
                    kwargs["past_key_values"] = self._prefill(unique_ids[:, :-1].to(device), unique_mask[:, :-1].to(device), num_samples)
                output = self.model.generate(
                    input_ids=prompt_ids.to(device), attention_mask=prompt_mask.to(device), **kwargs
                ).cpu()
                completion_ids = output[:, width:]
        self.model.train(was_training)
        return prompt_ids, prompt_mask, completion_ids, logprobs

    def _decode(self, ids: torch.Tensor, mask: torch.Tensor, prompt_mask: torch.Tensor, repeats: int,
                sampling: SamplingParams, lean: bool, stop_strings: StopStrings | None = None):
        """Prefill the distinct prompts once, repeat their cache per sample, run the decode loop."""
        # The plain model under the peft wrapper: its LoRA layers apply the active adapters (the lean
        # path) or see them merged into the weights (the Hugging Face step).
        model = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        if lean:
            weights = self._lean_weights(model, torch.bfloat16 if self.precision == "bf16" else None)
            first_logits, cache = self._chunked_prefill(weights, ids, mask, repeats)
            state = LlamaDecodeState(model, cache, sampling.max_new_tokens, weights=weights)
        else:
            out = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(dim=1) - 1).clamp(min=0),
                        use_cache=True, logits_to_keep=1)
            cache = out.past_key_values
            cache.batch_repeat_interleave(repeats)
            first_logits = out.logits[:, -1].repeat_interleave(repeats, dim=0)
            state = HFDecodeState(model, cache)
        return decode(
            state, first_logits, prompt_mask, max_new_tokens=sampling.max_new_tokens, stop_ids=self.stop_ids,
            pad_id=self.tokenizer.pad_token_id, temperature=sampling.temperature, top_k=sampling.top_k,
            top_p=sampling.top_p, greedy=sampling.greedy, stop_strings=stop_strings, with_logprobs=self._int8 is not None,
        )

    def _chunked_prefill(self, weights: LlamaWeights, ids: torch.Tensor, mask: torch.Tensor, repeats: int):
        """Last-token logits [B * repeats, V] and per-layer keys/values of the prompts, prefilled on the
        packed weights ``prefill_rows`` prompts at a time: a prefill's transient memory grows faster
        than its rows (an evaluation batch in one forward set the main job's peak; bench/RESULTS.md,
        memory entries)."""
        logits, chunks = [], []
        for start in range(0, ids.shape[0], self.prefill_rows):
            rows = slice(start, start + self.prefill_rows)
            chunk_logits, layers = weights.prefill(ids[rows], mask[rows])
            logits.append(chunk_logits)
            chunks.append(layers)
        cache = _StackedCache([
            (torch.cat([chunk[i][0] for chunk in chunks]).repeat_interleave(repeats, dim=0),
             torch.cat([chunk[i][1] for chunk in chunks]).repeat_interleave(repeats, dim=0))
            for i in range(len(weights.layers))
        ])
        return torch.cat(logits).repeat_interleave(repeats, dim=0), cache

    @contextmanager
    def reusing_weights(self):
        """``with generator.reusing_weights():`` generate calls in the block share the lean path's
        packed weights while the model's weights and active adapters stay as they were.

        A team rollout calls ``generate`` once per (turn, agent) between two optimizer steps; building
        the merged, packed weights once per adapter instead of once per call saves most of a short
        answer's generation time. Outside such a block every call builds its own (a training step
        changes the adapters, and a stale copy would only hold memory).
        """
        outer, self._reused = self._reused, PackedWeightsCache() if self._reused is None else self._reused
        try:
            yield self
        finally:
            self._reused = outer

    def _lean_weights(self, model, dtype) -> LlamaWeights:
        int8 = self._int8
        return LlamaWeights(model, dtype, int8) if self._reused is None else self._reused.get(model, dtype, int8)

    def _prefill(self, ids: torch.Tensor, mask: torch.Tensor, repeats: int):
        """The key/value cache of all prompt tokens but the last, repeated for each sample."""
        out = self.model(
            input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(dim=1) - 1).clamp(min=0),
            use_cache=True, logits_to_keep=1,
        )
        cache = out.past_key_values
        cache.batch_repeat_interleave(repeats)
        return cache


class _StackedCache:
    """Per-layer keys and values ([B, kv_heads, P, head_dim] each), read by the lean decode step."""

    def __init__(self, layers: list[tuple[torch.Tensor, torch.Tensor]]):
        self.layers = [_KeysValues(keys, values) for keys, values in layers]


@dataclass
class _KeysValues:
    keys: torch.Tensor
    values: torch.Tensor


def encode_chat(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a chat prompt, ready for the model to answer: the generation prompt appended, or,
    when the last message is the assistant's (the start of its answer), that message left open."""
    if messages and messages[-1]["role"] == "assistant":
        text = tokenizer.apply_chat_template(messages, continue_final_message=True, tokenize=False)
    else:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@contextmanager
def _inference_weights(model, dtype):
    """Sample from temporary weights: LoRA merged in, optionally cast to ``dtype``; restored exactly after.

    Decoding runs one token per forward call, so per-call overhead dominates: the LoRA branch adds
    two small matmuls to every adapted layer, and bf16 autocast re-casts frozen weights at every
    call (its cast cache only keeps weights that require grad). Building merged (and cast) weights
    once per ``generate`` call removes both. The original tensors are put back untouched, so
    training and exact resume are unaffected.
    """
    originals = []
    merged_layers = set()
    for module in model.modules():
        if hasattr(module, "lora_A") and hasattr(module, "base_layer") and module.active_adapters:
            weight = module.base_layer.weight
            delta = sum(module.get_delta_weight(name) for name in module.active_adapters if name in module.lora_A)
            originals.append((weight, weight.data))
            weight.data = (weight.data + delta.to(weight.dtype)).to(dtype or weight.dtype)
            merged_layers.add(id(weight))
    if dtype is not None:
        for parameter in model.parameters():
            if id(parameter) not in merged_layers and parameter.is_floating_point() and parameter.dtype != dtype:
                originals.append((parameter, parameter.data))
                parameter.data = parameter.data.to(dtype)
    disable = model.disable_adapter() if merged_layers and hasattr(model, "disable_adapter") else nullcontext()
    try:
        with torch.no_grad(), disable:
            yield
    finally:
        for parameter, data in originals:
            parameter.data = data


def completion_mask_from_ids(completion_ids: torch.Tensor, stop_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask [B, C] of tokens up to and including the first stop token, and truncated [B].

    >>> mask, truncated = completion_mask_from_ids(torch.tensor([[5, 2, 0], [5, 6, 7]]), [2])
    >>> mask.tolist(), truncated.tolist()
    ([[1, 1, 0], [1, 1, 1]], [False, True])
    """
    is_stop = torch.isin(completion_ids, torch.tensor(stop_ids))
    has_stop = is_stop.any(dim=1)
    first_stop = torch.where(has_stop, is_stop.int().argmax(dim=1), completion_ids.shape[1] - 1)
    positions = torch.arange(completion_ids.shape[1]).unsqueeze(0)
    mask = (positions <= first_stop.unsqueeze(1)).long()
    return mask, ~has_stop


def stop_token_ids(model, tokenizer) -> list[int]:
    """The tokens a completion ends at: the tokenizer's end-of-sequence token and the model's generation config's
    (every rollout engine stops at these)."""
    generation_config = getattr(model, "generation_config", None)
    return sorted({tokenizer.eos_token_id} | set(_as_list(getattr(generation_config, "eos_token_id", None))))


def _as_list(value) -> list[int]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def rollout_from_token_ids(
    prompts: list[list[int]], completions: list[list[int]], num_samples: int, truncated: list[bool],
    *, pad_id: int, stop_ids: list[int], decode, logprobs: list[list[float]] | None = None,
) -> Rollout:
    """A :class:`Rollout` from unpadded token lists (rows grouped prompt by prompt, as HFGenerator's): what an
    inference engine returned. ``logprobs``: the engine's log-prob of each completion token (the rollout's
    ``sampler_logprobs``), or None.

    >>> r = rollout_from_token_ids([[5, 6], [7]], [[1, 2], [3], [4, 2, 9], [2]], 2, [False, True, False, False],
    ...                            pad_id=0, stop_ids=[2], decode=lambda ids: " ".join(map(str, ids)))
    >>> r.prompt_ids.tolist(), r.completion_ids.tolist(), r.completion_mask.tolist(), r.truncated.tolist()
    ([[5, 6], [5, 6], [0, 7], [0, 7]], [[1, 2, 0], [3, 0, 0], [4, 2, 0], [2, 0, 0]], [[1, 1, 0], [1, 0, 0], [1, 1, 0], [1, 0, 0]], [False, True, False, False])
    """
    width = max(len(ids) for ids in prompts)
    rows = len(prompts) * num_samples
    prompt_ids = torch.full((rows, width), pad_id, dtype=torch.long)
    prompt_mask = torch.zeros((rows, width), dtype=torch.long)
    for row in range(rows):
        ids = prompts[row // num_samples]
        prompt_ids[row, width - len(ids):] = torch.tensor(ids)
        prompt_mask[row, width - len(ids):] = 1
    length = max(1, max(len(ids) for ids in completions))
    completion_ids = torch.full((rows, length), pad_id, dtype=torch.long)
    for row, ids in enumerate(completions):
        completion_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    mask, _ = completion_mask_from_ids(completion_ids, stop_ids)
    lengths = torch.tensor([len(ids) for ids in completions])
    mask = mask * (torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1)).long()  # nothing past the row's own tokens
    completion_ids = completion_ids.masked_fill(mask == 0, pad_id)
    texts = [decode(ids) for ids in completions]
    sampled = None
    if logprobs is not None:
        sampled = torch.zeros((rows, length), dtype=torch.float32)
        for row, values in enumerate(logprobs):
            sampled[row, : len(values)] = torch.tensor(values, dtype=torch.float32)
        sampled = sampled * mask
    return Rollout(prompt_ids, prompt_mask, completion_ids, mask, torch.tensor(truncated, dtype=torch.bool), texts,
                   sampled)
