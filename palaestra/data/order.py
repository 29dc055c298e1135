"""The order a run takes its training items in: a seeded shuffle per epoch, resumable from a position."""

from __future__ import annotations

import random

__all__ = ["next_items"]


def next_items(items: list, position: int, count: int, seed: int) -> tuple[list, int]:
    """The next ``count`` items of a seeded shuffle per epoch; ``position`` counts the items consumed."""
    chosen = []
    while len(chosen) < count:
        epoch, offset = divmod(position, len(items))
        order = list(range(len(items)))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        take = order[offset : offset + count - len(chosen)]
        chosen.extend(items[i] for i in take)
        position += len(take)
    return chosen, position
