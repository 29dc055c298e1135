"""palaestra train --target=mamba: the real CLI trains a Mamba language model from scratch, tracks, exports and resumes it."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import run_cli

ANIMALS = ("cat", "dog", "bird", "fox", "horse", "mouse")
VERBS = ("sees", "chases", "likes", "follows")
PLACES = ("garden", "house", "river", "field")


def _corpus(path: Path, paragraphs: int = 24) -> Path:
    """A small English text file: paragraphs of six sentences (the documents), seeded."""
    rng = random.Random(0)
    text = "\n\n".join(" ".join(f"The {rng.choice(ANIMALS)} {rng.choice(VERBS)} the {rng.choice(ANIMALS)} in the "
                                f"{rng.choice(PLACES)}." for _ in range(6)) for _ in range(paragraphs))
    path.write_text(text + "\n")
    return path


def _args(tmp_path: Path) -> list[str]:
    corpus = _corpus(tmp_path / "animals.txt")
    return ["train", "--target=mamba", f"algo.corpus={corpus}", "algo.vocab_size=300", "algo.d_model=32", "algo.n_layers=2",
            "algo.max_length=64", "algo.epochs=2", "algo.sample_tokens=8", "train.sequences_per_step=4", "train.sequences_per_forward=2"]


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_mamba_trains_tracks_and_exports_a_model_that_loads_and_generates(tmp_path):
    result = run_cli([*_args(tmp_path), "train.output_dir=run"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "run"
    steps = [m for m in _metrics(run_dir) if "loss" in m]
    epochs = [m for m in _metrics(run_dir) if "perplexity" in m]
    per_epoch = len(steps) // 2
    assert [m["step"] for m in steps] == list(range(1, 2 * per_epoch + 1)) and per_epoch >= 3
    assert all(m["tokens_per_second"] > 0 for m in steps)
    assert [(m["epoch"], m["step"]) for m in epochs] == [(1, per_epoch), (2, 2 * per_epoch)]
    assert epochs[-1]["perplexity"] < 300  # better than a uniform guess over the 300 tokens
    assert "perplexity" in result.stdout and "before" in result.stdout  # the before/after table
    assert (run_dir / "tokenizer" / "tokenizer.json").is_file()
    assert "sample (epoch 2): 'The' -> " in (run_dir / "train.log").read_text()

    # the exported folder: the model and its tokenizer, loaded by the Auto classes, generating text
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(run_dir / "model")
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "model")
    assert type(model).__name__ == "MambaForCausalLM" and len(tokenizer) == model.config.vocab_size <= 300
    prompt = tokenizer("The cat", return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=6, do_sample=False)
    assert out.shape[1] > prompt["input_ids"].shape[1] and tokenizer.decode(out[0]).startswith("The cat")

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    state = json.loads((run_dir / "checkpoints" / f"step-{2 * per_epoch:06d}" / "trainer_state.json").read_text())
    run = client.get_run(state["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert {"eval/val_loss", "eval/perplexity", "loss", "tokens_per_second", "final/perplexity"} <= set(run.data.metrics)
    assert run.data.metrics["final/perplexity"] == pytest.approx(min(m["perplexity"] for m in epochs))
    assert run.data.params["algo.d_model"] == "32" and "model.name" not in run.data.params  # only what it reads
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"model", "plots", "samples", "train.log", "config.yaml"} <= artifacts
    assert {a.path for a in client.list_artifacts(run.info.run_id, "samples")} == {"samples/epoch-001.json",
                                                                                    "samples/epoch-002.json"}

    # palaestra eval: the exported model's held-out perplexity, the same as the run's best epoch
    evaluated = run_cli(["eval", "algo=mamba", *_args(tmp_path)[2:], "eval.checkpoint=run", "tracking.enabled=false"],
                        tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    shown = dict(line.split() for line in evaluated.stdout.splitlines() if line.startswith("  "))
    assert float(shown["perplexity"]) == pytest.approx(min(m["perplexity"] for m in epochs), rel=1e-3)


@pytest.mark.slow
def test_an_interrupted_run_resumes_to_the_same_weights(tmp_path):
    from safetensors.torch import load_file

    args = [*_args(tmp_path), "tracking.enabled=false"]
    assert run_cli([*args, "train.output_dir=straight"], tmp_path).returncode == 0
    stopped = run_cli([*args, "train.output_dir=stopped", "train.stop_after_steps=3"], tmp_path)
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    assert [m["step"] for m in _metrics(tmp_path / "stopped")] == [1, 2, 3] and not (tmp_path / "stopped" / "model").exists()
    resumed = run_cli([*args, "train.output_dir=stopped", "train.resume=auto"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout + resumed.stderr

    straight, stopped = ([(m["step"], m.get("loss"), m.get("val_loss")) for m in _metrics(tmp_path / name)]
                         for name in ("straight", "stopped"))
    assert straight == stopped
    first, second = (load_file(tmp_path / name / "model" / "model.safetensors") for name in ("straight", "stopped"))
    assert first.keys() == second.keys() and all((first[key] == second[key]).all() for key in first)


@pytest.mark.parametrize("corpus, extra, message", [
    (None, ["algo.corpus=nowhere.txt"], "algo.corpus=nowhere.txt does not exist"),
    ("", [], "is empty (no text)"),
    (b"caf\xe9 au lait", [], "is not UTF-8 text (byte 3); save it as UTF-8"),
    ("one paragraph\nonly", [], "the corpus has 1 document; holding some out needs at least 2"),
    (None, ["algo.vocab_size=100"], "algo.vocab_size=100 must be > 258"),
    (None, ["model.lora.r=8"], "algo=mamba does not read model.lora.r"),
])
def test_bad_input_is_one_line_before_any_model_is_built(tmp_path, corpus, extra, message):
    args = _args(tmp_path)
    if corpus is not None:
        (tmp_path / "animals.txt").write_bytes(corpus if isinstance(corpus, bytes) else corpus.encode())
    result = run_cli([*args, *extra, "tracking.enabled=false"], tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("palaestra: error: ") and message in lines[0], result.stderr[-2000:]
    assert not (tmp_path / "runs").exists()  # nothing written, nothing built
