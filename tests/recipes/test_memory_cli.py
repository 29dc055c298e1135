"""train.gradient_checkpointing trades memory for compute and nothing else: with it on, the real CLI makes the
same updates (the final weights equal to 1e-6) for a LoRA causal LM (SFT, GRPO's packed training forward, the
reward model's head), an encoder (the classifier) and a model trained from scratch (Mamba)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import run_cli


def _final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """Every trainable tensor of the last checkpoint, by part (policy-<name>/ folders) and name."""
    last = sorted((run_dir / "checkpoints").glob("step-*"))[-1]
    return {f"{file.parent.name}/{name}": tensor for file in sorted(last.rglob("trainable.safetensors"))
            for name, tensor in load_file(file).items()}


def _with_and_without(args: list[str], tmp_path: Path, setting: str = "train.gradient_checkpointing=true") -> None:
    for name, extra in (("plain", []), ("checkpointed", [setting])):
        result = run_cli([*args, *extra, f"train.output_dir={name}", "train.threads=1", "tracking.enabled=false"], tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
    plain, checkpointed = _final_weights(tmp_path / "plain"), _final_weights(tmp_path / "checkpointed")
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        assert torch.allclose(plain[name], checkpointed[name], atol=1e-6), name


def _sft(tmp_path: Path) -> list[str]:
    from palaestra.planner.data import make_planner_dataset

    data = make_planner_dataset(tmp_path, date="2026-05-04", n_train=8, n_val=2, n_test=2)
    return ["train", "algo=sft", "model=tiny", "model.precision=fp32", f"data.path={data}", "data.max_length=128",
            "algo.epochs=1", "train.sequences_per_step=4", "train.sequences_per_forward=2", "train.learning_rate=1e-3"]


def _grpo(tmp_path: Path) -> list[str]:
    from tests.recipes.test_grpo_cli import TINY

    return ["train", *TINY, "model.precision=fp32", "train.steps=2"]


def _reward(tmp_path: Path) -> list[str]:
    from tests.recipes.test_reward_dpo_cli import _write_pairs

    _write_pairs(tmp_path / "prefs", train=8, val=4)
    return ["train", "algo=reward", "model=tiny", "model.precision=fp32", "data.path=prefs", "data.max_length=64",
            "train.pairs_per_step=4", "train.pairs_per_forward=2", "train.learning_rate=1e-3"]


def _classifier(tmp_path: Path) -> list[str]:
    from tests.recipes.test_classifier_cli import _data

    return ["train", "--target=classifier", "model.name=tiny", "model.precision=fp32", f"algo.data={_data(tmp_path / 'texts')}",
            "algo.epochs=1", "algo.dropout=0", "train.texts_per_step=6", "train.learning_rate=1e-3"]


def _mamba(tmp_path: Path) -> list[str]:
    from tests.recipes.test_mamba_cli import _corpus

    return ["train", "--target=mamba", f"algo.corpus={_corpus(tmp_path / 'animals.txt', paragraphs=12)}",
            "algo.vocab_size=300", "algo.d_model=32", "algo.n_layers=2", "algo.max_length=64", "algo.epochs=1",
            "algo.sample_tokens=0", "train.sequences_per_step=4", "train.sequences_per_forward=2"]


@pytest.mark.slow
@pytest.mark.parametrize("method", [_sft, _grpo, _reward, _classifier, _mamba], ids=lambda f: f.__name__[1:])
def test_gradient_checkpointing_changes_no_update(tmp_path, method):
    _with_and_without(method(tmp_path), tmp_path)


def _dpo(tmp_path: Path) -> list[str]:
    return ["algo=dpo" if arg == "algo=reward" else arg for arg in _reward(tmp_path)]


def _ppo(tmp_path: Path) -> list[str]:
    from tests.recipes.test_ppo_cli import TINY, _dataset

    return ["train", *TINY, _dataset(tmp_path), "model.precision=fp32", "train.steps=1"]


def _team(tmp_path: Path) -> list[str]:
    from tests.recipes.test_grpo_cli import TEAM

    # one step: a later step samples from the updated weights, where a last-bit difference can pick another token
    return [*TEAM, "policy=shared", "train.steps=1", "model.precision=fp32"]


@pytest.mark.slow
@pytest.mark.parametrize("method", [_sft, _dpo, _ppo, _grpo, _team], ids=["sft", "dpo", "ppo", "grpo", "at_grpo"])
def test_the_lm_head_in_chunks_changes_no_update(tmp_path, method):
    """train.logprob_chunk_tokens: the LM head over chunks of 5 tokens, each recomputed in the backward (the
    training forward and the old, reference and held-out passes)."""
    args = method(tmp_path)
    _with_and_without([*args, "algo.beta=0.04"] if method is _grpo else args, tmp_path, "train.logprob_chunk_tokens=5")
