"""The retrieval index's settings: the whole config of ``palaestra train algo=rag`` (the recipe:
:mod:`palaestra.recipes.rag`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from palaestra.config.choices import RETRIEVAL_MODES
from palaestra.config.errors import check, one_of
from palaestra.config.evaluation import CheckpointEval
from palaestra.config.run import RunSettings
from palaestra.config.tracking import TrackingConfig

__all__ = ["RagAlgo", "RagConfig", "validate_rag"]


@dataclass
class RagAlgo:
    """A retrieval index (MARK's RAG target): documents embedded into a FAISS index, measured on judged queries."""

    name: str = "rag"
    """Algorithm name (recipe)."""
    documents: Optional[str] = None
    """Documents JSONL ({"id", "text", "metadata"?} a line); None: the shipped FAQ set (datasets/retrieval/faq)."""
    queries: Optional[str] = None
    """Judged queries JSONL ({"id", "text", "relevant": [doc ids] or {doc id: grade}} a line); None: the FAQ set's
    when documents is None too; "" skips the evaluation."""
    embedder: str = "all-minilm-l6-v2"
    """Sentence-embedding model: all-minilm-l6-v2 (shipped offline, 384 dimensions) or a sentence-transformers folder."""
    mode: str = "dense"
    """dense (FAISS inner product over unit vectors), bm25 (lexical) or hybrid (both, reciprocal rank fusion)."""
    documents_per_step: int = 64
    """Documents embedded per step (the build resumes at a step boundary)."""
    ks: list = field(default_factory=lambda: [1, 3, 5, 10])
    """Cut-offs k of recall@k, mrr@k and ndcg@k."""
    rrf_k: int = 60
    """Reciprocal rank fusion constant of hybrid search: a document scores sum 1 / (rrf_k + rank)."""


@dataclass
class RagConfig:
    """``palaestra train algo=rag`` (MARK's RAG target): nothing is optimised, so the train section holds the
    run settings only; ``palaestra eval algo=rag eval.checkpoint=RUN`` searches a built index."""

    algo: RagAlgo = field(default_factory=lambda: RagAlgo())
    train: RunSettings = field(default_factory=RunSettings)
    eval: CheckpointEval = field(default_factory=CheckpointEval)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


def validate_rag(config: RagConfig) -> None:
    """rag's own keys (its shared sections are checked first): files that exist, a known mode, positive
    cut-offs (the files are parsed before the embedder loads)."""
    algo = config.algo
    one_of("algo.mode", algo.mode, RETRIEVAL_MODES)
    check(algo.documents_per_step > 0, f"algo.documents_per_step={algo.documents_per_step} must be positive")
    check(algo.rrf_k > 0, f"algo.rrf_k={algo.rrf_k} must be positive")
    check(bool(algo.ks) and all(isinstance(k, int) and k >= 1 for k in algo.ks),
           f"algo.ks={list(algo.ks)} must be positive whole numbers, e.g. [1,3,5,10]")
    for key in ("documents", "queries"):
        path = getattr(algo, key)
        check(not path or Path(path).is_file(), f"algo.{key}={path} does not exist; give a JSONL file")
    check(algo.documents is not None or not algo.queries,
           "algo.queries needs algo.documents (the shipped FAQ queries judge the FAQ documents only)")
