"""Preference data: the planner's pair generator, the JSONL loaders, tokenising and batching, the reward-model loss."""

from __future__ import annotations

import doctest
import importlib
import json
import random
from types import SimpleNamespace

import pytest
import torch

from palaestra.config import ConfigError
from palaestra.data.preferences import (
    PreferencePair,
    batch_for_step,
    collate_pairs,
    encode_pair,
    encode_prompt_response,
    identical_pairs,
    load_preference_file,
    load_preference_splits,
    prompt_ids,
)
from palaestra.models import build_tiny_model
from palaestra.planner.data import load_planner_split, make_planner_dataset
from palaestra.planner.preferences import CORRUPTIONS, corrupt_plan, make_preference_pairs, plan_problems


@pytest.fixture(scope="module")
def planner_folder(tmp_path_factory):
    return make_planner_dataset(tmp_path_factory.mktemp("planner"), date="2026-02-03", n_train=60, n_val=12, n_test=12)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_model()[1]


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("name", ["palaestra.planner.preferences", "palaestra.data.preferences"])
def test_docstring_examples(name):
    assert doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS).failed == 0


# ------------------------------------------------------------------------------------- planner pairs


def test_every_rejected_plan_breaks_a_check_and_every_chosen_plan_passes(planner_folder):
    for split in ("train", "val"):
        examples = load_planner_split(planner_folder, split)
        pairs = _rows(planner_folder / f"preferences_{split}.jsonl")
        assert len(pairs) == len(examples)
        for pair, example in zip(pairs, examples):
            assert pair["messages"] == example["messages"][:2]  # system + user, no answer
            assert pair["chosen"] == example["messages"][2]["content"]
            assert plan_problems(pair["chosen"], example) == []
            assert plan_problems(pair["rejected"], example), pair
            assert pair["kind"] in CORRUPTIONS


def test_each_corruption_breaks_the_check_it_names(planner_folder):
    examples = load_planner_split(planner_folder, "train")
    expected = {  # corruption -> words of the problem it must cause
        "restricted_recipe": "break restrictions", "slow_recipe": "min", "extra_meal": "meals, asked for",
        "missing_meal": "meals, asked for", "over_budget": "over budget", "unknown_recipe": "unknown recipes",
        "wrong_cost": "stated cost", "invalid_json": "unparseable",
    }
    rng = random.Random(0)
    applied = {name: 0 for name in CORRUPTIONS}
    for example in examples:
        for name, corrupt in CORRUPTIONS.items():
            rejected = corrupt(example, rng)
            if rejected is None:
                continue
            applied[name] += 1
            problems = plan_problems(rejected, example)
            assert any(expected[name] in problem for problem in problems), (name, problems)
    assert all(applied.values()), applied  # every corruption applies to some planner example


def test_pairs_are_reproducible_and_seeded(planner_folder):
    examples = load_planner_split(planner_folder, "train")
    assert make_preference_pairs(examples, seed=5) == make_preference_pairs(examples, seed=5)
    assert make_preference_pairs(examples, seed=5) != make_preference_pairs(examples, seed=6)
    kinds = {pair["kind"] for pair in make_preference_pairs(examples, seed=5)}
    assert len(kinds) >= 6  # the RNG spreads the corruptions


def test_dataset_folder_is_reproducible_and_chat_splits_do_not_change(tmp_path):
    with_pairs = make_planner_dataset(tmp_path / "a", date="2026-02-03", n_train=20, n_val=5, n_test=5)
    again = make_planner_dataset(tmp_path / "b", date="2026-02-03", n_train=20, n_val=5, n_test=5)
    without = make_planner_dataset(tmp_path / "c", date="2026-02-03", n_train=20, n_val=5, n_test=5, preferences=False)
    for name in ("train.jsonl", "val.jsonl", "test.jsonl", "manifest.json"):
        assert (with_pairs / name).read_bytes() == (without / name).read_bytes() == (again / name).read_bytes()
    for name in ("preferences_train.jsonl", "preferences_val.jsonl"):
        assert (with_pairs / name).read_bytes() == (again / name).read_bytes()
        assert not (without / name).exists()


def test_no_preference_pair_comes_from_the_test_split(planner_folder):
    user = {split: {row["messages"][1]["content"] for row in load_planner_split(planner_folder, split)} for split in ("train", "val", "test")}
    prompts = {split: [pair["messages"][1]["content"] for pair in _rows(planner_folder / f"preferences_{split}.jsonl")]
               for split in ("train", "val")}
    assert set(prompts["train"]) == user["train"] and set(prompts["val"]) == user["val"]
    assert not (set(prompts["train"]) | set(prompts["val"])) & user["test"]
    assert not list(planner_folder.glob("preferences_test*"))


def test_corrupt_plan_tells_which_kind(planner_folder):
    example = load_planner_split(planner_folder, "val")[0]
    kind, rejected = corrupt_plan(example, random.Random(1))
    assert kind in CORRUPTIONS and plan_problems(rejected, example)


# ------------------------------------------------------------------------------------- loading


def _write(path, rows):
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def test_load_messages_and_prompt_rows(tmp_path):
    path = _write(tmp_path / "p.jsonl", [
        {"messages": [{"role": "user", "content": "hi"}], "chosen": "a", "rejected": "b", "kind": "x"},
        {"prompt": "plain", "chosen": "c", "rejected": "d"},
    ])
    pairs = load_preference_file(path)
    assert pairs == [PreferencePair([{"role": "user", "content": "hi"}], "a", "b", "x"), PreferencePair("plain", "c", "d")]


@pytest.mark.parametrize("row, message", [
    ("{not json", "p.jsonl:2: not valid JSON"),
    ({"prompt": "x", "chosen": "a"}, "p.jsonl:2: needs a string 'rejected'"),
    ({"chosen": "a", "rejected": "b"}, "needs 'messages' (chat turns) or a string 'prompt'"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "chosen": "a", "rejected": "b"},
     "ends with an assistant turn"),
    ({"messages": "hello", "chosen": "a", "rejected": "b"}, "non-empty list of {role, content}"),
    ([1, 2], "must be a JSON object"),
])
def test_bad_rows_are_one_line_errors(tmp_path, row, message):
    path = _write(tmp_path / "p.jsonl", [{"prompt": "ok", "chosen": "a", "rejected": "b"}, row])
    with pytest.raises(ValueError) as error:
        load_preference_file(path)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_splits_from_a_folder_or_one_file(tmp_path):
    rows = [{"prompt": f"q{i}", "chosen": "a", "rejected": "b"} for i in range(20)]
    _write(tmp_path / "preferences_train.jsonl", rows)
    train, val = load_preference_splits(tmp_path, val_fraction=0.25, seed=1)  # no val file: 25% held out
    assert len(train) == 15 and len(val) == 5 and not {p.prompt for p in train} & {p.prompt for p in val}
    assert load_preference_splits(tmp_path, val_fraction=0.25, seed=1) == (train, val)
    _write(tmp_path / "preferences_val.jsonl", rows[:3])
    train, val = load_preference_splits(tmp_path)
    assert len(train) == 20 and [p.prompt for p in val] == ["q0", "q1", "q2"]
    train, val = load_preference_splits(tmp_path / "preferences_train.jsonl", val_fraction=0.1)
    assert len(train) == 18 and len(val) == 2
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_preference_splits(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="other.jsonl does not exist"):
        load_preference_splits(tmp_path, train_file="other.jsonl")


# ------------------------------------------------------------------------------------- tokenising and batching


def test_prompt_uses_the_chat_template_with_the_generation_prompt(tokenizer):
    ids = prompt_ids(tokenizer, [{"role": "user", "content": "hi"}])
    assert tokenizer.decode(ids) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert prompt_ids(tokenizer, "hi") == ids  # a string prompt is one user turn


def test_truncation_cuts_the_prompt_from_the_left(tokenizer):
    prompt = [{"role": "user", "content": "x" * 100}]
    full = prompt_ids(tokenizer, prompt)
    ids, answer = encode_prompt_response(tokenizer, prompt, "yes", 64)
    # byte tokenizer: "yes" is 3 tokens, + end of sequence = 4; the prompt keeps its last 60 tokens
    assert answer == [*tokenizer("yes", add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
    assert len(ids) + len(answer) == 64 and ids == full[-60:]
    ids, answer = encode_prompt_response(tokenizer, prompt, "yes", 64, add_eos=False)
    assert len(answer) == 3 and len(ids) == 61
    # an answer too long even beside a quarter of the prompt budget (16 tokens) is cut on the right
    ids, answer = encode_prompt_response(tokenizer, prompt, "a" * 200, 64)
    assert ids == full[-16:] and len(answer) == 48 and answer[-1] != tokenizer.eos_token_id
    # a prompt shorter than a quarter of the budget keeps all of itself (20 tokens < 128 // 4)
    short = prompt_ids(tokenizer, "q")
    ids, answer = encode_prompt_response(tokenizer, "q", "a" * 200, 128)
    assert ids == short and len(answer) == 128 - 20
    ids, answer = encode_prompt_response(tokenizer, "q", "short", 512)  # fits: untouched
    assert ids == prompt_ids(tokenizer, "q") and len(answer) == 6


def test_collate_pads_prompts_left_answers_right_chosen_first(tokenizer):
    pairs = [PreferencePair("q", "good", "bad!!!"), PreferencePair("longer question", "ok", "no")]
    encoded = [encode_pair(tokenizer, p, 128) for p in pairs]
    batch = collate_pairs(encoded, tokenizer.pad_token_id)
    assert batch.num_pairs == 2 and batch.prompt_ids.shape[0] == 4
    assert batch.completion_mask.sum(dim=1).tolist() == [5, 3, 7, 3]  # good, ok, bad!!!, no (+ end of sequence)
    assert batch.prompt_mask[0, 0] == 0 and batch.prompt_mask[0, -1] == 1  # left padding
    assert batch.completion_mask[1, 0] == 1 and batch.completion_mask[1, -1] == 0  # right padding
    row = batch.completion_ids[2][batch.completion_mask[2].bool()].tolist()
    assert tokenizer.decode(row[:-1]) == "bad!!!"
    inputs = batch.model_inputs()
    first = inputs["attention_mask"][0].nonzero()[0].item()
    assert inputs["position_ids"][0, first] == 0 and inputs["input_ids"].shape[1] == batch.prompt_ids.shape[1] + batch.completion_ids.shape[1]
    assert identical_pairs(encoded) == 0
    # a budget of 40 leaves about 20 answer tokens beside the short prompt: both answers are cut before they differ
    assert identical_pairs([encode_pair(tokenizer, PreferencePair("q", "same start " * 3 + "A", "same start " * 3 + "B"), 40)]) == 1


def test_batches_cover_each_epoch_once_and_depend_only_on_the_step():
    # 10 items in batches of 4: 3 batches per epoch (4, 4, 2)
    epochs = [batch_for_step(10, 4, step, seed=3) for step in range(1, 7)]
    assert [e for e, _ in epochs] == [0, 0, 0, 1, 1, 1]
    assert [len(b) for _, b in epochs] == [4, 4, 2, 4, 4, 2]
    assert sorted(i for _, b in epochs[:3] for i in b) == list(range(10))
    assert epochs[0][1] != epochs[3][1]  # a fresh shuffle each epoch
    assert batch_for_step(10, 4, 5, seed=3) == epochs[4]


# ------------------------------------------------------------------------------------- reward-model loss and reward


class _FixedScores(torch.nn.Module):
    """Stands in for a reward model: returns given scores whatever the input."""

    def __init__(self, scores):
        super().__init__()
        self.scores = torch.nn.Parameter(torch.tensor(scores).unsqueeze(1))

    def forward(self, **inputs):
        return SimpleNamespace(logits=self.scores)


def test_reward_loss_hand_checked(tokenizer):
    from palaestra.recipes.reward_model import reward_loss

    batch = collate_pairs([encode_pair(tokenizer, PreferencePair("q", "a", "b"), 32)] * 2, tokenizer.pad_token_id)
    model = _FixedScores([1.0, 0.0, 0.0, 1.0])  # chosen [1, 0], rejected [0, 1]: differences [1, -1]
    loss, stats = reward_loss(model, batch, precision="fp32")
    # -(log sigma(1) + log sigma(-1)) / 2 = (0.31326 + 1.31326) / 2 = 0.81326
    assert loss.item() == pytest.approx(0.81326, abs=1e-5)
    assert stats["accuracy"] == 0.5 and stats["margin"] == 0.0
    loss, _ = reward_loss(model, batch, precision="fp32", center_coefficient=0.1)
    # + 0.1 * mean((1 + 0)^2, (0 + 1)^2) = + 0.1
    assert loss.item() == pytest.approx(0.91326, abs=1e-5)
    loss, _ = reward_loss(model, batch, precision="fp32", margin=1.0)
    # -(log sigma(0) + log sigma(-2)) / 2 = (0.69315 + 2.12693) / 2 = 1.41004
    assert loss.item() == pytest.approx(1.41004, abs=1e-5)


def test_reward_model_reward_names_and_errors(tmp_path):
    from palaestra.rewards import resolve_reward
    from palaestra.rewards.reward_model import reward_model_reward

    with pytest.raises(ValueError, match="is not a reward model folder"):
        resolve_reward(f"reward_model:{tmp_path}")
    (tmp_path / "config.json").write_text("{}")
    function = resolve_reward(f"reward_model:{tmp_path}")  # cheap: nothing loads until the first call
    assert callable(function)
    with pytest.raises(ValueError, match="'prompt' column"):
        reward_model_reward(["x"], folder=str(tmp_path), answer=["1"])
