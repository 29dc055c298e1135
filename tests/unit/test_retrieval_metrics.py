"""Retrieval metrics: hand-checked figures, and equality with ir-measures (trec_eval) on the same runs."""

from __future__ import annotations

import math
import random

import pytest

from palaestra.retrieval.metrics import ranked, retrieval_metrics


def test_figures_by_hand_with_graded_judgements():
    run = {"q": {"a": 0.9, "b": 0.8, "c": 0.7, "d": 0.6}}
    qrels = {"q": {"b": 2, "d": 1, "z": 1}}  # z is never retrieved
    figures = retrieval_metrics(run, qrels, ks=(1, 3))
    # ranks: a b c d; relevant b (2), d (1), z (1)
    assert figures["recall@1"] == 0.0 and figures["recall@3"] == pytest.approx(1 / 3)
    assert figures["mrr@1"] == 0.0 and figures["mrr@3"] == 0.5
    # DCG@3 = 2/log2(3); ideal DCG@3 = 2/log2(2) + 1/log2(3) + 1/log2(4)
    ideal = 2 + 1 / math.log2(3) + 1 / 2
    assert figures["ndcg@3"] == pytest.approx((2 / math.log2(3)) / ideal)


def test_ties_are_broken_by_document_id_descending_whatever_the_input_order():
    assert ranked({"d1": 1.0, "d3": 1.0, "d2": 1.0}) == ["d3", "d2", "d1"]
    run = {"q": {"d1": 0.5, "d2": 0.5}}
    assert retrieval_metrics(run, {"q": {"d1": 1}}, ks=(1,))["mrr@1"] == 0.0  # d2 ranks first
    assert retrieval_metrics(run, {"q": {"d2": 1}}, ks=(1,))["mrr@1"] == 1.0


def test_unjudged_queries_are_skipped_and_missing_results_count_zero():
    qrels = {"q1": {"a": 1}, "q2": {"b": 1}, "q3": {"c": 0}}
    figures = retrieval_metrics({"q1": {"a": 1.0}}, qrels, ks=(1,))
    assert figures["recall@1"] == 0.5  # q1 found, q2 has no results, q3 has nothing relevant


@pytest.mark.parametrize("bad", [(0,), (), (1.5,)])
def test_bad_cut_offs_are_refused(bad):
    with pytest.raises(ValueError, match="cut-offs"):
        retrieval_metrics({"q": {"a": 1.0}}, {"q": {"a": 1}}, ks=bad)


def test_equal_to_ir_measures_on_random_runs_with_ties_and_grades():
    ir_measures = pytest.importorskip("ir_measures")
    rng = random.Random(0)
    docs = [f"d{i:02d}" for i in range(30)]
    run, qrels = {}, {}
    for q in range(40):
        query = f"q{q}"
        # scores on a coarse grid: many ties; graded judgements 0-3
        run[query] = {doc: round(rng.random() * 4) / 4 for doc in rng.sample(docs, rng.randint(5, 25))}
        judged = rng.sample(docs, rng.randint(1, 6))
        qrels[query] = {doc: rng.choice([0, 1, 1, 2, 3]) for doc in judged}
        if not any(qrels[query].values()):
            qrels[query][judged[0]] = 1
    ours = retrieval_metrics(run, qrels, ks=(1, 3, 5, 10))
    names = {f"recall@{k}": ir_measures.R @ k for k in (1, 3, 5, 10)}
    names |= {f"ndcg@{k}": ir_measures.nDCG @ k for k in (1, 3, 5, 10)}
    # ir-measures averages over the queries present in both run and judgements: every query here is
    theirs = ir_measures.pytrec_eval.calc_aggregate(list(names.values()), qrels, run)
    for name, measure in names.items():
        assert ours[name] == pytest.approx(theirs[measure], abs=1e-9), name
    # trec_eval's recip_rank has no cut-off (ir-measures hands RR@k to another tool, which breaks
    # ties by input order): compare mrr@k with trec_eval's recip_rank on each run's top k
    for k in (1, 3, 5, 10):
        top_k = {query: {doc: scores[doc] for doc in ranked(scores)[:k]} for query, scores in run.items()}
        theirs = ir_measures.pytrec_eval.calc_aggregate([ir_measures.RR], qrels, top_k)
        assert ours[f"mrr@{k}"] == pytest.approx(theirs[ir_measures.RR], abs=1e-9), k
