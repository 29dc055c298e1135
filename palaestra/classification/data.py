"""Labelled text for the classifier target: JSONL ``{"text", "label"}`` splits, read with one-line errors.

* A folder holds ``train.jsonl``, ``val.jsonl`` and (optionally) ``test.jsonl``; one JSONL file is
  split into train / validation / test by a seeded shuffle, ``val_fraction`` each for validation
  and test.
* ``label`` is a label name (any string) or a whole number 0..N-1. The label names, in order, are
  ``labels`` when given, else the sorted names found in the training split; every split must use
  exactly those, and there must be ``num_labels`` of them.

``topic_classification_set`` writes the shipped set: real utterances of the English part of the
``chatterbot-corpus`` package, labelled by the category they come from: ai, emotion and psychology
(what a chatbot says about artificial intelligence, about feelings and about the mind; close enough
that a linear probe on sentence embeddings gets about 0.78 of them right, so fine-tuning has work).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from palaestra.config.errors import ConfigError
from palaestra.data.jsonl import read_jsonl, write_jsonl

__all__ = [
    "ClassificationData",
    "ClassificationDataError",
    "LabelledText",
    "TOPIC_LABELS",
    "load_classification_data",
    "read_labelled",
    "topic_classification_set",
]

TOPIC_LABELS = ("ai", "emotion", "psychology")
"""The shipped set's labels: three chatterbot-corpus categories."""


class ClassificationDataError(ConfigError):
    """A labelled-text file is missing or malformed, or its labels do not fit; the message is one line."""


@dataclass(frozen=True)
class LabelledText:
    text: str
    label: int
    """Index into :attr:`ClassificationData.labels`."""


@dataclass
class ClassificationData:
    """The three splits and the label names (index = the model's class id)."""

    train: list[LabelledText]
    val: list[LabelledText]
    test: list[LabelledText]
    labels: list[str]
    name: str
    """Short name for tags and run names: the folder's or file's name."""


def read_labelled(path: str | Path) -> list[tuple[str, str, str | int]]:
    """``(where, text, label)`` of every line of a JSONL file, texts non-empty; an empty file is an error."""
    rows = []
    for where, record in read_jsonl(path, "labelled text"):
        text, label = record.get("text"), record.get("label")
        if not isinstance(text, str) or not text.strip():
            raise ClassificationDataError(f"{where}: 'text' is missing or empty; every line needs {{\"text\", \"label\"}}")
        if isinstance(label, bool) or not isinstance(label, (str, int)) or (isinstance(label, str) and not label.strip()):
            raise ClassificationDataError(f"{where}: 'label' must be a label name or a whole number, got {label!r}")
        rows.append((where, text.strip(), label))
    if not rows:
        raise ClassificationDataError(f"labelled text file {path} is empty; it needs one {{\"text\", \"label\"}} object a line")
    return rows


def load_classification_data(path: str | Path, *, num_labels: int, labels: list[str] | None = None,
                             val_fraction: float = 0.1, seed: int = 0) -> ClassificationData:
    """The splits of a folder (train/val/test.jsonl) or of one JSONL file (split here); see the module docstring."""
    path = Path(path)
    if path.is_dir():
        for needed in ("train.jsonl", "val.jsonl"):
            if not (path / needed).is_file():
                raise ClassificationDataError(f"{path / needed} is missing; a data folder holds train.jsonl, val.jsonl "
                                              "and optionally test.jsonl")
        splits = [read_labelled(path / "train.jsonl"), read_labelled(path / "val.jsonl")]
        splits.append(read_labelled(path / "test.jsonl") if (path / "test.jsonl").is_file() else [])
    else:
        rows = read_labelled(path)
        held_out = max(1, round(len(rows) * val_fraction))
        if len(rows) < 2 * held_out + 1:
            raise ClassificationDataError(f"{path} has {len(rows)} examples, too few to hold out {held_out} for validation "
                                          "and test; give more, or a folder with train.jsonl and val.jsonl")
        random.Random(seed).shuffle(rows)
        splits = [rows[2 * held_out:], rows[:held_out], rows[held_out : 2 * held_out]]
    names = _label_names(splits[0], num_labels, labels)
    index = {name: i for i, name in enumerate(names)}
    train, val, test = ([LabelledText(text, _label_index(where, label, index)) for where, text, label in rows] for rows in splits)
    return ClassificationData(train, val, test, names, path.stem if path.is_file() else path.name)


def _label_names(train_rows, num_labels: int, labels: list[str] | None) -> list[str]:
    """The label names in class-id order: ``labels``, else the training split's names (or 0..N-1 for numbers)."""
    if labels:
        if len(labels) != num_labels:
            raise ClassificationDataError(f"algo.labels has {len(labels)} names but algo.num_labels={num_labels}; "
                                          "give one name per label")
        return [str(name) for name in labels]
    found = {label for _, _, label in train_rows}
    if all(isinstance(label, int) for label in found):
        return [str(i) for i in range(num_labels)]
    if any(isinstance(label, int) for label in found):
        raise ClassificationDataError("the training labels mix names and numbers; use one or the other")
    if len(found) != num_labels:
        shown = ", ".join(sorted(found)[:6]) + (", ..." if len(found) > 6 else "")
        raise ClassificationDataError(f"the training split has {len(found)} labels ({shown}) but algo.num_labels={num_labels}; "
                                      f"set algo.num_labels={len(found)}")
    return sorted(found)


def _label_index(where: str, label: str | int, index: dict[str, int]) -> int:
    if isinstance(label, int):
        if not 0 <= label < len(index):
            raise ClassificationDataError(f"{where}: label {label} is out of range; numbered labels go from 0 to {len(index) - 1}")
        return label
    if label not in index:
        raise ClassificationDataError(f"{where}: label {label!r} is not one of the labels ({', '.join(index)})")
    return index[label]


def topic_classification_set(folder: str | Path, *, seed: int = 0, held_out_fraction: float = 0.15) -> Path:
    """Write ``train/val/test.jsonl`` of the shipped topic set into ``folder`` (stratified split); return it.

    Every distinct utterance (question or answer) of the chatterbot-corpus categories of
    :data:`TOPIC_LABELS`, labelled by its category; utterances of two characters or fewer ("7",
    "Ok") carry no topic and are left out, and so is one that appears in two categories.
    """
    import importlib.util

    import yaml

    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or not spec.submodule_search_locations:
        raise ClassificationDataError("the topic set needs the package 'chatterbot-corpus': pip install chatterbot-corpus")
    source = Path(list(spec.submodule_search_locations)[0]) / "data" / "english"
    category_of: dict[str, set[str]] = {}
    for label in TOPIC_LABELS:
        data = yaml.safe_load((source / f"{label}.yml").read_text(encoding="utf-8"))
        for conversation in data.get("conversations") or []:
            for utterance in conversation if isinstance(conversation, list) else []:
                text = " ".join(str(utterance).split())
                if len(text) > 2:
                    category_of.setdefault(text, set()).add(label)
    splits: dict[str, list[dict]] = {"train": [], "val": [], "test": []}
    for label in TOPIC_LABELS:
        texts = sorted(text for text, found in category_of.items() if found == {label})
        random.Random(f"{seed}-{label}").shuffle(texts)
        held_out = round(len(texts) * held_out_fraction)
        parts = {"val": texts[:held_out], "test": texts[held_out : 2 * held_out], "train": texts[2 * held_out :]}
        for split, chosen in parts.items():
            splits[split] += [{"text": text, "label": label} for text in chosen]
    for split, records in splits.items():
        random.Random(f"{seed}-{split}").shuffle(records)
        write_jsonl(Path(folder) / f"{split}.jsonl", records)
    return Path(folder)
