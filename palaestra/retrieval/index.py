"""A retrieval index: dense (FAISS inner product over unit-length embeddings), lexical (BM25) or both.

``RetrievalIndex.build`` embeds the documents, adds them to a FAISS ``IndexFlatIP`` (exact search:
the inner product of unit vectors is their cosine) and, for ``mode="hybrid"``, builds a BM25 index
(``bm25s``) beside it. Hybrid search fuses the two rankings by reciprocal rank fusion (RRF: a
document's score is the sum over the rankings of 1 / (rrf_k + rank)), which needs no calibration
between cosine and BM25 scores.

``save`` writes the folder atomically (a temporary folder renamed into place): ``index.faiss``,
``documents.jsonl``, ``index.json`` (embedder, dimensions, counts, mode) and ``bm25/``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from palaestra.config.choices import RETRIEVAL_MODES as MODES
from palaestra.retrieval.data import Document
from palaestra.retrieval.embedder import Embedder

__all__ = ["MODES", "IndexError_", "RetrievalIndex", "SearchHit", "evaluate_index", "run_of"]

logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its "loading the AVX2 build" lines are noise
_FORMAT = 1


class IndexError_(ValueError):  # noqa: N801 - IndexError is a builtin
    """An index folder is missing, incomplete or of another format; the message says what to do."""


@dataclass
class SearchHit:
    """One retrieved document: its id, score (cosine, BM25 or fused), text and metadata."""

    id: str
    score: float
    text: str
    metadata: dict


def _bm25_tokens(texts: list[str]):
    import bm25s

    return bm25s.tokenize(texts, stopwords="en", show_progress=False)


class RetrievalIndex:
    """Documents searchable by meaning (dense), by words (BM25) or both (hybrid, RRF)."""

    def __init__(self, documents: list[Document], embedder: Embedder | None, dense, bm25, mode: str, rrf_k: int = 60):
        self.documents, self.embedder, self.dense, self.bm25, self.mode, self.rrf_k = documents, embedder, dense, bm25, mode, rrf_k

    # ------------------------------------------------------------------------------------ building

    @classmethod
    def build(cls, documents: list[Document], embedder: Embedder | None, mode: str = "dense", rrf_k: int = 60,
              show_progress: bool = False) -> "RetrievalIndex":
        if mode not in MODES:
            raise ValueError(f"index mode {mode!r} is unknown; use one of {', '.join(MODES)}")
        vectors = None
        if mode in ("dense", "hybrid"):
            vectors = embedder.encode([d.text for d in documents], show_progress=show_progress)
        return cls.from_vectors(documents, vectors, embedder, mode, rrf_k)

    @classmethod
    def from_vectors(cls, documents: list[Document], vectors: np.ndarray | None, embedder: Embedder | None,
                     mode: str = "dense", rrf_k: int = 60) -> "RetrievalIndex":
        """The index of ``documents`` whose embeddings [n, dim] (unit length) are already computed
        (None for ``mode="bm25"``)."""
        if not documents:
            raise ValueError("no documents to index")
        dense = bm25 = None
        if mode in ("dense", "hybrid"):
            import faiss

            dense = faiss.IndexFlatIP(vectors.shape[1])
            dense.add(np.ascontiguousarray(vectors, dtype=np.float32))
        if mode in ("bm25", "hybrid"):
            import bm25s

            bm25 = bm25s.BM25()
            bm25.index(_bm25_tokens([d.text for d in documents]), show_progress=False)
        return cls(documents, embedder if dense is not None else None, dense, bm25, mode, rrf_k)

    # ------------------------------------------------------------------------------------ searching

    def search(self, queries: list[str], k: int = 10) -> list[list[SearchHit]]:
        """The ``k`` best documents for each query, best first."""
        if k < 1:
            raise ValueError(f"k={k} must be >= 1")
        scores = self.scores(queries, k)
        hits = []
        for per_query in scores:
            ranked = sorted(per_query.items(), key=lambda item: item[1], reverse=True)[:k]
            hits.append([SearchHit(self.documents[i].id, score, self.documents[i].text, self.documents[i].metadata)
                         for i, score in ranked])
        return hits

    def scores(self, queries: list[str], k: int) -> list[dict[int, float]]:
        """Per query: document position -> score for the top ``k`` (dense, BM25 or fused)."""
        depth = min(len(self.documents), max(k, 100) if self.mode == "hybrid" else k)  # fusion looks deeper
        dense = self._dense(queries, depth) if self.dense is not None else None
        lexical = self._bm25(queries, depth) if self.bm25 is not None else None
        if self.mode == "dense":
            return dense
        if self.mode == "bm25":
            return lexical
        fused = []
        for rankings in zip(dense, lexical):
            total: dict[int, float] = {}
            for ranking in rankings:
                for rank, doc in enumerate(sorted(ranking, key=ranking.get, reverse=True), start=1):
                    total[doc] = total.get(doc, 0.0) + 1.0 / (self.rrf_k + rank)
            fused.append(total)
        return fused

    def _dense(self, queries: list[str], depth: int) -> list[dict[int, float]]:
        vectors = self.embedder.encode(queries)
        values, positions = self.dense.search(vectors, depth)
        return [{int(p): float(v) for p, v in zip(row_p, row_v) if p >= 0} for row_p, row_v in zip(positions, values)]

    def _bm25(self, queries: list[str], depth: int) -> list[dict[int, float]]:
        positions, values = self.bm25.retrieve(_bm25_tokens(queries), k=depth, show_progress=False, n_threads=1)
        return [{int(p): float(v) for p, v in zip(row_p, row_v) if v > 0} for row_p, row_v in zip(positions, values)]

    # ------------------------------------------------------------------------------------ storing

    def save(self, folder: str | Path) -> Path:
        """Write the index into ``folder`` atomically (replacing an older index there)."""
        folder = Path(folder)
        temporary = folder.with_name(f".{folder.name}.tmp")
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir(parents=True)
        if self.dense is not None:
            import faiss

            faiss.write_index(self.dense, str(temporary / "index.faiss"))
        if self.bm25 is not None:
            self.bm25.save(str(temporary / "bm25"), show_progress=False)
        with open(temporary / "documents.jsonl", "w", encoding="utf-8") as handle:
            for document in self.documents:
                handle.write(json.dumps(asdict(document), ensure_ascii=False) + "\n")
        meta = {"format": _FORMAT, "mode": self.mode, "rrf_k": self.rrf_k, "documents": len(self.documents),
                "embedder": self.embedder.name if self.embedder else None,
                "dimensions": self.dense.d if self.dense is not None else None}
        (temporary / "index.json").write_text(json.dumps(meta, indent=2))
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(folder, old)
            os.replace(temporary, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(temporary, folder)
        return folder

    @classmethod
    def load(cls, folder: str | Path, embedder: Embedder | None = None, device: str = "cpu") -> "RetrievalIndex":
        """Open an index folder written by :meth:`save` (its embedder is loaded unless given)."""
        folder = Path(folder)
        meta_path = folder / "index.json"
        if not meta_path.is_file():
            raise IndexError_(f"{folder} is not a retrieval index (no index.json); build one with palaestra train --target=rag")
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError:
            raise IndexError_(f"{meta_path} is corrupt (not JSON); rebuild the index") from None
        if meta.get("format") != _FORMAT or meta.get("mode") not in MODES:
            raise IndexError_(f"{folder} holds an index of another format ({meta.get('format')}); rebuild it")
        documents = [Document(**json.loads(line)) for line in (folder / "documents.jsonl").read_text(encoding="utf-8").splitlines() if line]
        dense = bm25 = None
        if meta["mode"] in ("dense", "hybrid"):
            import faiss

            dense = faiss.read_index(str(folder / "index.faiss"))
            embedder = embedder or Embedder(meta["embedder"], device=device)
        if meta["mode"] in ("bm25", "hybrid"):
            import bm25s

            bm25 = bm25s.BM25.load(str(folder / "bm25"), show_progress=False)
        if len(documents) != meta["documents"] or (dense is not None and dense.ntotal != len(documents)):
            raise IndexError_(f"{folder} is incomplete ({len(documents)} documents for {meta['documents']}); rebuild it")
        return cls(documents, embedder, dense, bm25, meta["mode"], meta.get("rrf_k", 60))


def evaluate_index(index: RetrievalIndex, queries: list, ks: list[int]) -> dict[str, float]:
    """recall@k, mrr@k and ndcg@k of ``index`` on judged ``queries`` (objects with id, text, relevant)."""
    from palaestra.retrieval.metrics import retrieval_metrics

    return retrieval_metrics(run_of(index, queries, max(ks)), {q.id: q.relevant for q in queries}, tuple(ks))


def run_of(index: RetrievalIndex, queries, k: int) -> dict[str, dict[str, float]]:
    """The ``{query id: {document id: score}}`` run of ``queries`` (objects with ``id`` and ``text``)."""
    scores = index.scores([q.text for q in queries], k)
    return {q.id: {index.documents[i].id: s for i, s in sorted(per.items(), key=lambda x: x[1], reverse=True)[:k]}
            for q, per in zip(queries, scores)}
