"""MlflowTracker against a real local SQLite store, read back with MlflowClient; plot_curves."""

import json
import shutil
from pathlib import Path

import pytest
from matplotlib.figure import Figure
from mlflow import MlflowClient

from palaestra.tracking import (
    MlflowTracker,
    TrackingError,
    default_tracking_uri,
    flatten_config,
    plot_curves,
)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A tracker created in an empty folder with no MLFLOW_TRACKING_URI: the embedded default.

    Migrating a new SQLite store takes seconds, so the module makes one and the override test
    copies the migrated file.
    """
    root = tmp_path_factory.mktemp("mlflow_root")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.chdir(root)
        tracker = MlflowTracker("unit", run_name="first")
    return root, tracker


def _client(tracker):
    return MlflowClient(tracking_uri=tracker.tracking_uri)


def test_default_store_is_sqlite_in_cwd(store):
    root, tracker = store
    assert tracker.tracking_uri == f"sqlite:///{root.resolve()}/mlflow.db"
    assert (root / "mlflow.db").is_file()
    assert (root / "mlartifacts").is_dir()
    exp = _client(tracker).get_experiment(tracker.experiment_id)
    assert exp.name == "unit"
    assert exp.artifact_location == (root / "mlartifacts").resolve().as_uri()
    assert "mlflow ui --backend-store-uri sqlite:///" in tracker.run_url_hint()
    assert f"#/experiments/{tracker.experiment_id}/runs/{tracker.run_id}" in tracker.run_url_hint()


def test_params_tags_metrics_artifacts_round_trip(store, tmp_path):
    root, _ = store
    t = MlflowTracker("unit", run_name="logging", root=root)
    t.log_params({"algo.lr": 1e-5, "model": {"name": "tiny"}, "long": "x" * 7000})
    t.set_tags({"recipe": "grpo"})
    for step in range(3):
        # `@` and `(` are refused by MLflow and become `_`; `/` is kept
        t.log_metrics({"reward/mean": step * 0.5, "reward/pass@1 (k)": 1.0 + step}, step=step)
    t.log_table([{"prompt": "1+1", "completion": "2"}, {"prompt": "2+2", "reward": 1.0}],
                "samples/step_0.json")
    t.log_dict({"a": {"b": 1}}, "config.yaml")
    t.log_dict({"a": 1}, "meta.json")
    t.log_text("hello", "notes/hello.txt")
    fig = Figure()
    fig.add_subplot().plot([0, 1], [1, 0])
    t.log_figure(fig, "curves/reward.png")
    (tmp_path / "extra.txt").write_text("extra")
    t.log_artifact(tmp_path / "extra.txt", "files")
    t.end()

    client = _client(t)
    run = client.get_run(t.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["algo.lr"] == "1e-05"
    assert run.data.params["model"] == "{'name': 'tiny'}"
    assert len(run.data.params["long"]) == 6000  # MLflow's limit
    assert run.data.tags["recipe"] == "grpo"
    history = client.get_metric_history(t.run_id, "reward/mean")
    assert [(m.step, m.value) for m in history] == [(0, 0.0), (1, 0.5), (2, 1.0)]
    assert len(client.get_metric_history(t.run_id, "reward/pass_1 _k_")) == 3

    files = {a.path for a in client.list_artifacts(t.run_id)}
    assert {"samples", "config.yaml", "meta.json", "notes", "curves", "files"} <= files
    art = Path(client.download_artifacts(t.run_id, "", str(tmp_path / "dl")))
    table = json.loads((art / "samples/step_0.json").read_text())
    assert table["columns"] == ["prompt", "completion", "reward"]
    assert table["data"][1] == ["2+2", None, 1.0]
    assert (art / "config.yaml").read_text().startswith("a:\n  b: 1")
    assert json.loads((art / "meta.json").read_text()) == {"a": 1}
    assert (art / "notes/hello.txt").read_text() == "hello"
    assert (art / "curves/reward.png").read_bytes()[:4] == b"\x89PNG"
    assert (art / "files/extra.txt").read_text() == "extra"
    # artifacts live in the store's mlartifacts folder
    assert list((root / "mlartifacts").rglob("meta.json"))


def test_resume_continues_the_same_run(store):
    root, _ = store
    first = MlflowTracker("unit", run_name="resumable", root=root)
    first.log_params({"lr": 0.1, "seed": 0})
    first.log_metrics({"loss": 1.0}, step=0)
    first.log_metrics({"loss": 0.8}, step=1)
    first.end("KILLED")

    again = MlflowTracker("unit", run_id=first.run_id, root=root)
    assert (again.run_id, again.experiment_id) == (first.run_id, first.experiment_id)
    again.log_params({"lr": 0.1, "seed": 0, "resumed_from": 1})  # identical values: no error
    again.log_params({"lr": 0.5})  # a changed value keeps the first one (MLflow forbids changes)
    again.log_metrics({"loss": 0.6}, step=2)
    again.end()

    client = _client(first)
    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"lr": "0.1", "seed": "0", "resumed_from": "1"}
    assert [m.step for m in client.get_metric_history(first.run_id, "loss")] == [0, 1, 2]
    assert len(client.search_runs([first.experiment_id])) >= 1


def test_two_trackers_do_not_mix(store):
    root, _ = store
    a = MlflowTracker("unit", run_name="a", root=root)
    b = MlflowTracker("unit", run_name="b", root=root)
    a.log_metrics({"x": 1.0}, step=0)
    b.log_metrics({"y": 2.0}, step=0)
    client = _client(a)
    assert set(client.get_run(a.run_id).data.metrics) == {"x"}
    assert set(client.get_run(b.run_id).data.metrics) == {"y"}


def test_a_long_run_logs_hundreds_of_tables(store):
    """MLflow's own log_table lists a run's tables in one tag cut at 8000 characters: table ~150 failed."""
    root, _ = store
    t = MlflowTracker("unit", run_name="tables", root=root)
    for step in range(300):
        t.log_table([{"step": step, "completion": "x" * 10}], f"samples/step{step:06d}.json")
    client = MlflowClient(tracking_uri=t.tracking_uri)
    assert len(client.list_artifacts(t.run_id, "samples")) == 300


def test_errors_are_wrapped_with_context(store):
    root, _ = store
    t = MlflowTracker("unit", root=root)
    with pytest.raises(TrackingError, match=rf"logging table bad\.txt.*run {t.run_id}"):
        t.log_table([{"a": 1}], "bad.txt")  # tables are .json files
    with pytest.raises(TrackingError, match="resuming the run"):
        MlflowTracker("unit", run_id="0" * 32, root=root)
    with pytest.raises(ValueError, match="status"):
        t.end("DONE")
    with t:
        pass
    assert _client(t).get_run(t.run_id).info.status == "FINISHED"


def test_env_tracking_uri_wins(store, tmp_path, monkeypatch):
    root, _ = store
    other = tmp_path / "elsewhere"
    other.mkdir()
    shutil.copy(root / "mlflow.db", other / "custom.db")  # already migrated: saves seconds
    uri = f"sqlite:///{other / 'custom.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert default_tracking_uri(tmp_path) == uri

    t = MlflowTracker("override", root=tmp_path)
    t.log_metrics({"m": 1.0}, step=0)
    t.log_text("x", "x.txt")
    assert t.tracking_uri == uri
    assert not (tmp_path / "mlflow.db").exists()
    assert MlflowClient(uri).get_run(t.run_id).data.metrics == {"m": 1.0}
    assert list((other / "mlartifacts").rglob("x.txt"))


def test_flatten_config():
    cfg = {"algo": {"lr": 1e-5, "kl": {"beta": 0.0}}, "tags": ["a", "b"], "seed": 3,
           "empty": {}, "none": None}
    assert flatten_config(cfg) == {
        "algo.lr": "1e-05",
        "algo.kl.beta": "0.0",
        "tags": "['a', 'b']",
        "seed": "3",
        "empty": "{}",
        "none": "None",
    }
    assert flatten_config({"a": 1}, prefix="cfg.") == {"cfg.a": "1"}


def test_plot_curves_writes_png(tmp_path):
    series = {
        "reward/mean": [(s, s / 100 + (s % 7) * 0.05) for s in range(100)],
        "eval/accuracy": [(20, 0.1), (0, 0.0), (40, 0.3)],  # unsorted on purpose
        "empty": [],
    }
    out = plot_curves(series, tmp_path / "plots" / "reward.png", "reward", ylabel="mean", smooth=10)
    assert out == tmp_path / "plots" / "reward.png"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in out.parent.iterdir()] == ["reward.png"]  # no temp file left behind
    plot_curves({"loss": [(0, 1.0)]}, out, "overwrite")
    assert out.stat().st_size > 0
