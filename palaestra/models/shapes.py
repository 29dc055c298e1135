"""Tensor lengths rounded up to a few sizes, so that a CPU run meets a bounded set of matrix shapes.

Why: on a CPU, PyTorch multiplies bf16 (and packed fp32) matrices with oneDNN, which builds a
*primitive* for every new shape it sees and keeps it in a process-wide cache (1024 entries by
default). A primitive for a linear layer holds its own copy of the weight in the layout it needs,
so every new token count M costs about one weight's worth of memory per layer kind, forward and
backward — for the LM head of a 135M model about 56 MB — plus a few milliseconds to build it.

An RL step meets new token counts all the time: packed rows, prompt widths and completion lengths
change with every batch. Left alone, the cache grows by tens of MB per step until it holds 1024
one-off primitives (several GB), and most of a training forward's primitives are built anew each
step. Rounding every such length up to one of eight sizes per octave (at most 12.5% padding) keeps
the set of shapes small: the cache stops growing after the first steps and later steps find their
primitives built. ``bench/memory.py`` measures the effect.
"""

from __future__ import annotations

__all__ = ["bucket_length"]


def bucket_length(length: int, minimum: int = 16) -> int:
    """``length`` rounded up to a multiple of an eighth of its octave, and of ``minimum``.

    A length in [2**k, 2**(k+1)) lands on one of 8 sizes (at most 1/8 padding) from 128 on; below
    that, on a multiple of ``minimum``.

    >>> [bucket_length(n) for n in (1, 16, 17, 100, 127, 128, 129, 430, 1000)]
    [16, 16, 32, 112, 128, 128, 144, 448, 1024]
    """
    step = max(minimum, 1 << max(0, length.bit_length() - 4))  # 2**(k-3) for 2**k <= length < 2**(k+1)
    return max(minimum, -(-length // step) * step)
