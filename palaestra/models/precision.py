"""Compute precision: fp32, or bf16 autocast over fp32 weights (mixed precision).

``auto`` picks bf16 where the hardware runs bf16 matrix multiplies natively — a CUDA GPU with
bf16 support, or a CPU with AMX or AVX512-BF16 — and fp32 elsewhere. Weights, optimizer state and
the loss stay in fp32; only the forward passes (generation, log-probs) run their matmuls in bf16.
On a 2-core AMX CPU it took the main job's GRPO step from about 13 s to about 7.7 s
(bench/RESULTS.md, the main-job entry).
"""

from __future__ import annotations

import os
from contextlib import nullcontext

import torch

from palaestra.config.choices import PRECISIONS


_BELOW_AVX512 = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2")
"""oneDNN ISA caps (``ONEDNN_MAX_CPU_ISA``) under which it has no native bf16 kernel."""


def kernels_capped_below_avx512(environ=os.environ) -> bool:
    """Whether ``environ`` restricts oneDNN (``ONEDNN_MAX_CPU_ISA``) or ATen (``ATEN_CPU_CAPABILITY``) to AVX2 or
    less: bf16 is emulated then, as on an AVX2-only CPU, whatever the CPU has.

    >>> kernels_capped_below_avx512({"ONEDNN_MAX_CPU_ISA": "AVX2"}), kernels_capped_below_avx512({})
    (True, False)
    """
    return (environ.get("ONEDNN_MAX_CPU_ISA", "").upper() in _BELOW_AVX512
            or environ.get("ATEN_CPU_CAPABILITY", "").lower() in ("default", "avx2"))


def bf16_is_fast(device: str) -> bool:
    """Whether ``device`` multiplies bf16 matrices in hardware: a CUDA GPU with bf16, or a CPU with AMX or
    AVX512-BF16 whose kernels are not capped below AVX-512 (:func:`kernels_capped_below_avx512`)."""
    if device.startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if kernels_capped_below_avx512():
        return False
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(cpu, name, lambda: False)() for name in checks)


def resolve_precision(precision: str, device: str) -> str:
    """"auto" -> "bf16" or "fp32" for this device; "bf16" and "fp32" are returned as they are."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is unknown; use one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "bf16" if bf16_is_fast(device) else "fp32"
    return precision


def autocast(precision: str, device: str | torch.device):
    """A fresh context manager running forward passes at ``precision`` ("bf16" or "fp32")."""
    if precision == "bf16":
        return torch.autocast(device_type="cuda" if str(device).startswith("cuda") else "cpu", dtype=torch.bfloat16)
    return nullcontext()


def weights_dtype(dtype: str, precision: str, lora: bool) -> str:
    """The dtype to load weights in: ``dtype``, or for "auto" bfloat16 when a LoRA run computes in
    bf16 (the frozen base never needs fp32 then: half the memory, no per-call casts) and float32
    otherwise (full fine-tuning keeps fp32 master weights)."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if precision == "bf16" and lora else "float32"
