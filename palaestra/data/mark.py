"""MARK's data preparation: the corpora its pipeline's stages read, written into one folder.

``prepare_mark_data(folder)`` writes, from sources that ship offline:

* ``classification/``: the labelled topic set (train/val/test JSONL) the classifier stage fine-tunes on;
* ``corpus/``: the text corpus the Mamba stage trains its tokenizer and model on (Python's documentation
  topics, a ``.txt`` file each);
* ``retrieval/``: the FAQ documents and judged queries the RAG stage indexes and measures.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["prepare_mark_data"]


def prepare_mark_data(folder: str | Path) -> Path:
    """Write the three corpora into ``folder`` (each file atomically); return the folder."""
    from palaestra.classification.data import topic_classification_set
    from palaestra.language_model.corpus import write_corpus
    from palaestra.retrieval.data import faq_retrieval_set

    folder = Path(folder)
    topic_classification_set(folder / "classification")
    faq_retrieval_set(folder / "retrieval")
    write_corpus(folder / "corpus")
    return folder
