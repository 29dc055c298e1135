"""Chat data for SFT: loading and its errors, assistant-only labels, truncation, batches and packing.

The tiny model's tokenizer is byte-level (one token per byte, the ChatML markers one token each),
so the positions below can be counted by hand.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from palaestra.config import ChatData, ConfigError
from palaestra.data import (
    IGNORE_INDEX,
    collate,
    dataset_version,
    load_chat_data,
    pack_examples,
    read_chat_jsonl,
    summed_token_loss,
    to_messages,
    tokenize_conversation,
)
from palaestra.models import build_tiny_model
from palaestra.planner.data import make_planner_dataset

USER_HI = {"role": "user", "content": "Hi"}
ANSWER_YO = {"role": "assistant", "content": "Yo"}


@pytest.fixture(scope="module")
def tiny():
    model, tokenizer = build_tiny_model()
    return model.float().eval(), tokenizer


def _write(path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def _chat(i: int) -> dict:
    return {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}


# ------------------------------------------------------------------------------------------ loading


def test_prompt_completion_rows_become_messages():
    system = {"role": "system", "content": "S"}
    assert to_messages({"prompt": [system, USER_HI], "completion": "Yo"}) == [system, USER_HI, ANSWER_YO]
    assert to_messages({"prompt": "Hi", "completion": [ANSWER_YO]}) == [USER_HI, ANSWER_YO]
    assert to_messages({"messages": [USER_HI, {**ANSWER_YO, "extra": 1}]}) == [USER_HI, ANSWER_YO]


@pytest.mark.parametrize("row, message", [
    ({"messages": [USER_HI]}, "no assistant turn"),
    ({"messages": []}, "non-empty list"),
    ({"messages": [{"role": "robot", "content": "x"}, ANSWER_YO]}, "each message needs a role"),
    ({"prompt": "Hi"}, 'needs "messages" or "prompt" and "completion"'),
    ([1, 2], "must be a JSON object"),
])
def test_bad_rows_are_one_line_errors_naming_the_row(row, message):
    with pytest.raises(ConfigError, match=message) as error:
        to_messages(row, "f.jsonl:7")
    assert str(error.value).startswith("f.jsonl:7: ") and "\n" not in str(error.value)


def test_bad_json_names_file_and_line(tmp_path):
    path = _write(tmp_path / "train.jsonl", [_chat(0), "", '{"messages": [oops'])
    with pytest.raises(ConfigError, match=r"train\.jsonl:3: not valid JSON"):
        read_chat_jsonl(path)
    with pytest.raises(ConfigError, match="chat data file .*missing.jsonl does not exist"):
        read_chat_jsonl(tmp_path / "missing.jsonl")
    (tmp_path / "latin1.jsonl").write_bytes('{"prompt": "caf\xe9", "completion": "ok"}\n'.encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1\.jsonl is not UTF-8 text \(byte 15\); save it as UTF-8"):
        read_chat_jsonl(tmp_path / "latin1.jsonl")


def test_folder_without_val_file_holds_out_the_end_of_train(tmp_path):
    folder = tmp_path / "2026-03-01"
    folder.mkdir()
    _write(folder / "train.jsonl", [_chat(i) for i in range(10)])
    data = load_chat_data(ChatData(path=str(folder), val_fraction=0.2))
    # ceil(10 * 0.2) = 2 held out: the last two conversations, in file order; no test file -> empty
    assert [c[0]["content"] for c in data.val] == ["q8", "q9"]
    assert len(data.train) == 8 and data.test == [] and data.version == "2026-03-01"


def test_folder_splits_and_version_override(tmp_path):
    folder = make_planner_dataset(tmp_path, date="2026-02-02", n_train=5, n_val=2, n_test=3)
    data = load_chat_data(ChatData(path=str(folder)))
    assert (len(data.train), len(data.val), len(data.test)) == (5, 2, 3)
    assert [m["role"] for m in data.train[0]] == ["system", "user", "assistant"]
    assert load_chat_data(ChatData(path=str(folder), version="v7")).version == "v7"


def test_single_file_is_split_by_val_fraction(tmp_path):
    path = _write(tmp_path / "chats.jsonl", [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(20)])
    data = load_chat_data(ChatData(path=path, val_fraction=0.1))
    assert (len(data.train), len(data.val), data.version) == (18, 2, "chats")


def test_missing_files_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_chat_data(ChatData(path=str(tmp_path / "nowhere")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="train.jsonl does not exist"):
        load_chat_data(ChatData(path=str(tmp_path / "empty")))
    with pytest.raises(ConfigError, match="at least 2"):
        load_chat_data(ChatData(path=_write(tmp_path / "one.jsonl", [_chat(0)])))


def test_dataset_version_names():
    assert dataset_version("datasets/planner/2026-11-22") == "2026-11-22"
    assert dataset_version("data/my_chats") == "my_chats"
    assert dataset_version("data/my_chats.jsonl") == "my_chats"


# -------------------------------------------------------------------------------------------- labels


def test_only_assistant_tokens_are_labelled(tiny):
    _, tokenizer = tiny
    example = tokenize_conversation(tokenizer, [USER_HI, ANSWER_YO], max_length=100)
    # "<|im_start|>" "user" "\n" "Hi" "<|im_end|>" "\n" = 1+4+1+2+1+1 = 10 tokens,
    # "<|im_start|>" "assistant" "\n" = 1+9+1 = 11 tokens (the generation prompt) -> the answer starts at 21;
    # "Yo" "<|im_end|>" "\n" = 4 answer tokens (the end-of-turn marker is learnt too): 25 in all
    assert len(example) == 25
    assert example.labels[:21] == [IGNORE_INDEX] * 21
    assert example.labels[21:] == example.input_ids[21:]
    assert tokenizer.decode(example.input_ids[21:]) == "Yo<|im_end|>\n"
    assert example.num_targets == 4


def test_every_assistant_turn_is_labelled_and_only_those(tiny):
    _, tokenizer = tiny
    messages = [USER_HI, ANSWER_YO, {"role": "user", "content": "Ok"}, {"role": "assistant", "content": "Z"}]
    example = tokenize_conversation(tokenizer, messages, max_length=200)
    scored = tokenizer.decode([t for t, label in zip(example.input_ids, example.labels) if label != IGNORE_INDEX])
    assert scored == "Yo<|im_end|>\nZ<|im_end|>\n"


def test_all_tokens_scored_without_assistant_only(tiny):
    _, tokenizer = tiny
    example = tokenize_conversation(tokenizer, [USER_HI, ANSWER_YO], max_length=100, assistant_only=False)
    assert example.labels[0] == IGNORE_INDEX and example.labels[1:] == example.input_ids[1:]


def test_token_merged_across_the_boundary_uses_character_offsets():
    # a vocabulary token "\nY" swallows the end of the generation prompt and the answer's first
    # character, so the prompt alone does not tokenise as a prefix of the conversation
    _, tokenizer = build_tiny_model(vocab=["\nY"])
    example = tokenize_conversation(tokenizer, [USER_HI, ANSWER_YO], max_length=100)
    tokens = tokenizer.convert_ids_to_tokens(example.input_ids)
    scored = [tok for tok, label in zip(tokens, example.labels) if label != IGNORE_INDEX]
    assert scored == ["\nY", "o", "<|im_end|>", "Ċ"]  # the straddling token counts as the answer's


def test_truncation_drops_the_prompt_from_the_left(tiny):
    _, tokenizer = tiny
    full = tokenize_conversation(tokenizer, [USER_HI, ANSWER_YO], max_length=100)
    cut = tokenize_conversation(tokenizer, [USER_HI, ANSWER_YO], max_length=10)
    assert cut.input_ids == full.input_ids[-10:]
    # the 4 answer tokens survive at the end; the first label is ignored as always
    assert cut.labels == [IGNORE_INDEX] * 6 + full.input_ids[-4:]


# ---------------------------------------------------------------------------------- batches, packing


def test_summed_token_loss_by_hand():
    # uniform logits over 4 tokens: each scored token costs ln 4; label[0] is never read (shift)
    logits = torch.zeros(1, 4, 4)
    labels = torch.tensor([[2, IGNORE_INDEX, 1, 3]])
    total, count = summed_token_loss(logits, labels)
    assert count == 2 and math.isclose(float(total), 2 * math.log(4), rel_tol=1e-6)


def test_unpacked_batch_pads_right_with_ignored_labels(tiny):
    _, tokenizer = tiny
    short = tokenize_conversation(tokenizer, [USER_HI, ANSWER_YO], max_length=100)
    long = tokenize_conversation(tokenizer, [{"role": "user", "content": "Hello"}, ANSWER_YO], max_length=100)
    batch = collate([[short], [long]], tokenizer.pad_token_id, packed=False)
    # "Hello" is 3 bytes longer than "Hi": rows of 25 and 28 tokens, padded to the bucketed width 32
    assert batch.input_ids.shape == (2, 32)
    assert batch.input_ids[0, 25:].tolist() == [tokenizer.pad_token_id] * 7
    assert batch.input_ids[1, 28:].tolist() == [tokenizer.pad_token_id] * 4
    assert batch.labels[0, 25:].tolist() == [IGNORE_INDEX] * 7
    inputs = batch.model_inputs("cpu")
    assert inputs["attention_mask"].tolist()[0] == [1] * 25 + [0] * 7
    assert batch.num_targets == 8


def test_packed_row_positions_restart_and_mask_is_block_diagonal(tiny):
    _, tokenizer = tiny
    a = tokenize_conversation(tokenizer, [USER_HI, ANSWER_YO], max_length=100)
    b = tokenize_conversation(tokenizer, [USER_HI, {"role": "assistant", "content": "Y"}], max_length=100)
    batch = collate([[a, b]], tokenizer.pad_token_id, packed=True)
    # 25 + 24 tokens, padded to the bucketed width 64: the padding's positions go on from 0
    assert batch.position_ids[0].tolist() == list(range(25)) + list(range(24)) + list(range(15))
    mask = batch.model_inputs("cpu")["attention_mask"]
    assert mask.shape == (1, 1, 64, 64)
    visible = mask[0, 0] == 0
    assert visible[30, 25:31].all() and not visible[30, :25].any()  # b's tokens see b only, causally
    assert not visible[30, 31:].any()
    assert not visible[48, 49:].any() and not visible[:49, 49:].any()  # nothing real sees the padding


def _loss(model, batch) -> tuple[float, int]:
    with torch.no_grad():
        logits = model(**batch.model_inputs("cpu", torch.float32)).logits
    total, count = summed_token_loss(logits, batch.labels)
    return float(total), count


@pytest.mark.parametrize("assistant_only", [True, False])
def test_packed_loss_equals_the_examples_run_alone(tiny, assistant_only):
    model, tokenizer = tiny
    conversations = [
        [USER_HI, ANSWER_YO],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
        [{"role": "user", "content": "Name a colour"}, {"role": "assistant", "content": "teal, or maybe blue"}],
        [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}, {"role": "user", "content": "z"},
         {"role": "assistant", "content": "w!"}],
    ]
    examples = [tokenize_conversation(tokenizer, m, max_length=80, assistant_only=assistant_only) for m in conversations]
    alone = [_loss(model, collate([[e]], tokenizer.pad_token_id, packed=False)) for e in examples]
    expected = sum(t for t, _ in alone) / sum(n for _, n in alone)  # token mean over all examples

    bins = pack_examples([len(e) for e in examples], max_length=80)
    assert len(bins) < len(examples)  # some rows really hold several examples
    packed = collate([[examples[i] for i in group] for group in bins], tokenizer.pad_token_id, packed=True)
    total, count = _loss(model, packed)
    assert count == sum(n for _, n in alone)
    assert abs(total / count - expected) < 1e-5

    padded = collate([[e] for e in examples], tokenizer.pad_token_id, packed=False)  # right padding, 2D mask
    total, count = _loss(model, padded)
    assert abs(total / count - expected) < 1e-5


def test_pack_examples_refuses_an_overlong_example():
    with pytest.raises(ValueError, match="more than max_length"):
        pack_examples([3, 9], max_length=8)
