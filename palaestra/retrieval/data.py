"""Retrieval data: documents, queries and relevance judgements as JSONL, read with one-line errors.

* documents: one JSON object a line, ``{"id": str, "text": str, "metadata": {...}}`` (metadata
  optional); ids unique, texts non-empty.
* queries: ``{"id": str, "text": str, "relevant": {doc_id: grade} | [doc_id, ...]}``: the
  judgements travel with the query (a list means grade 1 each); every judged id must be a document.

``faq_retrieval_set`` writes the shipped set: real question/answer pairs of the English part of the
``chatterbot-corpus`` package (computers, AI, science, literature, psychology, money, ...). The
documents are the distinct answers; each distinct question is a query whose relevant documents are
the answers it is paired with. Trivia (one- or two-word answers that share no words or meaning with
the question) is left out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from palaestra.config.errors import ConfigError
from palaestra.data.jsonl import read_jsonl, write_jsonl

__all__ = ["Document", "Query", "RetrievalDataError", "faq_retrieval_set", "read_documents", "read_queries"]


class RetrievalDataError(ConfigError):
    """A documents or queries file is missing or malformed; the message names the file and line."""


@dataclass
class Document:
    id: str
    text: str
    metadata: dict = field(default_factory=dict)


@dataclass
class Query:
    id: str
    text: str
    relevant: dict[str, int]  # document id -> grade (>= 1 relevant)


def _records(path: str | Path, what: str):
    """(where, record) of every line, each with a non-empty id and text; an empty file is an error."""
    count = 0
    for where, record in read_jsonl(path, what):
        for key in ("id", "text"):
            if not isinstance(record.get(key), (str, int)) or not str(record.get(key)).strip():
                raise RetrievalDataError(f"{where}: '{key}' is missing or empty; every {what[:-1]} needs one")
        count += 1
        yield where, record
    if not count:
        raise RetrievalDataError(f"{what} file {path} is empty; it needs at least one {what[:-1]}")


def read_documents(path: str | Path) -> list[Document]:
    """The documents of a JSONL file (see the module docstring)."""
    documents, seen = [], set()
    for where, record in _records(path, "documents"):
        doc_id = str(record["id"])
        if doc_id in seen:
            raise RetrievalDataError(f"{where}: document id {doc_id!r} appears twice; ids must be unique")
        metadata = record.get("metadata") or {}
        if not isinstance(metadata, dict):
            raise RetrievalDataError(f"{where}: 'metadata' must be a JSON object")
        seen.add(doc_id)
        documents.append(Document(doc_id, str(record["text"]), metadata))
    return documents


def read_queries(path: str | Path, document_ids: set[str] | None = None) -> list[Query]:
    """The judged queries of a JSONL file; ``document_ids``: refuse judgements of unknown documents."""
    queries = []
    for where, record in _records(path, "queries"):
        relevant = record.get("relevant")
        if isinstance(relevant, list):
            relevant = {str(doc): 1 for doc in relevant}
        if not isinstance(relevant, dict) or not relevant:
            raise RetrievalDataError(f"{where}: 'relevant' must list the relevant document ids "
                                     "(a list, or an object id -> grade)")
        try:
            relevant = {str(doc): int(grade) for doc, grade in relevant.items()}
        except (TypeError, ValueError):
            raise RetrievalDataError(f"{where}: relevance grades must be whole numbers") from None
        if document_ids is not None:
            unknown = sorted(set(relevant) - document_ids)
            if unknown:
                raise RetrievalDataError(f"{where}: judged document {unknown[0]!r} is not in the documents file")
        queries.append(Query(str(record["id"]), str(record["text"]), relevant))
    return queries


_SKIPPED_CATEGORIES = {"trivia"}


def faq_retrieval_set(folder: str | Path) -> tuple[Path, Path]:
    """Write ``documents.jsonl`` and ``queries.jsonl`` of the FAQ set into ``folder``; return both paths."""
    import importlib.util

    import yaml

    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or not spec.submodule_search_locations:
        raise RetrievalDataError("the FAQ retrieval set needs the package 'chatterbot-corpus': pip install chatterbot-corpus")
    source = Path(list(spec.submodule_search_locations)[0]) / "data" / "english"
    answers: dict[str, dict] = {}  # answer text -> its document
    questions: dict[str, dict] = {}  # question text -> its query
    for path in sorted(source.glob("*.yml")):
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        category = (data.get("categories") or [path.stem])[0]
        if path.stem in _SKIPPED_CATEGORIES:
            continue
        for conversation in data.get("conversations") or []:
            if not isinstance(conversation, list) or len(conversation) < 2:
                continue
            question, answer = str(conversation[0]).strip(), str(conversation[1]).strip()
            if not question or not answer:
                continue
            document = answers.setdefault(answer, {"id": f"{path.stem}-{len(answers):04d}", "text": answer,
                                                   "metadata": {"category": category}})
            query = questions.setdefault(question, {"id": f"q{len(questions):04d}", "text": question, "relevant": []})
            if document["id"] not in query["relevant"]:
                query["relevant"].append(document["id"])
    return (write_jsonl(Path(folder) / "documents.jsonl", answers.values()),
            write_jsonl(Path(folder) / "queries.jsonl", questions.values()))
