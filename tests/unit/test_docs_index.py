"""The shipped Python-docs search index: its documents, its cache, what it finds and how hits read."""

import pytest

from palaestra.retrieval.data import Document
from palaestra.retrieval.docs_index import MIN_WORDS, _is_prose, docs_documents, search_docs, shipped_docs_index
from palaestra.retrieval.index import RetrievalIndex
from palaestra.tasks.qa import QUESTIONS


@pytest.fixture(scope="module")
def documents():
    return docs_documents()


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PALAESTRA_CACHE", str(cache))
        folder = shipped_docs_index()
    assert folder == cache / "datasets" / "retrieval" / "python_docs_index"  # built into the cache, not the checkout
    return RetrievalIndex.load(folder)


def test_documents_are_the_prose_paragraphs_of_the_pydoc_topics(documents):
    import pydoc_data.topics

    assert len(documents) > 500
    assert len({d.id for d in documents}) == len(documents) == len({d.text for d in documents})
    for document in documents:
        topic = document.metadata["topic"]
        assert document.id.rsplit("-", 1) == [topic, document.id.rsplit("-", 1)[1]]
        assert len(document.text.split()) >= MIN_WORDS and "::=" not in document.text and ">>>" not in document.text
        assert document.text == " ".join(document.text.split())  # whitespace normalised
        assert document.text in " ".join(pydoc_data.topics.topics[topic].split())  # a real paragraph of its topic
    by_id = {d.id: d for d in documents}
    assert by_id["assert-0"].text.startswith("These equivalences assume that \"__debug__\"")


def test_code_examples_and_tables_are_not_prose():
    assert _is_prose("* A bullet that wraps\n  onto a second line with a hanging indent.")
    assert not _is_prose("   >>> 1 + 1\n   2")
    assert not _is_prose("   class C:\n       x = 3\n   c = C()")
    assert not _is_prose("+------+------+\n| Op   | Hint |\n+------+------+")
    assert not _is_prose('   for_stmt ::= "for" target_list "in" starred_list ":" suite')


def test_the_index_is_built_once_and_reopened(tmp_path, monkeypatch):
    monkeypatch.setenv("PALAESTRA_CACHE", str(tmp_path))
    folder = shipped_docs_index()
    stamp = (folder / "index.json").stat().st_mtime_ns
    assert shipped_docs_index() == folder and (folder / "index.json").stat().st_mtime_ns == stamp
    assert RetrievalIndex.load(folder).mode == "bm25"
    assert sorted(p.name for p in folder.parent.iterdir()) == ["python_docs_index"]  # no temporary folder left


def test_most_qa_questions_find_their_answer_in_the_top_two_hits(index):
    # Measured on Python 3.11: 31 of the 38 questions (82%) have a hit holding the gold answer
    # (28 the question's own passage; the other 3, checked by hand, answer it in another paragraph).
    found = [any(answer in hit.text for hit in index.search([question], k=2)[0]) for _, question, answer in QUESTIONS]
    assert sum(found) / len(found) >= 0.75
    assert found[QUESTIONS.index(("raise", "Which exception does a bare raise give when there is no active exception?",
                                  "RuntimeError"))]


def test_search_docs_numbers_the_hits_and_cuts_long_texts_at_a_word():
    documents = [Document("long", "power " + "word " * 200), Document("short", "the power button is on the left side")]
    index = RetrievalIndex.build(documents, None, mode="bm25")
    text = search_docs(index, "power button", k=2)
    first, second = text.split("\n")
    assert second == "[2] power" + " word" * 79 + " ..."  # 5 + 79 * 5 = 400 characters: the last whole word fits
    assert first == "[1] the power button is on the left side"
    assert len(second) <= len("[2] ") + 400 + len(" ...")
    assert search_docs(index, "power button", k=1) == first
    assert search_docs(index, "galaxy") == "No results."
