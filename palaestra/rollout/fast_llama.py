"""A lean decode step for Llama-family models (Llama, Qwen2): one fused forward per new token.

On a CPU, a small model's decode step is bound by per-operation overhead and weight reads, not by
arithmetic: the Hugging Face forward runs many small tensor operations and module calls per layer
for one token (separate q/k/v and gate/up projections, a rotary embedding recomputed from the
positions, a cache object that concatenates keys and values, a mask rebuilt per call). This step
does the same mathematics in fewer, larger operations:

* q, k and v come from one matrix multiply (their weights concatenated once per ``generate``);
  gate and up likewise;
* cos/sin of every position are computed once per ``generate`` by the model's own rotary module
  (so every rope variant the model supports is honoured) and gathered per step;
* keys and values go into a preallocated cache, written in place at the step's slot;
* attention is two batched matrix products per key/value head group (one query per row; the
  prompt's prefill uses ``scaled_dot_product_attention``);
* on a CPU every projection runs on weights packed once for the CPU's matrix-multiply library
  (oneDNN for bf16, MKL for fp32; the layout PyTorch's own compiler uses) instead of a plain
  ``linear`` that re-lays-out the weight on every call. A packing that this PyTorch build lacks,
  or whose output differs from ``F.linear`` on a probe, is not used.

``bench/decode.py`` measures the step against the Hugging Face forward in the same loop.

The packed weights (active adapters merged in) are built once per ``generate`` call and freed after
it: a copy kept between training steps would only add to the step's peak memory. Where the weights
do not change between calls, a :class:`PackedWeightsCache` keeps them: inside
``HFGenerator.reusing_weights`` (a team rollout, an evaluation) and in a server.

The prompt is prefilled on the same packed weights (:meth:`LlamaWeights.prefill`, once per distinct
prompt), not through the Hugging Face forward and its LoRA layers; its keys and values are copied
into the static cache. Prefill and step compute what the Hugging Face forward computes (tested:
logits within float tolerance step by step, with padding, dropped rows, LoRA and q/k/v biases;
greedy tokens identical to ``generate``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from palaestra.rollout.int8 import Int8Projection, Int8Sampling, lora_factors

__all__ = ["LlamaDecodeState", "LlamaWeights", "PackedWeightsCache", "layer_keys_values", "packed_linear", "one_token_attention", "supports_fast_decode", "weights_version"]

_FAST_MODEL_TYPES = ("llama", "qwen2")


def supports_fast_decode(model) -> bool:
    """Whether ``model`` (a plain Hugging Face causal LM) has the layout the lean step implements."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "model_type", None) not in _FAST_MODEL_TYPES:
        return False
    if getattr(config, "hidden_act", "silu") != "silu" or getattr(config, "use_sliding_window", False):
        return False
    if getattr(config, "mlp_bias", False):
        return False
    inner = getattr(model, "model", None)
    return inner is not None and hasattr(inner, "layers") and hasattr(inner, "rotary_emb") and _lora_supported(model)


def packed_linear(weight: torch.Tensor, bias: torch.Tensor | None = None, batch_hint: int = 8):
    """``x -> F.linear(x, weight, bias)`` on a weight packed once for the CPU's GEMM library.

    Falls back to plain ``F.linear`` off the CPU, for dtypes other than bf16/fp32, when this PyTorch
    build has no packing operator, or when packed products differ from ``F.linear`` (checked once
    per dtype on a probe).

    >>> w, x = torch.randn(6, 4), torch.randn(2, 4)
    >>> torch.allclose(packed_linear(w)(x), torch.nn.functional.linear(x, w), atol=1e-5)
    True
    """
    def plain(x):
        return F.linear(x, weight, bias)

    if weight.device.type != "cpu" or not _packing_works(weight.dtype):
        return plain
    try:
        return _pack(weight, bias, batch_hint)
    except (RuntimeError, AttributeError):
        return plain


def _pack(weight: torch.Tensor, bias: torch.Tensor | None, batch_hint: int):
    """The packed product (oneDNN for bf16, MKL for fp32); raises where this build lacks the operator."""
    if weight.dtype == torch.bfloat16 and torch.backends.mkldnn.is_available():
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, batch_hint)
        return lambda x: torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    if weight.dtype == torch.float32 and torch.backends.mkl.is_available():
        packed = torch.ops.mkl._mkl_reorder_linear_weight(weight, batch_hint)
        return lambda x: torch.ops.mkl._mkl_linear(x, packed, weight, bias, batch_hint)
    raise RuntimeError(f"no packed linear for {weight.dtype}")


_PACKING_WORKS: dict[torch.dtype, bool] = {}


def _packing_works(dtype: torch.dtype) -> bool:
    """Whether packed products equal ``F.linear`` in ``dtype`` on this build (probed once)."""
    if dtype not in _PACKING_WORKS:
        generator = torch.Generator().manual_seed(0)
        weight, bias, x = (torch.randn(*shape, generator=generator).to(dtype) for shape in ((24, 16), (24,), (3, 16)))
        tolerance = 1e-2 if dtype == torch.bfloat16 else 1e-4
        try:
            got, expected = _pack(weight, bias, 8)(x).float(), F.linear(x, weight, bias).float()
            _PACKING_WORKS[dtype] = torch.allclose(got, expected, atol=tolerance, rtol=tolerance)
        except (RuntimeError, AttributeError):  # no such operator in this build
            _PACKING_WORKS[dtype] = False
    return _PACKING_WORKS[dtype]


def _weight(module) -> torch.Tensor:
    return getattr(module, "base_layer", module).weight  # peft wrappers keep the base weight in base_layer


def _bias(module) -> torch.Tensor | None:
    return getattr(getattr(module, "base_layer", module), "bias", None)


def _lora_delta(module) -> torch.Tensor | None:
    """The weight change ``module``'s active LoRA adapters make now (fp32), or None."""
    if not hasattr(module, "lora_A") or module.disable_adapters or module.merged:
        return None  # no adapter, adapters switched off, or already merged into the base weight
    names = [name for name in module.active_adapters if name in module.lora_A]
    return sum(module.get_delta_weight(name).float() for name in names) if names else None


def _lora_supported(model) -> bool:
    """Plain LoRA on linear layers only: no DoRA or other variant, no LoRA bias, no adapted embeddings."""
    for module in model.modules():
        if getattr(module, "lora_embedding_A", None):
            return False
        if hasattr(module, "lora_A"):
            if getattr(module, "lora_variant", None) or any(b.bias is not None for b in module.lora_B.values()):
                return False
            if not isinstance(getattr(module, "base_layer", None), torch.nn.Linear):
                return False
    return True


def _projection(modules: list, dtype: torch.dtype, int8: Int8Sampling | None = None):
    """One fused projection over ``modules`` (q/k/v, gate/up or one), packed, active LoRA adapters merged in; with
    ``int8``, small batches run on the int8 copy of the base weights with the adapters beside it
    (:class:`~palaestra.rollout.int8.Int8Projection`)."""
    weights, biases = [_weight(m) for m in modules], [_bias(m) for m in modules]
    deltas = [_lora_delta(m) for m in modules]
    parts = [(w.detach().float() + d).to(dtype) if d is not None else w.detach().to(dtype) for w, d in zip(weights, deltas)]
    bias = torch.cat([b.detach().to(dtype) for b in biases]) if all(b is not None for b in biases) else None
    full = packed_linear(torch.cat(parts) if len(parts) > 1 else parts[0], bias)
    max_rows = int8.max_rows(dtype, packed_linear) if int8 is not None and weights[0].device.type == "cpu" else 0
    if not max_rows:
        return full
    q, scales = int8.base.get(weights)
    return Int8Projection(full, q, scales, bias, lora_factors(modules), max_rows, dtype)


def weights_version(model) -> tuple[tuple, tuple]:
    """What packed weights built from ``model`` now depend on: the active adapters (and whether
    adapters are switched off or merged), and the in-place version of every parameter, which an
    optimizer step or a loaded checkpoint moves on."""
    lora_layer = next((module for module in model.modules() if hasattr(module, "lora_A")), None)
    adapters = () if lora_layer is None else (tuple(lora_layer.active_adapters), lora_layer.disable_adapters, lora_layer.merged)
    return adapters, tuple((id(parameter), parameter.data_ptr(), parameter._version) for parameter in model.parameters())


class PackedWeightsCache:
    """:class:`LlamaWeights` kept per adapter state (active adapters, dtype) while none of the
    model's weights changes; a changed weight (an optimizer step, a loaded checkpoint) rebuilds them."""

    def __init__(self):
        self.entries: dict[tuple, tuple[tuple, LlamaWeights]] = {}

    def get(self, model, dtype: torch.dtype | None = None, int8: Int8Sampling | None = None) -> "LlamaWeights":
        adapters, version = weights_version(model)
        key = (adapters, dtype, id(int8))
        if key not in self.entries or self.entries[key][0] != version:
            self.entries[key] = (version, LlamaWeights(model, dtype, int8))
        return self.entries[key][1]


class LlamaWeights:
    """The fused, packed weights of a Llama-family model as it is now, and the lean prefill.

    Built once per ``generate`` call (or once per unchanged adapter state while a generator reuses
    weights); the decode state reads them at every step. Active LoRA adapters are merged in.
    """

    @torch.no_grad()
    def __init__(self, model, dtype: torch.dtype | None = None, int8: Int8Sampling | None = None):
        config = model.config
        inner = model.model
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.eps = config.rms_norm_eps
        self.dtype = dtype or inner.embed_tokens.weight.dtype
        self.rotary = inner.rotary_emb
        self.embed = inner.embed_tokens.weight.detach().to(self.dtype)
        self.final_norm = inner.norm.weight.detach().to(self.dtype)
        self.lm_head = _projection([model.lm_head], self.dtype, int8)
        self.layers = []
        for layer in inner.layers:
            attn, mlp = layer.self_attn, layer.mlp
            self.layers.append((
                layer.input_layernorm.weight.detach().to(self.dtype),
                _projection([attn.q_proj, attn.k_proj, attn.v_proj], self.dtype, int8),
                _projection([attn.o_proj], self.dtype, int8),
                layer.post_attention_layernorm.weight.detach().to(self.dtype),
                _projection([mlp.gate_proj, mlp.up_proj], self.dtype, int8),
                _projection([mlp.down_proj], self.dtype, int8),
            ))

    def rotary_table(self, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [width, head_dim] of positions 0 .. width - 1, from the model's own rotary module."""
        positions = torch.arange(width, device=self.embed.device).unsqueeze(0)
        probe = torch.zeros(1, 1, self.head_dim, dtype=self.dtype, device=self.embed.device)
        cos, sin = self.rotary(probe, positions)
        return cos[0], sin[0]

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """Logits [U, V] at each prompt's last token and per-layer keys and values [U, kv_heads, P, head_dim].

        ``ids``/``mask``: [U, P] left-padded prompts. The same fused projections as the decode step,
        over every prompt token at once: a causal mask limited to each row's real tokens (a padding
        token sees only itself, and nothing real sees it), positions following the mask as
        ``generate`` numbers them.
        """
        with torch.autocast(ids.device.type, enabled=False):
            return self._prefill(ids, mask)

    def _prefill(self, ids: torch.Tensor, mask: torch.Tensor):
        rows, width = ids.shape
        heads, kv_heads, head_dim = self.heads, self.kv_heads, self.head_dim
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        cos, sin = (table[positions].unsqueeze(2) for table in self.rotary_table(width))  # [U, P, 1, head_dim]
        causal = torch.ones(width, width, dtype=torch.bool, device=ids.device).tril()
        visible = (causal & mask.bool()[:, None, :]) | torch.eye(width, dtype=torch.bool, device=ids.device)
        visible = visible[:, None]  # [U, 1, P, P]
        hidden = F.embedding(ids, self.embed).view(rows * width, -1)
        qk_width = (heads + kv_heads) * head_dim
        cache = []
        for norm_in, qkv_proj, o_proj, norm_post, gate_up_proj, down_proj in self.layers:
            qkv = qkv_proj(F.rms_norm(hidden, norm_in.shape, norm_in, self.eps)).view(rows, width, -1)
            qk = qkv[..., :qk_width].view(rows, width, heads + kv_heads, head_dim)
            rotated = _rotate(qk, cos, sin).transpose(1, 2)
            keys = rotated[:, heads:]  # [U, kv_heads, P, head_dim]
            values = qkv[..., qk_width:].view(rows, width, kv_heads, head_dim).transpose(1, 2)
            attended = F.scaled_dot_product_attention(rotated[:, :heads], keys, values, attn_mask=visible,
                                                      enable_gqa=heads != kv_heads)
            cache.append((keys, values))
            hidden = hidden + o_proj(attended.transpose(1, 2).reshape(rows * width, heads * head_dim))
            gate, up = gate_up_proj(F.rms_norm(hidden, norm_post.shape, norm_post, self.eps)).chunk(2, dim=-1)
            hidden = hidden + down_proj(F.silu(gate) * up)
        last = hidden.view(rows, width, -1)[:, -1]  # left padding: every row's last token is its prompt's last
        return self.lm_head(F.rms_norm(last, self.final_norm.shape, self.final_norm, self.eps)), cache


class LlamaDecodeState:
    """A static key/value cache and the rotary table for one batch of decoding, over :class:`LlamaWeights`.

    Args:
        model: the plain causal LM (``LlamaForCausalLM`` / ``Qwen2ForCausalLM``), possibly with
            peft LoRA layers inside (their active adapters are merged into the packed weights).
        prefill_cache: the prompts' keys and values (``[B, kv_heads, P, head_dim]`` per layer): a
            Hugging Face cache, or any object with ``layers[i].keys`` / ``.values``.
        max_new_tokens: how many completion tokens the static cache must hold.
        dtype: the compute dtype (default: the embedding's dtype).
        weights: packed weights already built for ``model`` as it is now (else built here).
    """

    @torch.no_grad()
    def __init__(self, model, prefill_cache, max_new_tokens: int, dtype: torch.dtype | None = None,
                 weights: LlamaWeights | None = None):
        self.weights = weights or LlamaWeights(model, dtype)
        # The cache holds keys and values in the compute dtype (a Hugging Face prefill under bf16
        # autocast over fp32 weights leaves fp32 keys beside bf16 values: both are cast).
        self.cache_dtype = self.weights.dtype
        self.keys, self.values = [], []
        for index in range(len(self.weights.layers)):
            keys, values = layer_keys_values(prefill_cache, index)
            batch, kv_heads, prompt_width, head_dim = keys.shape
            width = prompt_width + max_new_tokens
            self.keys.append(keys.new_zeros(batch, kv_heads, width, head_dim, dtype=self.cache_dtype))
            self.values.append(values.new_zeros(batch, kv_heads, width, head_dim, dtype=self.cache_dtype))
            self.keys[-1][:, :, :prompt_width] = keys
            self.values[-1][:, :, :prompt_width] = values
        self.cos, self.sin = self.weights.rotary_table(width)  # [width, head_dim]

    def keep_rows(self, keep: torch.Tensor) -> None:
        """Drop finished rows from the cache (``keep``: the row indices that go on decoding)."""
        self.keys = [k.index_select(0, keep) for k in self.keys]
        self.values = [v.index_select(0, keep) for v in self.values]

    def step(self, tokens: torch.Tensor, positions: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Logits [b, V] for one new token per row; dtypes are explicit here, so autocast is off."""
        with torch.no_grad(), torch.autocast(tokens.device.type, enabled=False):
            return self._step(tokens, positions, attention_mask)

    def _step(self, tokens: torch.Tensor, positions: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Logits [b, V] for one new token per row.

        Args:
            tokens: [b] the newest token of each row.
            positions: [b] its position id (rotary position).
            attention_mask: [b, slot + 1] 1 on cache slots the token may attend to; the token is
                written at slot ``attention_mask.shape[1] - 1``.
        """
        weights = self.weights
        batch = tokens.shape[0]
        slot = attention_mask.shape[1] - 1
        heads, kv_heads, head_dim = weights.heads, weights.kv_heads, weights.head_dim
        cos = self.cos[positions].unsqueeze(1)  # [b, 1, head_dim], shared by every head and layer
        sin = self.sin[positions].unsqueeze(1)
        visible = attention_mask.bool().view(batch, 1, 1, slot + 1)
        hidden = F.embedding(tokens, weights.embed)  # [b, d]
        qk_width = (heads + kv_heads) * head_dim
        for index, (norm_in, qkv_proj, o_proj, norm_post, gate_up_proj, down_proj) in enumerate(weights.layers):
            normed = F.rms_norm(hidden, norm_in.shape, norm_in, weights.eps)
            qkv = qkv_proj(normed)
            qk = qkv[:, :qk_width].view(batch, heads + kv_heads, head_dim).to(self.cache_dtype)
            rotated = _rotate(qk, cos, sin)
            keys, values = self.keys[index], self.values[index]
            keys[:, :, slot] = rotated[:, heads:]
            values[:, :, slot] = qkv[:, qk_width:].view(batch, kv_heads, head_dim)
            attended = one_token_attention(rotated[:, :heads], keys[:, :, : slot + 1], values[:, :, : slot + 1], visible)
            hidden = hidden + o_proj(attended.to(hidden.dtype))
            normed = F.rms_norm(hidden, norm_post.shape, norm_post, weights.eps)
            gate, up = gate_up_proj(normed).chunk(2, dim=-1)
            hidden = hidden + down_proj(F.silu(gate) * up)
        hidden = F.rms_norm(hidden, weights.final_norm.shape, weights.final_norm, weights.eps)
        return weights.lm_head(hidden)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding of ``x`` [..., head_dim] (the rotate-half form Llama uses)."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def one_token_attention(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """Attention of one new token per row: [b, heads * head_dim] from queries [b, heads, head_dim]
    over keys/values [b, kv_heads, S, head_dim], ``visible`` [b, 1, 1, S] (True: may attend).

    The query heads that share a key/value head attend together, as two batched matrix products
    with the softmax in float32. For a single query per row this was several times faster on a CPU
    than ``scaled_dot_product_attention`` in bf16 (a profiling lead; ``bench/team_step.py`` and
    ``bench/grpo_vs_trl.py`` measure the steps it is part of).

    >>> q, k, v = torch.randn(2, 4, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    >>> visible = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]]).bool().view(2, 1, 1, 5)
    >>> expected = F.scaled_dot_product_attention(q.unsqueeze(2), k, v, attn_mask=visible, enable_gqa=True)
    >>> torch.allclose(one_token_attention(q, k, v, visible), expected.reshape(2, 32), atol=1e-5)
    True
    """
    batch, heads, head_dim = queries.shape
    kv_heads = keys.shape[1]
    grouped = queries.reshape(batch, kv_heads, heads // kv_heads, head_dim)  # head h uses key/value head h // (heads / kv_heads)
    scores = (grouped @ keys.transpose(-1, -2)).float() * head_dim**-0.5  # [b, kv_heads, heads per kv head, S]
    weights = scores.masked_fill(~visible, float("-inf")).softmax(dim=-1).to(values.dtype)
    return (weights @ values).reshape(batch, heads * head_dim)


def layer_keys_values(cache, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of layer ``index`` from a Hugging Face cache (new ``layers`` API or legacy)."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return layers[index].keys, layers[index].values
    return cache.key_cache[index], cache.value_cache[index]
