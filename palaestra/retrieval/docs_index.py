"""A shipped search index over Python's documentation, for agents that answer by searching.

The documents are the prose paragraphs of the Python Language Reference as the standard library
carries them (``pydoc_data.topics``, the text behind ``help("topic")``, the same text the shipped QA
set's passages come from): one document per paragraph, whitespace normalised, at least 20 words;
grammar rules (``::=``), code examples and tables are left out, and a paragraph that several topics
repeat is kept once. The index is lexical (BM25), so it needs no embedding model: it is built from
the standard library on first use (a few seconds) into ``$PALAESTRA_CACHE/datasets/retrieval/
python_docs_index`` and opened from there afterwards.

    >>> from palaestra.retrieval.index import RetrievalIndex
    >>> index = RetrievalIndex.load(shipped_docs_index())                      # doctest: +SKIP
    >>> print(search_docs(index, "Which exception does a bare raise give?"))   # doctest: +SKIP
    [1] If no expressions are present, "raise" re-raises the exception that is currently being handled ...
"""

from __future__ import annotations

import re
from pathlib import Path

from palaestra.retrieval.data import Document

__all__ = ["DOCS_INDEX", "MIN_WORDS", "docs_documents", "search_docs", "shipped_docs_index"]

DOCS_INDEX = "retrieval/python_docs_index"
"""The index folder under ``datasets/`` (of the checkout) or ``$PALAESTRA_CACHE/datasets``."""
MIN_WORDS = 20
"""A paragraph shorter than this (a heading, a one-line remark) is not a document."""
_TABLE_LINE = re.compile(r"^\s*(\+-|\|)", flags=re.MULTILINE)


def _is_prose(paragraph: str) -> bool:
    """Not a grammar rule, a table or a code example (``>>>``, or lines indented more than one way
    after the first: a list item's hanging indent is one way, a code block's nesting is several).

    >>> _is_prose("1. The first item of a list,\\n   wrapped with a hanging indent.")
    True
    >>> _is_prose("   for i in range(3):\\n       print(i)\\n   else:\\n       pass")
    False
    """
    lines = [line for line in paragraph.splitlines() if line.strip()]
    indents = {len(line) - len(line.lstrip()) for line in lines[1:]}
    return "::=" not in paragraph and ">>>" not in paragraph and len(indents) <= 1 and not _TABLE_LINE.search(paragraph)


def docs_documents() -> list[Document]:
    """The prose paragraphs of ``pydoc_data.topics.topics``, topics in sorted order; ids ``"{topic}-{n}"``
    (``n`` counts the topic's documents from 0), metadata ``{"topic": topic}``."""
    import pydoc_data.topics

    documents, seen = [], set()
    for topic, text in sorted(pydoc_data.topics.topics.items()):
        count = 0
        for paragraph in text.split("\n\n"):
            normalised = " ".join(paragraph.split())
            if len(normalised.split()) < MIN_WORDS or normalised in seen or not _is_prose(paragraph):
                continue
            seen.add(normalised)
            documents.append(Document(f"{topic}-{count}", normalised, {"topic": topic}))
            count += 1
    return documents


def write_docs_index(folder: Path) -> Path:
    """Build the BM25 index of :func:`docs_documents` and save it into ``folder`` (atomically)."""
    from palaestra.retrieval.index import RetrievalIndex

    return RetrievalIndex.build(docs_documents(), None, mode="bm25").save(folder)


def shipped_docs_index() -> Path:
    """The folder of the Python-docs BM25 index (open it with ``RetrievalIndex.load``), built on first use."""
    from palaestra.data.shipped import shipped_dataset

    return shipped_dataset(DOCS_INDEX, write_docs_index)


def _shortened(text: str, limit: int) -> str:
    """``text`` cut at the last word boundary within ``limit`` characters, marked with " ...".

    >>> _shortened("one two three", 9), _shortened("one two", 9)
    ('one two ...', 'one two')
    """
    if len(text) <= limit:
        return text
    cut = text[:limit + 1].rsplit(" ", 1)[0] if " " in text[:limit + 1] else text[:limit]
    return cut.rstrip() + " ..."


def search_docs(index, query: str, k: int = 2, max_chars: int = 400) -> str:
    """The ``k`` best documents of ``index`` (a :class:`~palaestra.retrieval.index.RetrievalIndex`) for
    ``query`` as plain text for a model to read: ``[1] text`` per hit, one hit a line, each text cut to
    ``max_chars`` characters at a word boundary; "No results." when nothing matches."""
    hits = index.search([query], k=k)[0]
    if not hits:
        return "No results."
    return "\n".join(f"[{number}] {_shortened(hit.text, max_chars)}" for number, hit in enumerate(hits, start=1))
