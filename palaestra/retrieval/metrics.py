"""Retrieval metrics: recall@k, MRR@k and nDCG@k over ranked results and relevance judgements.

The definitions are trec_eval's (the reference every IR toolkit reproduces), so figures compare with
published ones and with ``ir-measures`` / ``pytrec-eval`` (tested against them on the same runs):

* results are ranked by score, highest first; equal scores are ordered by document id, *descending*
  (trec_eval's tie-break, which it applies whatever order the run file lists them in);
* a document is relevant when its judgement is >= 1;
* ``recall@k`` = relevant documents in the top k / relevant documents for the query;
* ``mrr@k`` (trec_eval's ``recip_rank`` cut at k) = 1 / rank of the first relevant document in the
  top k, 0 if there is none;
* ``ndcg@k`` = DCG@k / ideal DCG@k with gain = the judgement and discount log2(rank + 1); the ideal
  ranking sorts the query's judgements, highest first.

Each figure is the mean over the judged queries that have at least one relevant document; a judged
query missing from the results counts as 0.
"""

from __future__ import annotations

import math

__all__ = ["KS", "ranked", "retrieval_metrics"]

KS = (1, 3, 5, 10)
"""The cut-offs reported by default."""

Run = dict[str, dict[str, float]]  # query id -> document id -> score
Qrels = dict[str, dict[str, int]]  # query id -> document id -> judgement (0 = not relevant)


def ranked(scores: dict[str, float]) -> list[str]:
    """Document ids, best first; ties broken by document id, descending (as trec_eval does).

    >>> ranked({"a": 1.0, "b": 2.0, "c": 1.0})
    ['b', 'c', 'a']
    """
    return [doc for doc, _ in sorted(scores.items(), key=lambda item: (item[1], item[0]), reverse=True)]


def _query_figures(order: list[str], judgements: dict[str, int], ks: tuple[int, ...]) -> dict[str, float]:
    relevant = {doc for doc, grade in judgements.items() if grade >= 1}
    ideal = sorted((grade for grade in judgements.values() if grade >= 1), reverse=True)
    first = next((rank for rank, doc in enumerate(order, start=1) if doc in relevant), None)
    figures = {}
    for k in ks:
        top = order[:k]
        figures[f"recall@{k}"] = sum(doc in relevant for doc in top) / len(relevant)
        figures[f"mrr@{k}"] = 1.0 / first if first is not None and first <= k else 0.0
        dcg = sum(max(judgements.get(doc, 0), 0) / math.log2(rank + 1) for rank, doc in enumerate(top, start=1))
        best = sum(grade / math.log2(rank + 1) for rank, grade in enumerate(ideal[:k], start=1))
        figures[f"ndcg@{k}"] = dcg / best
    return figures


def retrieval_metrics(run: Run, qrels: Qrels, ks: tuple[int, ...] = KS) -> dict[str, float]:
    """Mean recall@k, mrr@k and ndcg@k over the judged queries (see the module docstring).

    >>> run = {"q1": {"d1": 0.9, "d2": 0.5, "d3": 0.1}, "q2": {"d1": 0.3, "d3": 0.2}}
    >>> qrels = {"q1": {"d2": 1}, "q2": {"d3": 2, "d2": 1}}
    >>> figures = retrieval_metrics(run, qrels, ks=(1, 3))
    >>> figures["mrr@3"], figures["recall@3"]   # q1: first hit at rank 2 -> 1/2; q2: rank 2 -> 1/2
    (0.5, 0.75)
    """
    if not ks or any(not isinstance(k, int) or k < 1 for k in ks):
        raise ValueError(f"cut-offs must be positive whole numbers, got {list(ks)}")
    judged = [query for query, judgements in qrels.items() if any(grade >= 1 for grade in judgements.values())]
    if not judged:
        raise ValueError("no query has a relevant document in the judgements")
    totals: dict[str, float] = {}
    for query in judged:
        figures = _query_figures(ranked(run.get(query, {})), qrels[query], ks)
        for name, value in figures.items():
            totals[name] = totals.get(name, 0.0) + value
    return {name: total / len(judged) for name, total in totals.items()}
