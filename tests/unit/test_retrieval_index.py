"""The retrieval index (dense / BM25 / hybrid), its folder, the embedder and the data readers."""

from __future__ import annotations

import json

import numpy as np
import pytest

from palaestra.config import ConfigError
from palaestra.retrieval.data import Document, RetrievalDataError, read_documents, read_queries
from palaestra.retrieval.index import IndexError_, RetrievalIndex, run_of
from palaestra.retrieval.metrics import retrieval_metrics

DOCS = [
    Document("power", "Check that the computer is plugged in, then hold the power button for ten seconds."),
    Document("sound", "Turn up the volume and make sure the right speakers are selected as the output device."),
    Document("galaxy", "The Andromeda Galaxy is the nearest large spiral galaxy to the Milky Way.", {"category": "science"}),
    Document("python", "Python is a programming language that lets you work quickly and integrate systems."),
]


@pytest.fixture(scope="module")
def embedder():
    from palaestra.retrieval.embedder import Embedder

    return Embedder()


def test_embeddings_are_384_dimensional_unit_vectors_and_similar_texts_are_close(embedder):
    vectors = embedder.encode(["my laptop will not switch on", "press and hold the power button", "a spiral galaxy"])
    assert vectors.shape == (3, 384) and vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2]


@pytest.mark.parametrize("mode", ["dense", "bm25", "hybrid"])
def test_each_mode_finds_the_right_document_and_survives_a_save_and_load(mode, embedder, tmp_path):
    index = RetrievalIndex.build(DOCS, embedder, mode)
    queries = ["my computer won't turn on, what about the power button?", "which galaxy is nearest to the Milky Way"]
    top = [hits[0].id for hits in index.search(queries, k=2)]
    assert top == ["power", "galaxy"]
    folder = index.save(tmp_path / "index")
    expected = {"documents.jsonl", "index.json"} | ({"index.faiss"} if mode != "bm25" else set()) | (
        {"bm25"} if mode != "dense" else set())
    assert {p.name for p in folder.iterdir()} == expected
    again = RetrievalIndex.load(folder, embedder)
    hits = again.search(queries, k=2)
    assert [h[0].id for h in hits] == top
    assert hits[1][0].metadata == {"category": "science"}
    assert [h.score for h in hits[0]] == pytest.approx([h.score for h in index.search(queries, k=2)[0]], abs=1e-5)


def test_save_replaces_an_older_index_and_leaves_no_temporary_folder(embedder, tmp_path):
    RetrievalIndex.build(DOCS[:2], embedder, "dense").save(tmp_path / "index")
    RetrievalIndex.build(DOCS, embedder, "dense").save(tmp_path / "index")
    assert len(RetrievalIndex.load(tmp_path / "index", embedder).documents) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index"]


def test_a_folder_that_is_no_index_or_incomplete_is_named(embedder, tmp_path):
    with pytest.raises(IndexError_, match="not a retrieval index"):
        RetrievalIndex.load(tmp_path)
    folder = RetrievalIndex.build(DOCS, embedder, "bm25").save(tmp_path / "index")
    (folder / "documents.jsonl").write_text(json.dumps({"id": "a", "text": "b", "metadata": {}}) + "\n")
    with pytest.raises(IndexError_, match="incomplete"):
        RetrievalIndex.load(folder)


def test_run_and_metrics_on_a_judged_query(embedder):
    index = RetrievalIndex.build(DOCS, embedder, "dense")
    queries = read_queries_from([{"id": "q", "text": "the speakers make no sound", "relevant": ["sound"]}])
    figures = retrieval_metrics(run_of(index, queries, 3), {"q": {"sound": 1}}, ks=(1, 3))
    assert figures["mrr@1"] == 1.0 and figures["ndcg@3"] == 1.0


def read_queries_from(records, tmp=None):
    import tempfile
    from pathlib import Path

    path = Path(tempfile.mkdtemp()) / "queries.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return read_queries(path)


@pytest.mark.parametrize(("content", "message"), [
    (None, "does not exist"),
    ("", "is empty"),
    ("{not json\n", "not valid JSON"),
    ('{"id": "a"}\n', "'text' is missing"),
    ('{"id": "a", "text": "x"}\n{"id": "a", "text": "y"}\n', "appears twice"),
    (b"\xff\xfe bad bytes", "not UTF-8"),
])
def test_bad_documents_files_get_one_line_naming_the_file(tmp_path, content, message):
    path = tmp_path / "docs.jsonl"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError, match=message) as error:  # RetrievalDataError is a ConfigError too
        read_documents(path)
    assert "\n" not in str(error.value) and "docs.jsonl" in str(error.value)


def test_queries_must_judge_known_documents(tmp_path):
    path = tmp_path / "queries.jsonl"
    path.write_text(json.dumps({"id": "q", "text": "t", "relevant": {"zzz": 1}}) + "\n")
    with pytest.raises(RetrievalDataError, match="'zzz' is not in the documents"):
        read_queries(path, {"a"})
    path.write_text(json.dumps({"id": "q", "text": "t", "relevant": []}) + "\n")
    with pytest.raises(RetrievalDataError, match="'relevant' must list"):
        read_queries(path)


def test_the_shipped_faq_set_is_consistent():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "datasets" / "retrieval" / "faq"
    documents = read_documents(root / "documents.jsonl")
    queries = read_queries(root / "queries.jsonl", {d.id for d in documents})
    assert len(documents) > 500 and len(queries) > 400
