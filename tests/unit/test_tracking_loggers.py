"""Loggers beside MLflow (tracking.loggers): TensorBoard event files, read back with TensorBoard's own reader, hold
every step's figures exactly once, also across a run stopped before its logger took everything."""

from __future__ import annotations

import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from palaestra.config.errors import ConfigError  # noqa: E402
from palaestra.config.tracking import RegisteredTracking, validate_tracking  # noqa: E402
from palaestra.tracking import BufferedTracker  # noqa: E402
from palaestra.tracking.mirrors import Mirror  # noqa: E402


def _events(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0, "images": 0})
    events.Reload()
    return events


def _plot(path):
    figure, axes = plt.subplots(figsize=(2, 2))
    axes.plot([0, 1], [1, 0])
    figure.savefig(path)
    plt.close(figure)
    return path


def test_tensorboard_gets_every_figure_table_plot_and_the_config(tmp_path):
    tracker = BufferedTracker(tmp_path / "run" / "tracking", "exp", loggers=["tensorboard"])
    assert tracker.run_id == "" and tracker.live() is None  # no MLflow run: TensorBoard only
    tracker.log_params({"algo.beta": 0.04, "train.steps": 5})
    tracker.set_tags({"task": "chain_sum"})
    for step in range(1, 6):
        tracker.log_metrics({"loss": 1.0 / step, "reward/mean": 0.1 * step}, step)
    tracker.log_table([{"question": "1+1", "completion": "2"}], "samples/step000001.json")
    tracker.log_dict({"algo": {"beta": 0.04}}, "config.yaml")
    tracker.log_artifact(_plot(tmp_path / "reward_curve.png"), "plots")
    tracker.end()

    events = _events(tmp_path / "run" / "tensorboard")
    assert [(s.step, round(s.value, 6)) for s in events.Scalars("loss")] == [(i, round(1.0 / i, 6)) for i in range(1, 6)]
    assert [s.step for s in events.Scalars("reward/mean")] == [1, 2, 3, 4, 5]
    texts = {tag.split("/text_summary")[0] for tag in events.Tags()["tensors"]}
    assert {"params", "tags", "samples/step000001.json", "config.yaml"} <= texts
    params = events.Tensors("params/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "| algo.beta | 0.04 |" in params
    assert events.Tags()["images"] == ["plots/reward_curve"]
    assert (tmp_path / "run" / "tracking" / "sent-tensorboard").read_text() == str(
        len((tmp_path / "run" / "tracking" / "journal.jsonl").read_text().splitlines()))


def test_a_resumed_run_sends_what_its_logger_had_not_taken_and_nothing_twice(tmp_path):
    folder = tmp_path / "run" / "tracking"
    first = BufferedTracker(folder, "exp", loggers=["tensorboard"])
    for step in range(1, 4):
        first.log_metrics({"loss": float(step)}, step)
    first.close()
    # as if the process had been killed after the logger took two records: the count says 2
    (folder / "sent-tensorboard").write_text("2")
    for path in (tmp_path / "run" / "tensorboard").iterdir():
        path.unlink()
    with (folder / "journal.jsonl").open() as handle:
        first_records = [json.loads(line) for line in handle]
    assert [r["op"] for r in first_records] == ["start", "metrics", "metrics", "metrics"]

    resumed = BufferedTracker(folder, "exp", loggers=["tensorboard"])
    assert resumed.resumed
    for step in range(4, 6):
        resumed.log_metrics({"loss": float(step)}, step)
    resumed.end()
    # records 3.. of the first process (steps 2 and 3), then the resumed run's own; step 1 was taken before
    assert [s.step for s in _events(tmp_path / "run" / "tensorboard").Scalars("loss")] == [2, 3, 4, 5]


class _Flaky:
    """A logger that is away for its first ``away`` attempts, then takes every record."""

    def __init__(self, away: int):
        self.away, self.taken, self.closed = away, [], False

    def write(self, record):
        if self.away:
            self.away -= 1
            raise ConnectionError("connection refused")
        self.taken.append(record)

    def close(self):
        self.closed = True


def test_a_logger_that_is_away_gets_every_record_in_order_when_it_is_back(tmp_path, monkeypatch):
    monkeypatch.setattr("palaestra.tracking.mirrors._RETRY_SECONDS", 0.05)
    journal = tmp_path / "journal.jsonl"
    journal.write_text("".join(json.dumps({"op": "metrics", "metrics": {"x": i}, "step": i, "time": 0}) + "\n"
                               for i in range(1, 4)) + '{"op": "metrics", "metr')  # the last line is still being written
    logger = _Flaky(away=2)
    mirror = Mirror(tmp_path, "flaky", logger)
    with journal.open("a") as handle:
        handle.write('ics": {"x": 4}, "step": 4, "time": 0}\n')
    mirror.notify()
    mirror.close(wait_seconds=10)
    assert [record["step"] for record in logger.taken] == [1, 2, 3, 4] and logger.closed
    assert (tmp_path / "sent-flaky").read_text() == "4"


def test_logger_settings_are_checked_in_one_line():
    with pytest.raises(ConfigError, match="tracking.loggers='comet' is unknown; use one of mlflow, tensorboard"):
        validate_tracking(RegisteredTracking(loggers=["mlflow", "comet"]))
    with pytest.raises(ConfigError, match="names a logger twice"):
        validate_tracking(RegisteredTracking(loggers=["tensorboard", "tensorboard"]))
    with pytest.raises(ConfigError, match="add mlflow to tracking.loggers"):
        validate_tracking(RegisteredTracking(loggers=["tensorboard"], registered_model="planner_model"))


@pytest.mark.slow
def test_a_training_run_logs_to_mlflow_tensorboard_and_wandb_alike(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from tests.conftest import run_cli
    from tests.recipes.test_grpo_cli import TINY

    monkeypatch.setenv("WANDB_MODE", "offline")  # run_cli's process inherits it
    monkeypatch.setenv("WANDB_SILENT", "true")
    result = run_cli(["train", *TINY, "train.steps=3", "train.eval_interval=2", "tracking.loggers=[mlflow,tensorboard,wandb]",
                      "tracking.wandb_project=planner", "train.output_dir=run"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    events = _events(tmp_path / "run" / "tensorboard")
    _, history, config = _wandb_run(tmp_path / "run" / "wandb")
    state = json.loads((tmp_path / "run" / "checkpoints" / "step-000003" / "trainer_state.json").read_text())
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    for name in ("loss", "reward/mean", "tokens_per_second", "eval/accuracy"):
        stored = [(m.step, m.value) for m in sorted(client.get_metric_history(state["mlflow_run_id"], name), key=lambda m: m.step)]
        logged = [(s.step, s.value) for s in events.Scalars(name)]
        assert stored and [step for step, _ in logged] == [step for step, _ in stored], name  # the same steps in both
        assert [value for _, value in logged] == pytest.approx([value for _, value in stored], rel=1e-6), name  # TB: float32
        in_wandb = [(step, values[name]) for step, values in sorted(history.items()) if name in values]
        assert [step for step, _ in in_wandb] == [step for step, _ in stored], name
        assert [v for _, v in in_wandb] == pytest.approx([v for _, v in stored], rel=1e-9), name
    assert "plots/reward_curve" in events.Tags()["images"]
    assert config["algo.beta"] == "0.0" and config["tags/task"] == "chain_sum"


# ---------------------------------------------------------------------------------------- W&B


def _wandb_records(path):
    """The records of an offline W&B run file (``run-<id>.wandb``), decoded with W&B's own protobuf messages: the
    file is a W&B header, then LevelDB-log framing (32 KiB blocks; 7-byte chunk headers: crc, length, type)."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    position, block, pending = 7, 32768, b""
    while position + 7 <= len(data):
        left = block - position % block
        if left < 7:  # a block's tail too short for a header is padding
            position += left
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if length == 0 and kind == 0:
            position += left
            continue
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def _wandb_run(folder):
    """(run id, {step: {key: value}}, config {key: value}) of the offline run files under ``folder``."""
    history, config, run_ids = {}, {}, set()
    for path in sorted(folder.glob("wandb/offline-run-*/run-*.wandb")):
        for record in _wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run_ids.add(record.run.run_id)
            elif kind == "history":
                items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
                history.setdefault(int(items["_step"]), {}).update(items)
            elif kind == "config":
                config.update({item.key: json.loads(item.value_json) for item in record.config.update})
    return run_ids, history, config


def test_wandb_offline_run_files_hold_every_step_the_config_and_the_tables(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    folder = tmp_path / "run" / "tracking"
    tracker = BufferedTracker(folder, "exp", run_name="chain_sum-grpo", loggers=["wandb"],
                              logger_options={"wandb": {"project": "planner", "run_name": None}})
    tracker.log_params({"algo.beta": 0.04})
    tracker.set_tags({"task": "chain_sum"})
    for step in range(1, 4):
        tracker.log_metrics({"loss": 1.0 / step}, step)
    tracker.log_table([{"question": "1+1", "completion": "2"}], "samples/step000003.json")
    tracker.log_artifact(_plot(tmp_path / "reward_curve.png"), "plots")
    tracker.close()  # stopped without an end, as a killed run is

    resumed = BufferedTracker(folder, "exp", loggers=["wandb"], logger_options={"wandb": {"project": "planner"}})
    for step in range(4, 6):
        resumed.log_metrics({"loss": 1.0 / step}, step)
    resumed.end()

    run_ids, history, config = _wandb_run(tmp_path / "run" / "wandb")
    assert run_ids == {json.loads((folder / "wandb.json").read_text())["id"]}  # the resumed run continued the same run
    assert json.loads((folder / "wandb.json").read_text())["project"] == "planner"
    assert {step: round(values["loss"], 6) for step, values in history.items() if "loss" in values} == {
        step: round(1.0 / step, 6) for step in range(1, 6)}
    assert history[3]["samples/step000003/_type"] == "table-file" and history[3]["samples/step000003/nrows"] == 1
    assert history[3]["plots/reward_curve/_type"] == "image-file"  # media go in at the step they were logged after
    assert config["algo.beta"] == "0.04" and config["tags/task"] == "chain_sum"  # the params as MLflow has them: text
