"""Text corpora for the mamba target: read with one-line errors, split into training and held-out documents.

A corpus is a list of documents, the unit that the held-out split draws (so no document is half
trained on and half measured):

* none given: the shipped corpus, Python's own documentation topics (``pydoc_data.topics``: 79
  topics, about 465k characters of English prose and examples, present wherever Python is);
* a folder: every ``*.txt`` file under it (sorted by path) is a document;
* a ``.jsonl`` file: the ``"text"`` of every line is a document;
* any other file: plain UTF-8 text whose paragraphs (separated by blank lines) are the documents.

:func:`split_documents` holds out about ``val_fraction`` of the characters: whole documents taken in
a seeded shuffle until they reach that share (at least one document each side).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

from palaestra.config.errors import ConfigError
from palaestra.data.jsonl import read_jsonl

__all__ = ["Corpus", "CorpusError", "Document", "read_corpus", "shipped_corpus", "split_documents", "write_corpus"]

SHIPPED = "python-docs"
"""The shipped corpus's name (tags, run folders)."""
_FORMS = "a .txt file, a folder of .txt files or a JSONL file of {\"text\"} lines"


class CorpusError(ConfigError):
    """A corpus is missing, unreadable, empty or too small to hold anything out; the message is one line."""


@dataclass(frozen=True)
class Document:
    title: str
    """Where it comes from: the topic, the file, ``file:line`` or ``file#paragraph``."""
    text: str


@dataclass
class Corpus:
    name: str
    """Short name for tags and run folders: the file's or folder's stem, or python-docs."""
    documents: list[Document]

    @property
    def characters(self) -> int:
        return sum(len(d.text) for d in self.documents)


def shipped_corpus() -> Corpus:
    """Python's documentation topics, one document per topic, in topic order."""
    from pydoc_data.topics import topics

    return Corpus(SHIPPED, [Document(title, topics[title].strip()) for title in sorted(topics)])


def write_corpus(folder: str | Path) -> Path:
    """Write the shipped corpus as a folder of ``<topic>.txt`` files (each renamed into place); return the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for document in shipped_corpus().documents:
        path = folder / f"{document.title}.txt"
        temporary = path.with_name(f".{path.name}.tmp")
        temporary.write_text(document.text + "\n", encoding="utf-8")
        temporary.replace(path)
    return folder


def read_corpus(path: str | Path | None) -> Corpus:
    """The documents of ``path`` (see the module docstring; None: the shipped corpus), blank ones dropped.

    Raises:
        CorpusError: the path does not exist, a file is not UTF-8, a JSONL line has no ``"text"``
            string, or no document has any text.
    """
    if path is None:
        return shipped_corpus()
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise CorpusError(f"algo.corpus={path} holds no .txt files; give {_FORMS}")
        documents = [Document(str(f.relative_to(path)), _read_text(f)) for f in files]
    elif path.suffix == ".jsonl":
        documents = []
        for where, row in read_jsonl(path, "corpus"):
            if not isinstance(row.get("text"), str):
                raise CorpusError(f"{where}: needs a \"text\" string; write one {{\"text\": ...}} object a line")
            documents.append(Document(where, row["text"]))
    elif path.is_file():
        paragraphs = re.split(r"\n[ \t\r]*\n", _read_text(path))
        documents = [Document(f"{path.name}#{i}", p) for i, p in enumerate(paragraphs, start=1)]
    else:
        raise CorpusError(f"algo.corpus={path} does not exist; give {_FORMS}")
    documents = [Document(d.title, d.text.strip()) for d in documents if d.text.strip()]
    if not documents:
        raise CorpusError(f"the corpus {path} is empty (no text); give {_FORMS}")
    return Corpus(path.stem or path.name, documents)


def split_documents(documents: list[Document], val_fraction: float, seed: int) -> tuple[list[Document], list[Document]]:
    """(training, held-out) documents, each list in corpus order.

    The held-out documents are the first ones of a seeded shuffle whose characters reach
    ``val_fraction`` of the corpus's, at least one and never all. One document cannot be split.
    """
    if len(documents) < 2:
        raise CorpusError(f"the corpus has {len(documents)} document; holding some out needs at least 2 "
                          "(more .txt files, JSONL lines, or paragraphs separated by blank lines)")
    order = list(range(len(documents)))
    random.Random(seed).shuffle(order)
    target = val_fraction * sum(len(d.text) for d in documents)
    held, characters = set(), 0
    for index in order[:-1]:  # the last of the shuffle always trains
        held.add(index)
        characters += len(documents[index].text)
        if characters >= target:
            break
    train = [d for i, d in enumerate(documents) if i not in held]
    return train, [d for i, d in enumerate(documents) if i in held]


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise CorpusError(f"corpus file {path} is not UTF-8 text (byte {error.start}); save it as UTF-8") from None
