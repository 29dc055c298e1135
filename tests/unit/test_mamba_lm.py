"""The mamba target's parts: corpora and their split, the BPE tokenizer and chunks, batches, perplexity, the scan."""

from __future__ import annotations

import doctest
import json
import math
import re

import pytest
import torch

from palaestra.config import ConfigError
from palaestra.language_model import corpus as corpus_module
from palaestra.language_model import tokenizer as tokenizer_module
from palaestra.language_model.corpus import Document, read_corpus, split_documents, write_corpus
from palaestra.language_model.model import (build_model, collate, freed_memory_kept, generate_samples, held_out_figures,
                                            parameter_groups, perplexity)
from palaestra.language_model.tokenizer import chunk, load_tokenizer, save_tokenizer, token_stream, train_tokenizer

TEXTS = [f"The {animal} {verb} the {other} in the {place}."
         for animal in ("cat", "dog", "bird") for verb in ("sees", "chases") for other in ("fox", "owl")
         for place in ("garden", "river")]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXTS, vocab_size=300, max_length=32)


def test_docstring_examples():
    for module in (corpus_module, tokenizer_module):
        assert doctest.testmod(module).failed == 0


# ---------------------------------------------------------------------------------------- config


def test_marks_defaults_and_one_line_config_errors(tmp_path):
    from palaestra.pipeline import compose_config

    config = compose_config(["algo=mamba"])
    algo, train = config.algo, config.train
    assert (algo.vocab_size, algo.d_model, algo.n_layers, algo.max_length, algo.corpus) == (5000, 256, 4, 512, None)
    assert (train.sequences_per_step, train.learning_rate, train.adam_beta2, train.weight_decay) == (8, 2e-3, 0.95, 0.1)
    for overrides, message in [
        (["algo.corpus=nowhere/"], "algo.corpus=nowhere/ does not exist"),
        (["algo.vocab_size=258"], "algo.vocab_size=258 must be > 258"),
        (["algo.val_fraction=0.5"], "algo.val_fraction=0.5 must be in (0, 0.5)"),
        (["algo.sample_prompts=['']"], "algo.sample_prompts=[''] must be non-empty strings"),
        (["train.sequences_per_forward=3"], "train.sequences_per_forward=3 must divide train.sequences_per_step=8"),
        (["train.best_metric=perplexity"], "mamba keeps the best by val_loss"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            compose_config(["algo=mamba", *overrides])
    from palaestra.jobs import compose_jobs, to_config

    for override in ("model=tiny", "train.steps=5", "train.eval_interval=2", "tracking.policy_id=p"):
        with pytest.raises(ConfigError, match="algo=mamba does not read"):
            to_config(compose_jobs(["algo=mamba", override])[0][1], check_values=False)
    to_config(compose_jobs(["algo=mamba", "algo.corpus=x", "train.sequences_per_step=4", "train.sequences_per_forward=2",
                            "train.learning_rate=1e-3", "train.seed=1", "train.output_dir=run", "tracking.experiment=lm",
                            "eval.checkpoint=x"])[0][1], check_values=False)


# ---------------------------------------------------------------------------------------- corpora


def test_the_shipped_corpus_is_pythons_documentation_and_can_be_written_as_a_folder(tmp_path):
    shipped = read_corpus(None)
    assert shipped.name == "python-docs" and len(shipped.documents) == 79 and shipped.characters > 400_000
    folder = read_corpus(write_corpus(tmp_path / "corpus"))
    assert sorted(d.text for d in folder.documents) == sorted(d.text for d in shipped.documents)  # a .txt file a topic


def test_a_folder_a_jsonl_file_and_a_text_file(tmp_path):
    (tmp_path / "books" / "b").mkdir(parents=True)
    (tmp_path / "books" / "b" / "two.txt").write_text("second\n")
    (tmp_path / "books" / "a.txt").write_text("  first  \n")
    (tmp_path / "books" / "blank.txt").write_text("\n \n")
    (tmp_path / "books" / "notes.md").write_text("not read")
    books = read_corpus(tmp_path / "books")
    assert books.name == "books" and [(d.title, d.text) for d in books.documents] == [("a.txt", "first"), ("b/two.txt", "second")]

    (tmp_path / "lines.jsonl").write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two", "id": 3}) + "\n")
    assert [d.text for d in read_corpus(tmp_path / "lines.jsonl").documents] == ["one", "two"]

    (tmp_path / "book.txt").write_text("Para one\nstill one.\n\nPara two.\n \n\n\nPara three.\r\n\r\nFour.")
    assert [d.text for d in read_corpus(tmp_path / "book.txt").documents] == ["Para one\nstill one.", "Para two.", "Para three.",
                                                                               "Four."]


@pytest.mark.parametrize("make, message", [
    (lambda p: p / "nowhere.txt", "nowhere.txt does not exist"),
    (lambda p: (p / "empty").mkdir() or p / "empty", "holds no .txt files"),
    (lambda p: (p / "latin.txt").write_bytes("caf\xe9".encode("latin-1")) and p / "latin.txt", "is not UTF-8 text (byte 3)"),
    (lambda p: (p / "blank.txt").write_text("\n\n  \n") and p / "blank.txt", "is empty (no text)"),
    (lambda p: (p / "bad.jsonl").write_text('{"body": "x"}\n') and p / "bad.jsonl", 'bad.jsonl:1: needs a "text" string'),
    (lambda p: (p / "broken.jsonl").write_text('{"text": \n') and p / "broken.jsonl", "broken.jsonl:1: not valid JSON"),
])
def test_corpus_mistakes_are_one_line_config_errors(tmp_path, make, message):
    with pytest.raises(ConfigError) as caught:
        read_corpus(make(tmp_path))
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_the_held_out_split_is_whole_documents_seeded_and_never_empty():
    documents = [Document(str(i), "x" * 10) for i in range(10)]  # 100 characters
    train, held = split_documents(documents, 0.25, seed=3)
    # whole documents until they reach 25% of 100 characters: 2 hold 20 (< 25), 3 hold 30
    assert (len(train), len(held)) == (7, 3)
    assert split_documents(documents, 0.25, seed=3) == (train, held)  # the seed alone fixes it ...
    assert split_documents(documents, 0.25, seed=4)[1] != held  # ... and another seed draws others
    assert sorted(train + held, key=lambda d: int(d.title)) == documents  # each in corpus order, every one once
    assert train == sorted(train, key=lambda d: int(d.title)) and held == sorted(held, key=lambda d: int(d.title))
    # two documents: one each side, whatever the fraction
    assert [len(part) for part in split_documents(documents[:2], 0.49, seed=0)] == [1, 1]
    with pytest.raises(ConfigError, match="the corpus has 1 document; holding some out needs at least 2"):
        split_documents(documents[:1], 0.1, seed=0)


# ------------------------------------------------------------------------------- tokenizer, chunks


def test_byte_level_bpe_is_lossless_deterministic_and_loads_with_auto_tokenizer(tokenizer, tmp_path):
    assert len(tokenizer) <= 300 and tokenizer.eos_token == "<|endoftext|>" and tokenizer.pad_token == "<|pad|>"
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id) == (0, 1)  # the special tokens come first
    unseen = "Zebras — naïve, 42 µs!\n\tend"  # not in the training text: byte-level BPE still encodes it exactly
    assert tokenizer.decode(tokenizer(unseen)["input_ids"]) == unseen
    assert len(tokenizer("The cat sees the fox")["input_ids"]) < len("The cat sees the fox")  # merges were learnt
    again = train_tokenizer(TEXTS, vocab_size=300, max_length=32)
    assert again.get_vocab() == tokenizer.get_vocab()
    loaded = load_tokenizer(save_tokenizer(tokenizer, tmp_path / "tokenizer"))
    assert loaded(unseen)["input_ids"] == tokenizer(unseen)["input_ids"] and loaded.pad_token_id == 1


def test_the_stream_ends_every_document_and_chunks_count_by_hand(tokenizer):
    texts = ["The cat sees the fox.", "The dog chases the owl."]
    stream = token_stream(tokenizer, texts)
    lengths = [len(tokenizer(t)["input_ids"]) for t in texts]
    assert len(stream) == sum(lengths) + 2 and stream[lengths[0]] == 0 and stream[-1] == 0  # <|endoftext|> after each
    ids = list(range(1000))
    # 1000 tokens in 64s: 15 full chunks (960 tokens) and a last one of 40
    assert [len(c) for c in chunk(ids, 64)] == [64] * 15 + [40]
    assert [len(c) for c in chunk(ids[:961], 64)] == [64] * 15  # a last chunk of 1 token predicts nothing: dropped
    assert sum(chunk(ids, 64), []) == ids


def test_a_batch_pads_on_the_right_and_counts_the_predicted_tokens():
    batch = collate([[5, 6, 7, 8, 9], [5, 6, 7]], pad_id=1)
    assert batch.input_ids.tolist() == [[5, 6, 7, 8, 9], [5, 6, 7, 1, 1]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert batch.labels.tolist() == [[5, 6, 7, 8, 9], [5, 6, 7, -100, -100]]
    assert batch.num_targets == 4 + 2  # every token but each chunk's first


# -------------------------------------------------------------------------------------- the model


def test_perplexity_is_exp_of_the_token_mean_loss(tokenizer):
    assert perplexity(0.0) == 1.0 and perplexity(math.log(300)) == pytest.approx(300)
    # zero embeddings (tied to the output layer) make every logit 0: a uniform guess over the V tokens,
    # loss ln V and perplexity V, whatever the text
    model = build_model(tokenizer, d_model=16, n_layers=1, seed=0)
    with torch.no_grad():
        model.get_input_embeddings().weight.zero_()
    figures = held_out_figures(model, [[5, 6, 7, 8], [9, 10]], batch_size=2, pad_id=1, device="cpu")
    vocab = len(tokenizer)
    assert figures["val_loss"] == pytest.approx(math.log(vocab), abs=1e-5)
    assert figures["perplexity"] == pytest.approx(vocab, rel=1e-4)


def test_held_out_loss_is_a_mean_over_tokens_however_the_chunks_are_batched(tokenizer):
    model = build_model(tokenizer, d_model=16, n_layers=2, seed=0)
    chunks = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [14, 15, 16, 17]]
    per_chunk = [held_out_figures(model, [c], batch_size=1, pad_id=1, device="cpu")["val_loss"] for c in chunks]
    # token-weighted: chunks of 6, 3 and 4 tokens predict 5, 2 and 3 tokens
    expected = (5 * per_chunk[0] + 2 * per_chunk[1] + 3 * per_chunk[2]) / 10
    for batch_size in (1, 2, 3):
        figures = held_out_figures(model, chunks, batch_size=batch_size, pad_id=1, device="cpu")
        assert figures["val_loss"] == pytest.approx(expected, abs=1e-5)
        assert figures["perplexity"] == pytest.approx(math.exp(expected), rel=1e-5)


def test_the_model_is_seeded_tied_and_decays_only_its_matrices(tokenizer):
    first, second = (build_model(tokenizer, d_model=16, n_layers=2, seed=7) for _ in range(2))
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
    assert first.lm_head.weight is first.get_input_embeddings().weight
    assert first.config.use_mambapy and first.config.vocab_size == len(tokenizer)
    decay, plain = parameter_groups(first, 0.1)
    names = {id(p): n for n, p in first.named_parameters()}
    assert decay["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert len(decay["params"]) + len(plain["params"]) == len(names)
    assert {names[id(p)].rsplit(".", 1)[-1] for p in plain["params"]} == {"A_log", "D", "bias", "weight"}  # norms: weight
    assert all(p.ndim >= 2 for p in decay["params"]) and not any(names[id(p)].endswith("A_log") for p in decay["params"])


def test_training_on_a_cpu_takes_the_parallel_scan_and_it_matches_the_sequential_loop(tokenizer, monkeypatch):
    import mambapy.pscan

    calls = []
    original = mambapy.pscan.pscan
    monkeypatch.setattr(mambapy.pscan, "pscan", lambda *args: calls.append(1) or original(*args))
    model = build_model(tokenizer, d_model=16, n_layers=2, seed=0)
    model.train()
    batch = collate([list(range(2, 40)), list(range(40, 60))], pad_id=1)
    parallel = model(input_ids=batch.input_ids, labels=batch.labels, use_cache=False).loss
    parallel.backward()
    assert len(calls) == 2  # once per layer, in training mode
    model.config.use_mambapy = False
    for layer in model.backbone.layers:
        layer.mixer.use_mambapy = False
    sequential = model(input_ids=batch.input_ids, labels=batch.labels, use_cache=False).loss
    assert len(calls) == 2 and float(parallel.detach()) == pytest.approx(float(sequential.detach()), abs=1e-5)


def test_samples_are_seeded_and_leave_the_runs_random_state_alone(tokenizer):
    model = build_model(tokenizer, d_model=16, n_layers=1, seed=0)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    rows = generate_samples(model, tokenizer, ["The cat"], max_new_tokens=5, temperature=1.0, seed=0, device="cpu")
    assert torch.equal(torch.get_rng_state(), state)
    assert rows == generate_samples(model, tokenizer, ["The cat"], max_new_tokens=5, temperature=1.0, seed=0, device="cpu")
    assert rows[0]["prompt"] == "The cat" and isinstance(rows[0]["completion"], str)
    greedy = generate_samples(model, tokenizer, ["The cat"], max_new_tokens=5, temperature=0.0, seed=0, device="cpu")
    assert len(tokenizer(greedy[0]["completion"])["input_ids"]) <= 5 + 1


def test_the_allocator_setting_holds_within_its_block_only():
    import sys

    with freed_memory_kept(enabled=False) as kept:
        assert kept is False
    with freed_memory_kept() as kept:
        assert kept is sys.platform.startswith("linux")  # glibc's mallopt took it
        for _ in range(3):  # the same large block, freed and taken again
            assert float(torch.ones(8 * 2**20).sum()) == 8 * 2**20
