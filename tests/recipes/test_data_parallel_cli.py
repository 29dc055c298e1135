"""Data parallel for every method: the real CLI under torchrun with two gloo processes makes the same updates
as one process on the whole batch (the final weights equal to 1e-6), and the main process alone writes the
run's records and products.

Every run here computes in fp32 on one thread per process, so that the two runs differ only in how each
update's items are split between processes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from palaestra.planner.data import make_planner_dataset
from tests.conftest import run_cli

EXACT = ["model=tiny", "model.precision=fp32", "train.threads=1", "tracking.enabled=false"]


def _final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    last = sorted((run_dir / "checkpoints").glob("step-*"))[-1]
    return load_file(last / "trainable.safetensors")


def _steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _last_evaluation(run_dir: Path) -> dict[str, float]:
    last = sorted((run_dir / "checkpoints").glob("step-*"))[-1]
    return json.loads((last / "trainer_state.json").read_text())["last_eval"]["figures"]


def _one_and_two(args: list[str], tmp_path: Path) -> tuple[Path, Path]:
    """The run folders of the same command on one process and on two."""
    one = run_cli([*args, "train.output_dir=one"], tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_cli([*args, "train.output_dir=two"], tmp_path, processes=2)
    assert two.returncode == 0, two.stderr[-3000:]
    return tmp_path / "one", tmp_path / "two"


def _assert_same_weights(one: Path, two: Path) -> None:
    single, parallel = _final_weights(one), _final_weights(two)
    assert single.keys() == parallel.keys()
    for name in single:
        assert torch.allclose(single[name], parallel[name], atol=1e-6), (name, (single[name] - parallel[name]).abs().max())


@pytest.mark.slow
def test_sft_on_two_processes_updates_like_one(tmp_path):
    data = make_planner_dataset(tmp_path, date="2026-05-04", n_train=12, n_val=5, n_test=2)
    one, two = _one_and_two(["train", "algo=sft", *EXACT, f"data.path={data}", "data.max_length=128", "algo.packing=false",
                             "algo.epochs=1", "train.sequences_per_step=6", "train.sequences_per_forward=2",
                             "train.learning_rate=1e-3"], tmp_path)
    _assert_same_weights(one, two)
    assert _steps(one) == _steps(two)  # the main process writes each record once
    assert (two / "model").is_dir()


@pytest.mark.slow
@pytest.mark.parametrize("method, figure", [("reward", "pairwise_accuracy"), ("dpo", "preference_accuracy")])
def test_preference_methods_on_two_processes_update_like_one(tmp_path, method, figure):
    from tests.recipes.test_reward_dpo_cli import _write_pairs

    _write_pairs(tmp_path / "prefs", train=14, val=7)  # 7 pairs a step: blocks of 3 and 4, held-out blocks of 3 and 4
    one, two = _one_and_two(["train", f"algo={method}", *EXACT, "data.path=prefs", "data.max_length=64", "algo.epochs=1",
                             "train.pairs_per_step=7", "train.pairs_per_forward=7", "train.learning_rate=1e-3"], tmp_path)
    _assert_same_weights(one, two)
    assert _steps(one) == _steps(two)
    single, parallel = (_last_evaluation(run) for run in (one, two))  # the held-out pairs gathered from both processes
    assert single.keys() == parallel.keys() and figure in single
    assert list(parallel.values()) == pytest.approx(list(single.values()), abs=1e-6)


@pytest.mark.slow
def test_classifier_on_two_processes_updates_like_one(tmp_path):
    from tests.recipes.test_classifier_cli import _data

    data = _data(tmp_path / "tickets")  # 12 training texts: steps of 5, 5 and 2 (blocks of 2 and 3, then 1 and 1)
    one, two = _one_and_two(["train", "--target=classifier", "model.name=tiny", "model.precision=fp32", "train.threads=1",
                             "tracking.enabled=false", f"algo.data={data}", "algo.epochs=1", "algo.dropout=0",
                             "train.texts_per_step=5", "train.learning_rate=1e-3"], tmp_path)
    _assert_same_weights(one, two)
    assert _last_evaluation(one) == pytest.approx(_last_evaluation(two), abs=1e-6)  # predictions gathered in order
    assert (one / "test_predictions.jsonl").read_text() == (two / "test_predictions.jsonl").read_text()


@pytest.mark.slow
def test_mamba_on_two_processes_updates_like_one(tmp_path):
    from tests.recipes.test_mamba_cli import _corpus

    corpus = _corpus(tmp_path / "animals.txt")  # steps of 4 chunks: micro-batches of 2 in both runs, summed alike
    one, two = _one_and_two(["train", "--target=mamba", f"algo.corpus={corpus}", "algo.vocab_size=300", "algo.d_model=32",
                             "algo.n_layers=2", "algo.max_length=64", "algo.epochs=1", "algo.sample_tokens=0",
                             "train.sequences_per_step=4", "train.sequences_per_forward=2", "train.threads=1",
                             "tracking.enabled=false"], tmp_path)
    _assert_same_weights(one, two)
    assert _last_evaluation(one) == pytest.approx(_last_evaluation(two), rel=1e-6)


@pytest.mark.slow
def test_rag_on_two_processes_builds_the_same_index(tmp_path):
    import faiss
    import numpy as np

    from tests.recipes.test_rag_cli import _files

    args = ["train", *_files(tmp_path / "data"), "algo.documents_per_step=3", "train.threads=1", "tracking.enabled=false"]
    one = run_cli([*args, "train.output_dir=one"], tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_cli([*args, "train.output_dir=two"], tmp_path, processes=2)  # steps of 3 and 2 documents: blocks 1+2, 1+1
    assert two.returncode == 0, two.stderr[-3000:]

    def vectors(run: str) -> np.ndarray:
        index = faiss.read_index(str(tmp_path / run / "index" / "index.faiss"))
        return index.reconstruct_n(0, index.ntotal)

    assert np.allclose(vectors("one"), vectors("two"), atol=1e-6)
    assert _last_evaluation(tmp_path / "one") == pytest.approx(_last_evaluation(tmp_path / "two"))
    assert _steps(tmp_path / "one") == _steps(tmp_path / "two") == [1, 2]


def _straight_and_resumed(args: list[str], tmp_path: Path, stop_after: int) -> tuple[Path, Path]:
    """The run folders of the same two-process command run straight, and stopped after ``stop_after`` steps then
    resumed (``train.resume=auto``)."""
    straight = run_cli([*args, "train.output_dir=straight"], tmp_path, processes=2)
    assert straight.returncode == 0, straight.stderr[-3000:]
    stopped = run_cli([*args, "train.output_dir=resumed", f"train.stop_after_steps={stop_after}"], tmp_path, processes=2)
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    resumed = run_cli([*args, "train.output_dir=resumed", "train.resume=auto"], tmp_path, processes=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return tmp_path / "straight", tmp_path / "resumed"


def _assert_equal_weights(one: Path, two: Path, part: str = "trainable.safetensors") -> None:
    last = sorted((one / "checkpoints").glob("step-*"))[-1].name
    a, b = load_file(one / "checkpoints" / last / part), load_file(two / "checkpoints" / last / part)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part


@pytest.mark.slow
def test_an_interrupted_two_process_ppo_run_resumes_bit_for_bit(tmp_path):
    """Each process samples from its own random stream, saved in the checkpoint and restored on resume."""
    from tests.recipes.test_ppo_cli import TINY, _dataset

    straight, resumed = _straight_and_resumed(["train", *TINY, _dataset(tmp_path), "tracking.enabled=false",
                                               "train.steps=4", "train.save_interval=2", "train.keep_last_n=0"],
                                              tmp_path, stop_after=2)
    assert (straight / "checkpoints" / "step-000002" / "rng-rank1.pt").is_file()
    for part in ("trainable.safetensors", "policy-value_head/trainable.safetensors"):
        _assert_equal_weights(straight, resumed, part)
    records = [[json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()] for run in (straight, resumed)]
    assert [(r["step"], r["reward/mean"], r["loss"]) for r in records[0]] == [(r["step"], r["reward/mean"], r["loss"]) for r in records[1]]


@pytest.mark.slow
def test_an_interrupted_two_process_sft_run_resumes_bit_for_bit(tmp_path):
    data = make_planner_dataset(tmp_path, date="2026-05-04", n_train=12, n_val=4, n_test=2)
    straight, resumed = _straight_and_resumed(["train", "algo=sft", *EXACT, f"data.path={data}", "data.max_length=128",
                                               "algo.packing=false", "algo.epochs=2", "train.sequences_per_step=6",
                                               "train.sequences_per_forward=2", "train.keep_last_n=0"], tmp_path, stop_after=3)
    _assert_equal_weights(straight, resumed)


@pytest.mark.slow
def test_an_interrupted_two_process_grpo_run_resumes_bit_for_bit(tmp_path):
    from tests.recipes.test_grpo_cli import TINY

    straight, resumed = _straight_and_resumed(["train", *TINY, "tracking.enabled=false", "train.steps=4",
                                               "train.save_interval=2", "train.keep_last_n=0"], tmp_path, stop_after=2)
    _assert_equal_weights(straight, resumed)
    rewards = [[json.loads(line)["reward/mean"] for line in (run / "metrics.jsonl").read_text().splitlines()]
               for run in (straight, resumed)]
    assert rewards[0] == rewards[1]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["shared", "per_role", "separate"])
def test_at_grpo_teams_on_two_processes_resume_bit_for_bit(tmp_path, mode):
    """Three problems a step over two processes (blocks of 1 and 2); each policy's gradients are summed with its
    own alone. The processes stay in step: a resumed run (every process loading the main one's weights) gives
    the straight run's weights only if the processes' weights never drifted apart."""
    from tests.recipes.test_grpo_cli import TEAM

    straight, resumed = _straight_and_resumed([*TEAM, f"policy={mode}", "env.train_envs=3", "env.test_envs=3",
                                               "train.steps=3", "train.eval_interval=3", "train.keep_last_n=0",
                                               "tracking.enabled=false"], tmp_path, stop_after=1)
    parts = sorted(p.name for p in (straight / "checkpoints" / "step-000003").glob("policy-*"))
    assert parts == (["policy-shared"] if mode == "shared" else ["policy-checker", "policy-proposer"])
    for part in parts:
        _assert_equal_weights(straight, resumed, f"{part}/trainable.safetensors")
    records = [{r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}
               for run in (straight, resumed)]
    assert records[0][3]["success_rate"] == records[1][3]["success_rate"]
    assert _last_evaluation(straight) == _last_evaluation(resumed)  # the team evaluation, split and gathered


@pytest.mark.slow
def test_two_nodes_train_as_one_job(tmp_path):
    """Two torchrun launchers (--nnodes 2, node ranks 0 and 1, a rendezvous on this machine), one process each:
    one job whose update is one process's on the whole batch."""
    import os
    import subprocess
    import sys

    from tests.conftest import REPO, free_port

    data = make_planner_dataset(tmp_path, date="2026-05-04", n_train=12, n_val=5, n_test=2)
    args = ["train", "algo=sft", *EXACT, f"data.path={data}", "data.max_length=128", "algo.packing=false", "algo.epochs=1",
            "train.sequences_per_step=6", "train.sequences_per_forward=2", "train.learning_rate=1e-3"]
    one = run_cli([*args, "train.output_dir=one"], tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    env.pop("MLFLOW_TRACKING_URI", None)
    port = free_port()
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(rank),
                               "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port),
                               "-m", "palaestra.cli", *args, "train.output_dir=nodes"],
                              cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in (0, 1)]
    outputs = [node.communicate(timeout=600) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][1][-3000:] + outputs[1][1][-3000:]
    _assert_same_weights(tmp_path / "one", tmp_path / "nodes")
    assert _steps(tmp_path / "one") == _steps(tmp_path / "nodes")  # one job: its main process wrote each record once
