"""The classifier target's building blocks: labelled-text reading, label checks, figures, batches."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from palaestra.classification.data import ClassificationDataError, load_classification_data, topic_classification_set
from palaestra.classification.metrics import classification_figures, confusion
from palaestra.config import ConfigError


def _write(path: Path, rows: list[tuple[str, object]]) -> Path:
    path.write_text("".join(json.dumps({"text": t, "label": label}) + "\n" for t, label in rows))
    return path


def _folder(root: Path, train, val, test=None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    _write(root / "train.jsonl", train)
    _write(root / "val.jsonl", val)
    if test is not None:
        _write(root / "test.jsonl", test)
    return root


TRAIN = [("the printer is jammed", "hardware"), ("I was charged twice", "billing"), ("reset my password", "account"),
         ("my card was declined", "billing")]


def test_a_folder_gives_three_splits_with_sorted_label_names(tmp_path):
    data = load_classification_data(_folder(tmp_path / "d", TRAIN, [("screen is black", "hardware")],
                                            [("refund please", "billing")]), num_labels=3)
    assert data.labels == ["account", "billing", "hardware"]  # sorted: class ids 0, 1, 2
    assert [x.label for x in data.train] == [2, 1, 0, 1]
    assert [x.label for x in data.val] == [2] and [x.label for x in data.test] == [1]
    assert data.name == "d"


def test_given_label_names_fix_the_class_ids(tmp_path):
    data = load_classification_data(_folder(tmp_path / "d", TRAIN, TRAIN[:1]), num_labels=3,
                                    labels=["billing", "hardware", "account"])
    assert [x.label for x in data.train] == [1, 0, 2, 0] and data.test == []


def test_numbered_labels_are_class_ids(tmp_path):
    rows = [("a b", 0), ("c d", 1), ("e f", 2), ("g h", 1)]
    data = load_classification_data(_folder(tmp_path / "d", rows, rows[:2]), num_labels=3)
    assert data.labels == ["0", "1", "2"] and [x.label for x in data.train] == [0, 1, 2, 1]


def test_one_file_is_split_by_a_seeded_shuffle(tmp_path):
    rows = [(f"text {i}", "ab"[i % 2]) for i in range(20)]
    first = load_classification_data(_write(tmp_path / "all.jsonl", rows), num_labels=2, val_fraction=0.1, seed=3)
    again = load_classification_data(tmp_path / "all.jsonl", num_labels=2, val_fraction=0.1, seed=3)
    assert (len(first.train), len(first.val), len(first.test)) == (16, 2, 2)  # round(20 * 0.1) = 2 each
    assert first == again
    texts = [x.text for x in first.train + first.val + first.test]
    assert sorted(texts) == sorted(t for t, _ in rows)  # every example lands in exactly one split


@pytest.mark.parametrize("rows, num_labels, message", [
    (TRAIN, 2, "the training split has 3 labels (account, billing, hardware) but algo.num_labels=2; set algo.num_labels=3"),
    ([("x", "a"), ("y", 1)], 2, "mix names and numbers"),
    ([("", "a")], 2, "'text' is missing or empty"),
    ([("x", None)], 2, "'label' must be a label name or a whole number"),
    ([("x", True)], 2, "'label' must be a label name or a whole number"),
])
def test_bad_training_labels_are_one_line_errors(tmp_path, rows, num_labels, message):
    with pytest.raises(ClassificationDataError, match="^[^\n]*" + message.replace("(", r"\(").replace(")", r"\)")):
        load_classification_data(_folder(tmp_path / "d", rows, [("z", "a")]), num_labels=num_labels)


def test_a_validation_label_unknown_to_training_is_named_with_its_line(tmp_path):
    folder = _folder(tmp_path / "d", TRAIN, [("ok", "billing"), ("new one", "shipping")])
    with pytest.raises(ClassificationDataError, match=r"val.jsonl:2: label 'shipping' is not one of the labels"):
        load_classification_data(folder, num_labels=3)


def test_missing_empty_and_tiny_inputs(tmp_path):
    with pytest.raises(ClassificationDataError, match="val.jsonl is missing"):
        load_classification_data(_missing_val(tmp_path / "m"), num_labels=3)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ClassificationDataError, match="is empty"):
        load_classification_data(tmp_path / "empty.jsonl", num_labels=2)
    with pytest.raises(ClassificationDataError, match="too few to hold out"):
        load_classification_data(_write(tmp_path / "two.jsonl", [("a", "x"), ("b", "y")]), num_labels=2)
    (tmp_path / "latin1.jsonl").write_bytes('{"text": "caf\xe9", "label": "a"}\n'.encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_classification_data(tmp_path / "latin1.jsonl", num_labels=2)


def _missing_val(folder: Path) -> Path:
    folder.mkdir(parents=True)
    _write(folder / "train.jsonl", TRAIN)
    return folder


def test_figures_by_hand():
    # true 0 0 1 2 / predicted 0 1 1 2: 3 of 4 right.
    # F1 per label: 0 -> P 1/1, R 1/2 -> 2/3; 1 -> P 1/2, R 1/1 -> 2/3; 2 -> 1. Macro: (2/3 + 2/3 + 1) / 3 = 7/9.
    figures = classification_figures([0, 0, 1, 2], [0, 1, 1, 2], 3)
    assert figures["accuracy"] == 0.75 and figures["macro_f1"] == pytest.approx(7 / 9)
    # a label that is neither present nor predicted scores F1 0: (1 + 1 + 0) / 3
    assert classification_figures([0, 1], [0, 1], 3)["macro_f1"] == pytest.approx(2 / 3)
    assert confusion([0, 0, 1, 2], [0, 1, 1, 2], 3).tolist() == [[1, 1, 0], [0, 1, 0], [0, 0, 1]]


def test_batches_pad_to_bucketed_widths_and_keep_positions():
    from transformers import AutoTokenizer

    from palaestra.classification.model import encode_batches
    from palaestra.retrieval.embedder import embedded_embedder_dir

    tokenizer = AutoTokenizer.from_pretrained(str(embedded_embedder_dir()))
    texts = ["short", "a somewhat longer text than the first", "x " * 40]
    batches = encode_batches(tokenizer, texts, [0, 1, 2], [2, 0, 1], batch_size=2, max_length=32)
    assert [b.positions for b in batches] == [[2, 0], [1]]
    assert batches[0].input_ids.shape == (2, 32)  # 42 tokens truncated to max_length 32
    assert batches[1].input_ids.shape[1] == 16  # 9 tokens ([CLS] ... [SEP]) padded up to the bucket of 16 (8, 16, 24, ...)
    assert batches[1].attention_mask.sum() == len(tokenizer(texts[1])["input_ids"])
    assert batches[0].labels.tolist() == [2, 0]


def test_the_shipped_topic_set_is_stratified_and_disjoint(tmp_path):
    folder = topic_classification_set(tmp_path / "topics")
    data = load_classification_data(folder, num_labels=3)
    assert data.labels == ["ai", "emotion", "psychology"]
    splits = [{x.text for x in split} for split in (data.train, data.val, data.test)]
    assert not (splits[0] & splits[1] or splits[0] & splits[2] or splits[1] & splits[2])
    assert len(data.val) == len(data.test) and min(len(s) for s in splits) > 50
    # the same as the copy the repository ships
    shipped = Path(__file__).resolve().parents[2] / "datasets" / "classification" / "topics"
    for name in ("train.jsonl", "val.jsonl", "test.jsonl"):
        assert (folder / name).read_text() == (shipped / name).read_text()


def test_an_install_without_the_datasets_folder_rebuilds_the_shipped_set_in_the_cache(tmp_path, monkeypatch):
    import palaestra.data.shipped as shipped

    monkeypatch.setattr(shipped, "REPOSITORY_DATASETS", tmp_path / "no-checkout")
    monkeypatch.setenv("PALAESTRA_CACHE", str(tmp_path / "cache"))
    calls = []
    first = shipped.shipped_dataset("classification/topics", lambda folder: calls.append(topic_classification_set(folder)))
    again = shipped.shipped_dataset("classification/topics", lambda folder: calls.append(folder))
    assert first == again == tmp_path / "cache" / "datasets" / "classification" / "topics" and len(calls) == 1
    repository = Path(__file__).resolve().parents[2] / "datasets" / "classification" / "topics"
    assert (first / "train.jsonl").read_text() == (repository / "train.jsonl").read_text()
