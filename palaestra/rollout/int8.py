"""Weight-only int8 sampling: the decode step reads a quarter of fp32's bytes per weight.

Every new token reads every weight once, and with few rows a step does little arithmetic per weight read.
``rollout.quantize=int8`` keeps, beside the packed full-precision weights of :mod:`palaestra.rollout.fast_llama`,
an int8 copy of each frozen base weight (one scale per output channel: its largest magnitude over 127) and
runs the projections of the small decode steps on PyTorch's weight-only int8 kernel
(``aten._weight_int8pack_mm``), activations in bf16. The LoRA adapters stay exact beside it:
``x @ A^T @ B^T`` in full precision, two small products. The frozen base is quantized once and reused while it
does not change (LoRA training never changes it). ``bench/decode.py`` measures it: in fp32 on AVX2 kernels
it halved the decode step at 8 rows, and changed nothing at 32 (bench/RESULTS.md).

Which rows go to the int8 kernel is measured, not assumed: the kernel is a matrix-vector one, far faster
than a full-precision GEMM for a few rows and slower for many (where the GEMM is bound by arithmetic
instead), so :func:`int8_row_limit` times both on this machine once per process, and a step with more live
rows than the limit (the prompt's prefill always) runs at full precision.

The sampler's log-probs are then not exactly the trainer's: the rollout keeps them and the update
corrects the mismatch by truncated importance sampling (:mod:`palaestra.algorithms.rollout_correction`).
"""

from __future__ import annotations

import time

import torch

__all__ = ["Int8Projection", "Int8Sampling", "QuantizedBase", "int8_row_limit", "kernel_works", "lora_factors", "quantize_rows"]


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(int8 [N, K], scales [N] float32)`` with ``weight ~= int8 * scales[:, None]``: symmetric, one scale per
    output channel (row), its largest magnitude mapped to 127.

    >>> q, scales = quantize_rows(torch.tensor([[0.5, -1.0, 0.25], [0.0, 0.0, 0.0]]))
    >>> q.tolist(), [round(s * 127, 6) for s in scales.tolist()]
    ([[64, -127, 32], [0, 0, 0]], [1.0, 0.0])
    """
    weight = weight.detach().float()
    scales = weight.abs().amax(dim=1) / 127
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    return torch.round(weight / safe[:, None]).clamp(-127, 127).to(torch.int8), scales


_KERNEL_WORKS: list[bool] = []


def kernel_works() -> bool:
    """Whether this PyTorch build has the CPU weight-only int8 kernel and it computes ``x @ (q * s)^T`` (probed once)."""
    if not _KERNEL_WORKS:
        try:
            generator = torch.Generator().manual_seed(0)
            weight, x = torch.randn(64, 64, generator=generator), torch.randn(3, 64, generator=generator)
            q, scales = quantize_rows(weight)
            got = _int8_matmul(x, q, scales)
            expected = x.bfloat16().float() @ (q.float() * scales[:, None]).T
            _KERNEL_WORKS.append(bool(torch.allclose(got, expected, atol=0.05, rtol=0.02)))
        except (RuntimeError, AttributeError, NotImplementedError):
            _KERNEL_WORKS.append(False)
    return _KERNEL_WORKS[0]


def _int8_matmul(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, ones: torch.Tensor | None = None) -> torch.Tensor:
    """``x [M, K] @ (q * scales)^T`` in float32: the kernel on bf16 activations with unit scales (``ones``, bf16 [N],
    made here when not given), the float32 scales applied to its output (a bf16 scale would round each channel's by
    up to 0.4%)."""
    ones = torch.ones(q.shape[0], dtype=torch.bfloat16) if ones is None else ones
    return torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16).contiguous(), q, ones).float() * scales


_ROW_LIMITS: dict[torch.dtype, int] = {}
_PROBE_ROWS = (1, 2, 4, 8, 16, 32, 64)


def int8_row_limit(dtype: torch.dtype, full_linear, shape: tuple[int, int] = (3072, 576)) -> int:
    """The most rows for which the int8 kernel beats the full-precision product in ``dtype`` (``full_linear``:
    ``weight -> (x -> x @ weight^T)``, the packed product the decode step uses) on this machine, timed once per
    process on a ``shape`` weight (0: never; the int8 copy is then not used). Measured rather than assumed: the answer
    differs by CPU and precision (8 rows in fp32 on AVX2 kernels, none in bf16 on an AVX-512 bf16 CPU:
    bench/RESULTS.md)."""
    if dtype not in _ROW_LIMITS:
        _ROW_LIMITS[dtype] = _probe_row_limit(dtype, full_linear, shape) if kernel_works() else 0
    return _ROW_LIMITS[dtype]


def _probe_row_limit(dtype: torch.dtype, full_linear, shape: tuple[int, int]) -> int:
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(*shape, generator=generator) * 0.02
    q, scales = quantize_rows(weight)
    full = full_linear(weight.to(dtype))
    ones = torch.ones(shape[0], dtype=torch.bfloat16)  # as Int8Projection runs the kernel: unit scales made once
    limit = 0
    for rows in _PROBE_ROWS:
        x = torch.randn(rows, shape[1], generator=generator)
        if _seconds(lambda: _int8_matmul(x, q, scales, ones)) >= _seconds(lambda: full(x.to(dtype))):
            break
        limit = rows
    return limit


def _seconds(work, repeats: int = 5) -> float:
    """The best of ``repeats`` timings of ``work()`` after one warm-up call (the least noisy on a busy CPU)."""
    work()
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - started)
    return best


class Int8Sampling:
    """What a generator sampling on int8 weights keeps: the quantized base weights, and the most rows a step
    sends to the int8 kernel (measured on first use)."""

    def __init__(self, max_rows: int | None = None):
        self.base = QuantizedBase()
        self._max_rows = max_rows

    def max_rows(self, dtype: torch.dtype, full_linear) -> int:
        """The row limit for ``dtype`` (:func:`int8_row_limit` against ``full_linear``), or the one given."""
        return int8_row_limit(dtype, full_linear) if self._max_rows is None else self._max_rows


class QuantizedBase:
    """The int8 copies of a model's frozen base weights, made once and reused while a weight is unchanged (keyed by
    the tensor and its in-place version: an optimizer step on a fully fine-tuned weight makes a new copy)."""

    def __init__(self):
        self.entries: dict[int, tuple[tuple, tuple[torch.Tensor, torch.Tensor]]] = {}

    def get(self, weights: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The int8 rows and scales of ``weights`` stacked along the output channels (a fused q/k/v or gate/up)."""
        key = id(weights[0])
        version = tuple((id(w), w.data_ptr(), w._version) for w in weights)
        if key not in self.entries or self.entries[key][0] != version:
            parts = [quantize_rows(w) for w in weights]
            self.entries[key] = (version, (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])))
        return self.entries[key][1]


class Int8Projection:
    """``x -> x @ W^T + b`` where ``W`` = the int8 base + the exact active LoRA deltas, for up to ``max_rows``
    rows; more rows go to ``full`` (the packed full-precision product of the merged weight).

    Args:
        full: the full-precision product (merged weights), for large batches and prefill.
        q, scales: the int8 base weight [N, K] and its per-row scales [N].
        bias: [N] or None.
        lora: ``(A [R, K], B [N, R])`` with the adapters' scaling folded into B (several adapters or fused
            modules stacked: B block-diagonal), or None.
        max_rows: the most rows the int8 kernel takes (:func:`int8_row_limit`).
        dtype: the compute dtype the result is returned in.
    """

    def __init__(self, full, q: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None, lora, max_rows: int,
                 dtype: torch.dtype):
        self.full, self.q, self.scales, self.bias, self.lora, self.max_rows, self.dtype = full, q, scales, bias, lora, max_rows, dtype
        self.ones = torch.ones(q.shape[0], dtype=torch.bfloat16)  # the kernel's unit scales, made once

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > self.max_rows:
            return self.full(x)
        out = _int8_matmul(x, self.q, self.scales, self.ones)
        if self.lora is not None:
            down, up = self.lora
            out = out + (x.float() @ down.T) @ up.T
        if self.bias is not None:
            out = out + self.bias.float()
        return out.to(self.dtype)


def lora_factors(modules: list) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The active LoRA adapters of ``modules`` (fused side by side along the output) as one ``(A, B)`` pair with
    ``sum of deltas == B @ A`` per module block: A [R, K] stacks every adapter's down projection, B [N, R] is
    block-diagonal over the modules with each adapter's scaling folded in. None when no module has one active."""
    downs, blocks, widths = [], [], [w.shape[0] for w in (_base_weight(m) for m in modules)]
    for index, module in enumerate(modules):
        if not hasattr(module, "lora_A") or module.disable_adapters or module.merged:
            continue
        for name in (n for n in module.active_adapters if n in module.lora_A):
            downs.append(module.lora_A[name].weight.detach().float())
            blocks.append((index, module.lora_B[name].weight.detach().float() * module.scaling[name]))
    if not downs:
        return None
    rank = sum(d.shape[0] for d in downs)
    up = torch.zeros(sum(widths), rank)
    column = 0
    for (index, block), down in zip(blocks, downs):
        row = sum(widths[:index])
        up[row: row + block.shape[0], column: column + down.shape[0]] = block
        column += down.shape[0]
    return torch.cat(downs), up


def _base_weight(module) -> torch.Tensor:
    return getattr(module, "base_layer", module).weight
