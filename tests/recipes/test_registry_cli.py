"""The real ``palaestra registry | replay | policy`` commands on tiny registered models.

The store holds ``planner_model`` v1, a random tiny model (it writes bytes, never a plan: the
replay gate must reject it) and v2, a tiny model taught the accepted plan of the replayed test row
(it keeps every hard constraint: the gate must pass it). See ``tests/unit/test_registry.py`` for
how v2 is made and why that keeps the PASS case honest. The main flows run the CLI in a
subprocess; the many one-line user errors run ``palaestra.cli.main`` in-process to save start-up time.
"""

from __future__ import annotations

import pytest
from mlflow import MlflowClient

from palaestra.cli import main as palaestra_main
from tests.conftest import run_cli
from tests.unit.test_registry import DATE, planner_fixture


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("registry_cli")
    return {**planner_fixture(root), "root": root}


@pytest.fixture(autouse=True)
def _cache(monkeypatch, tmp_path):
    monkeypatch.setenv("PALAESTRA_CACHE", str(tmp_path / "cache"))  # also reaches run_cli's subprocesses


def _in_process(args: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        palaestra_main(args)
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def _replay_args(store, version: str, *extra: str) -> list[str]:
    return ["replay", "--model", "planner_model", "--version", version, "--dataset", str(store["dataset"]),
            "--max-examples", "1", "--max-new-tokens", "8", "--device", "cpu", "--tracking-uri", store["uri"], *extra]


@pytest.mark.slow
def test_registry_lists_models_and_versions(store):
    result = run_cli(["registry", "--tracking-uri", store["uri"]], store["root"])
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    assert lines[0].split() == ["model", "version", "created", "status", "replayed_on", "aliases", "trained_on", "run_id"]
    assert [line.split()[:2] for line in lines[1:]] == [["planner_model", "1"], ["planner_model", "2"]]
    assert all(DATE in line for line in lines[1:])  # trained_on: the run's dataset_version


@pytest.mark.slow
def test_replay_fails_a_random_model(store):
    result = run_cli(_replay_args(store, store["random_version"]), store["root"])
    assert result.returncode == 1, result.stderr[-2000:]
    assert "FAIL: planner_model v1 tagged status=rejected" in result.stdout
    assert "hard metric constraint_respect = 0.0, must be 1.0" in result.stdout
    assert "Traceback" not in result.stderr
    client = MlflowClient(tracking_uri=store["uri"])
    tags = client.get_model_version("planner_model", store["random_version"]).tags
    assert tags["status"] == "rejected" and tags["gate"] == "fail" and tags["replay_dataset_version"] == DATE
    run = client.get_run(tags["replay_run_id"])
    assert run.data.tags["gate"] == "fail" and run.data.params["version"] == store["random_version"]
    assert client.get_experiment(run.info.experiment_id).name == "planner_replay"
    assert run.data.metrics["candidate/constraint_respect"] == 0.0


@pytest.mark.slow
def test_replay_passes_a_model_that_keeps_the_constraints(store):
    result = run_cli(_replay_args(store, store["knowing_version"], "--baseline", store["random_version"]), store["root"])
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "PASS: planner_model v2 tagged status=candidate" in result.stdout
    table = {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines() if line.startswith("constraint_respect")}
    assert table["constraint_respect"][:2] == ["1.000", "0.000"]  # candidate, baseline side by side
    client = MlflowClient(tracking_uri=store["uri"])
    tags = client.get_model_version("planner_model", store["knowing_version"]).tags
    assert tags["status"] == "candidate" and tags["gate"] == "pass" and tags["replay_baseline"] == store["random_version"]
    run = client.get_run(tags["replay_run_id"])
    assert run.data.tags["gate"] == "pass"
    assert run.data.params["baseline"] == store["random_version"] and run.data.params["dataset_version"] == DATE
    assert run.data.metrics["candidate/constraint_respect"] == 1.0 and run.data.metrics["baseline/parse_rate"] == 0.0
    assert "predictions.json" in {a.path for a in client.list_artifacts(run.info.run_id)}


@pytest.mark.slow
def test_user_mistakes_are_one_line_errors(store, tmp_path, capsys):
    # in a real process: exit code 2, one line, no traceback
    result = run_cli(_replay_args(store, "7"), store["root"])
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "palaestra replay: error: model 'planner_model' has no version '7' (versions: 1, 2)"]

    (tmp_path / "2020-01-02").mkdir()
    uri = store["uri"]
    cases = {
        "unknown registered model 'nope'": ["replay", "--model", "nope", "--version", "1", "--dataset",
                                            str(store["dataset"]), "--tracking-uri", uri],
        "dataset folder not found": _replay_args(store, "1")[:5] + ["--dataset", str(tmp_path / "2020-01-01"),
                                                                    "--tracking-uri", uri],
        "test.jsonl not found": _replay_args(store, "1")[:5] + ["--dataset", str(tmp_path / "2020-01-02"),
                                                                "--tracking-uri", uri],
        "no MLflow store at": ["registry", "--tracking-uri", f"sqlite:///{tmp_path / 'absent.db'}"],
        "unknown registered model 'ghost'": ["policy", "list", "--model", "ghost", "--tracking-uri", uri],
        "has no policy version 42": ["policy", "promote", "--model", "planner_model", "--policy-version", "42",
                                     "--tracking-uri", uri],
        "has no version '9'": ["policy", "create", "--model", "planner_model", "--version", "9", "--tracking-uri", uri],
    }
    for expected, args in cases.items():
        code, _, err = _in_process(args, capsys)
        assert code == 2 and expected in err and len(err.strip().splitlines()) == 1, (args, err)
    # argparse mistakes: its usage and one error line, exit code 2
    code, _, err = _in_process(["replay", "--model", "planner_model", "--dataset", "x"], capsys)
    assert code == 2 and err.strip().splitlines()[-1].endswith("the following arguments are required: --version")


@pytest.mark.slow
def test_policy_commands(store, capsys):
    uri, version = store["uri"], store["knowing_version"]
    common = ["--model", "planner_model", "--tracking-uri", uri]
    code, out, _ = _in_process(["policy", "create", *common, "--version", version, "--temperature", "0.2",
                                "--max-new-tokens", "64"], capsys)
    assert code == 0 and out.startswith("created policy version 1 of planner_model: model version 2")
    code, out, _ = _in_process(["policy", "create", *common, "--version", version], capsys)
    assert code == 0 and "created policy version 2" in out
    for number in ("1", "2"):
        code, out, _ = _in_process(["policy", "promote", *common, "--policy-version", number], capsys)
        assert code == 0 and f"policy version {number} of planner_model is active" in out

    result = run_cli(["policy", "list", *common], store["root"])
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line.split() for line in result.stdout.strip().splitlines()[1:]]
    assert [row[:6] for row in rows] == [["1", "2", "0.2", "64", "retired", "policy-v1"],
                                         ["2", "2", "0.7", "256", "active", "policy-v2"]]
    aliases = MlflowClient(tracking_uri=uri).get_registered_model("planner_model").aliases
    assert aliases == {"policy-v1": 2, "policy-v2": 2, "active": 2}

    code, out, _ = _in_process(["policy", "retire", *common, "--policy-version", "2"], capsys)
    assert code == 0 and "is retired" in out
    assert "active" not in MlflowClient(tracking_uri=uri).get_registered_model("planner_model").aliases
