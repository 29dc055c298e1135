"""Pipelines: training stages run in order, each feeding the next, each one MLflow child run.

    palaestra pipeline rlhf model=tiny                       # sft -> reward -> ppo -> evaluate -> export
    palaestra pipeline full                                  # data -> sft -> reward -> dpo -> ppo -> evaluate -> export
    palaestra pipeline mark                                  # MARK's: data -> mamba -> classifier -> rag -> grpo -> export
    palaestra pipeline aflow                                 # workflow writing: demonstrations -> sft -> grpo
    palaestra pipeline rlhf pipeline.skip=[reward]           # PPO on data.rewards instead of a reward model
    palaestra pipeline rlhf pipeline.stages=[sft,evaluate]   # any selection, in pipeline order
    palaestra pipeline rlhf sft.algo.epochs=1 ppo.train.steps=20   # keys for one stage only

What flows between stages: the *policy* (a Hugging Face folder: SFT's, then DPO's, then PPO's
output becomes the next stage's ``model=hf model.path=...``), the *reward model* folder (into PPO's
``algo.reward_model``) and the *data* folder (the data stage's output becomes ``data.path``). In
MARK's pipeline the data stage writes the three corpora (labelled text, a text corpus, a retrieval
set) that the classifier, mamba and rag stages read, GRPO is MARK's rl stage, and the export stage
gathers every stage's product (policy, classifier, language model, index) into one folder. In the
AFlow pipeline the data stage writes demonstration workflows for the workflow task's training
problems (:mod:`palaestra.workflows.demonstrations`), SFT teaches the policy the operator interface
on them, and GRPO (``experiment=aflow``) teaches it which workflows earn the reward, with its
evaluation before and after (the warm-started policy against the trained one).

The pipeline folder holds ``history.json`` (stage, status, seconds, outputs, error, MLflow run)
written atomically after every change, and one run folder per stage. A failed stage stops the
pipeline (``pipeline.continue_on_failure=true`` goes on with the stages that do not need its
output); running the same command again resumes: finished stages are kept and the failed stage
continues from its own latest checkpoint. Every stage's config is composed and validated before the
first model loads.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import traceback
from dataclasses import asdict, dataclass, field
from datetime import date, datetime
from pathlib import Path

from palaestra.config import PipelineJob
from palaestra.config.errors import ConfigError, check_writable
from palaestra.jobs import CONFIG_SECTIONS, reader_of, reads
from palaestra.recipes.methods import METHODS

log = logging.getLogger("palaestra")

PIPELINES: dict[str, tuple[str, ...]] = {
    "rlhf": ("sft", "reward", "ppo", "evaluate", "export"),
    "full": ("data", "sft", "reward", "dpo", "ppo", "evaluate", "export"),
    "mark": ("data", "mamba", "classifier", "rag", "grpo", "export"),
    "aflow": ("data", "sft", "grpo"),
}
"""Pipeline name -> its stages in order."""
STAGE_SETTINGS: dict[str, dict[str, tuple[str, ...]]] = {
    "aflow": {
        "sft": ("data.name=aflow_demonstrations", "data.max_length=1024", "algo.epochs=1", "train.sequences_per_step=4",
                "train.sequences_per_forward=4", "train.learning_rate=3e-4"),
        "grpo": ("experiment=aflow",),
    },
}
"""Pipeline name -> stage -> overrides that stage starts from (the command line's come after them)."""
EVALUATED_STAGES = {"aflow": ("grpo",)}
"""Pipeline name -> training stages whose recipe evaluates before and after (the others leave it to an
evaluate stage)."""
PRODUCTS = {"model_dir": "policy", "classifier_dir": "classifier", "language_model_dir": "language_model", "index_dir": "index"}
"""The folders stages hand on (a recipe's ``outputs``) -> their name in an export of several."""
TRAINING_STAGES = tuple(METHODS)
"""Stages that run a method's recipe (algo=<stage>): every method of the table, in its order."""
STAGES = ("data", *TRAINING_STAGES, "evaluate", "export")
"""Every stage name, in the order a pipeline runs them."""
TASK_STAGES = ("grpo", "at_grpo")
"""Training stages that read a task or an environment, not the data stage's files; they keep checkpoints."""
STAGE_METHOD = {**{stage: stage for stage in TRAINING_STAGES}, "evaluate": "ppo"}
"""Stage -> the method whose schema its config is (the evaluate stage reads ppo's model, data, eval and
tracking sections: a policy generating on the data's held-out prompts)."""


def pipeline_reads(override: str) -> bool:
    """Whether the pipeline itself reads the key ``override`` sets (its own settings, the data stage's, export's)."""
    return reads(PipelineJob, override)


def stage_reads(stage: str, override: str) -> bool:
    """Whether ``stage``'s config has the key ``override`` sets: a stage takes the command line's keys it reads."""
    return stage in STAGE_METHOD and reads(METHODS[STAGE_METHOD[stage]].schema, override)


@dataclass
class StageRecord:
    """What happened to one stage (the rows of history.json)."""

    stage: str
    status: str = "pending"
    """pending, running, succeeded, failed or skipped."""
    seconds: float = 0.0
    """Wall time of the last attempt."""
    outputs: dict = field(default_factory=dict)
    """Folders the stage produced: model_dir, reward_model_dir, data_path, export_dir."""
    metrics: dict = field(default_factory=dict)
    """Headline figures (the recipe's final evaluation, or the evaluate stage's metrics)."""
    mlflow_run_id: str | None = None
    error: str | None = None
    """The last line of the error of a failed attempt."""
    attempts: int = 0


@dataclass
class PipelineHistory:
    """The state of one pipeline folder; saved after every change so that a re-run can resume."""

    name: str
    folder: str
    stages: list[StageRecord]
    parent_run_id: str | None = None
    started: str = ""
    finished: bool = False

    @property
    def succeeded(self) -> bool:
        return all(r.status in ("succeeded", "skipped") for r in self.stages)

    def record(self, stage: str) -> StageRecord:
        return next(r for r in self.stages if r.stage == stage)

    def save(self) -> None:
        path = Path(self.folder) / "history.json"
        tmp = path.with_name(f".history.json.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(asdict(self), indent=2) + "\n")
        os.replace(tmp, path)

    @classmethod
    def load(cls, folder: Path) -> PipelineHistory:
        raw = json.loads((Path(folder) / "history.json").read_text())
        raw["stages"] = [StageRecord(**r) for r in raw["stages"]]
        return cls(**raw)

    def table(self) -> str:
        lines = [f"\npipeline {self.name}: {self.folder}", f"{'stage':<10}{'status':<11}{'seconds':>9}  outputs / error"]
        for r in self.stages:
            detail = r.error if r.status == "failed" else ", ".join(f"{k}={v}" for k, v in r.outputs.items())
            figures = "  " + " ".join(f"{k}={v:.3f}" for k, v in list(r.metrics.items())[:4]) if r.metrics else ""
            lines.append(f"{r.stage:<10}{r.status:<11}{r.seconds:>9.1f}  {detail}{figures}")
        return "\n".join(lines)


def split_stage_overrides(overrides: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """Separate ``<stage>.<section>.<key>=`` overrides (one stage only) from those every stage gets.

    A key is for one stage when it starts with a stage name followed by a config section, so
    ``data.path=`` and ``export.output_dir=`` stay ordinary keys.

    >>> split_stage_overrides(["model=tiny", "ppo.train.steps=3", "data.path=d", "sft.algo.epochs=1"])
    (['model=tiny', 'data.path=d'], {'ppo': ['train.steps=3'], 'sft': ['algo.epochs=1']})
    """
    sections = set(CONFIG_SECTIONS)
    common, per_stage = [], {}
    for override in overrides:
        prefix = override[: len(override) - len(override.lstrip("+~"))]
        key = override[len(prefix):].split("=", 1)[0]
        parts = key.split(".")
        if len(parts) >= 3 and parts[0] in STAGES and parts[1] in sections:
            per_stage.setdefault(parts[0], []).append(prefix + override[len(prefix) + len(parts[0]) + 1 :])
        else:
            common.append(override)
    return common, per_stage


def plan_stages(name: str, stages: list | None, skip: list) -> list[str]:
    """The stages to run: ``stages`` (default: the pipeline's), minus ``skip``, in the pipeline's order
    (stages it does not list go where they stand among every stage)."""
    if name not in PIPELINES:
        raise ConfigError(f"unknown pipeline {name!r}; use one of {', '.join(PIPELINES)}")
    chosen = list(stages) if stages else list(PIPELINES[name])
    for stage in [*chosen, *skip]:
        if stage not in STAGES:
            raise ConfigError(f"unknown pipeline stage {stage!r}; use some of {', '.join(STAGES)}")
    order = [*PIPELINES[name], *(s for s in STAGES if s not in PIPELINES[name])]
    planned = [s for s in order if s in chosen and s not in skip]
    if not planned:
        raise ConfigError("pipeline.stages minus pipeline.skip leaves nothing to run")
    return planned


def run_pipeline(
    name: str, config: PipelineJob, overrides: list[str], stage_overrides: dict[str, list[str]] | None = None
) -> PipelineHistory:
    """Run (or resume) pipeline ``name``; print and return its history.

    ``overrides`` are the command line's key=value strings (each stage takes those it reads; the
    pipeline's own are in ``config``) and ``stage_overrides`` the ones for a single stage
    (``{"ppo": ["train.steps=3"]}``).
    """
    stage_overrides = stage_overrides or {}
    stages = plan_stages(name, config.pipeline.stages, list(config.pipeline.skip))
    for stage in stage_overrides:
        if stage not in stages:
            raise ConfigError(f"overrides given for stage {stage!r}, which this pipeline does not run ({', '.join(stages)})")
    for override in overrides:
        if not pipeline_reads(override) and not any(stage_reads(stage, override) for stage in stages):
            key = override.lstrip("+~").split("=", 1)[0]
            readers = reader_of(key)
            hint = f" (algo={', '.join(readers)} {'reads' if len(readers) == 1 else 'read'} it)" if readers else ""
            raise ConfigError(f"no stage of pipeline {name} ({', '.join(stages)}) reads {key}{hint}; remove it")
    if config.pipeline.output_dir:
        check_writable("pipeline.output_dir", config.pipeline.output_dir)
    if "export" in stages:  # the last stage: its destination is checked before the first one trains
        check_writable("export.output_dir", config.export.output_dir)
    history = _open_history(name, config, stages)
    folder = Path(history.folder)
    from palaestra.recipes.run import attach_log_file

    attach_log_file(folder / "pipeline.log")

    # Every stage's config, composed and validated before any model loads (the data stage, cheap,
    # runs first when it is pending, so that the others can check the files it writes; the GRPO
    # stages read their task, not those files, and are checked before it: AFlow's data stage builds
    # its demonstrations from the GRPO stage's task).
    for stage in stages:
        if stage in TASK_STAGES and history.record(stage).status != "succeeded":
            _stage_config(stage, history, overrides, stage_overrides, chain=False)
    if "data" in stages and history.record("data").status != "succeeded":
        _run_stage("data", history, lambda: _data_stage(config, history, overrides, stage_overrides), None)
        if history.record("data").status == "failed" and not config.pipeline.continue_on_failure:
            return _finish(history, None)
    for stage in stages:
        if stage in TRAINING_STAGES and stage not in TASK_STAGES and history.record(stage).status != "succeeded":
            _stage_config(stage, history, overrides, stage_overrides, chain=False)
    tracker = _parent_tracker(config, history, stages)

    for stage in stages:
        record = history.record(stage)
        if record.status == "succeeded":
            log.info("stage %s: already done (%s)", stage, ", ".join(f"{k}={v}" for k, v in record.outputs.items()))
            continue
        missing = _missing_inputs(stage, history)
        if missing:
            record.status, record.error = "skipped", f"needs the output of the failed stage {missing}"
            history.save()
            continue
        if stage in TRAINING_STAGES:
            work = lambda s=stage: _training_stage(s, history, overrides, stage_overrides)  # noqa: E731
        elif stage == "evaluate":
            work = lambda: _evaluate_stage(history, overrides, stage_overrides)  # noqa: E731
        elif stage == "export":
            work = lambda: _export_stage(config, history)  # noqa: E731
        else:
            work = lambda: _data_stage(config, history, overrides, stage_overrides)  # noqa: E731
        _run_stage(stage, history, work, tracker)
        if record.status == "failed" and not config.pipeline.continue_on_failure:
            break
    return _finish(history, tracker)


# ---------------------------------------------------------------------------------------------
# the history folder and the parent run


def _open_history(name: str, config: PipelineJob, stages: list[str]) -> PipelineHistory:
    """A new pipeline folder, or (pipeline.resume=auto) the latest unfinished one of this name."""
    pipe = config.pipeline
    folder = Path(pipe.output_dir) if pipe.output_dir else None
    if folder is None and pipe.resume == "auto":
        root = Path("runs") / f"pipeline-{name}"
        for candidate in sorted(root.glob("*"), reverse=True):
            if (candidate / "history.json").is_file() and not PipelineHistory.load(candidate).finished:
                folder = candidate
                break
    if folder is not None and (folder / "history.json").is_file() and pipe.resume:
        history = PipelineHistory.load(folder)
        known = {r.stage: r for r in history.stages}
        history.stages = [known.get(s) or StageRecord(s) for s in stages]
        for record in history.stages:
            if record.status in ("failed", "running", "skipped"):
                record.status = "pending"
        history.finished = False
        log.info("pipeline %s: resuming %s", name, folder)
        history.save()
        return history
    if folder is None:
        folder = Path("runs") / f"pipeline-{name}" / datetime.now().strftime("%Y%m%d-%H%M%S")
        while folder.exists():
            folder = folder.with_name(folder.name + "-1")
    folder.mkdir(parents=True, exist_ok=True)
    history = PipelineHistory(name, str(folder), [StageRecord(s) for s in stages], started=datetime.now().isoformat(timespec="seconds"))
    history.save()
    return history


def _parent_tracker(config: PipelineJob, history: PipelineHistory, stages: list[str]):
    if not config.tracking.enabled:
        return None
    from palaestra.tracking import BufferedTracker

    # written through the pipeline folder's journal, like a training run's: a store that is away costs no stage
    tracker = BufferedTracker(Path(history.folder) / "tracking", config.tracking.experiment,
                              run_name=config.tracking.run_name or f"pipeline-{history.name}", run_id=history.parent_run_id,
                              tracking_uri=config.tracking.tracking_uri, required=config.tracking.required)
    if not tracker.resumed:
        tracker.log_params({"pipeline": history.name, "stages": ",".join(stages), "folder": str(Path(history.folder).resolve())})
        tracker.set_tags({"pipeline": history.name, "kind": "pipeline"})
    if tracker.run_id and history.parent_run_id is None:
        history.parent_run_id = tracker.run_id  # the stages' runs are its children
        history.save()
    return tracker


def _run_stage(stage: str, history: PipelineHistory, work, tracker) -> None:
    """Run one stage's work, timing it and recording success or failure in the history."""
    record = history.record(stage)
    record.status, record.error, record.attempts = "running", None, record.attempts + 1
    history.save()
    log.info("stage %s: starting (attempt %d)", stage, record.attempts)
    started = time.perf_counter()
    try:
        outputs, metrics, run_id = work()
        record.outputs, record.metrics, record.mlflow_run_id = outputs, metrics, run_id or record.mlflow_run_id
        record.status = "succeeded"
    except KeyboardInterrupt:
        record.status, record.error = "failed", "interrupted"
        record.seconds = time.perf_counter() - started
        history.save()
        raise
    except Exception as error:  # a stage's failure is recorded, not a crash of the pipeline
        record.status = "failed"
        record.error = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
        trace = "" if isinstance(error, ConfigError) else "\n" + traceback.format_exc()  # a user mistake: its line is enough
        log.error("stage %s failed: %s%s", stage, record.error, trace)
    record.seconds = time.perf_counter() - started
    history.save()
    log.info("stage %s: %s in %.1f s", stage, record.status, record.seconds)
    if tracker:
        tracker.log_metrics({f"stage/{stage}/seconds": record.seconds, f"stage/{stage}/succeeded": float(record.status == "succeeded")},
                            step=record.attempts)


def _finish(history: PipelineHistory, tracker) -> PipelineHistory:
    history.finished = history.succeeded
    history.save()
    if tracker:
        tracker.log_artifact(Path(history.folder) / "history.json")
        tracker.end("FINISHED" if history.succeeded else "FAILED")
    print(history.table())
    if tracker:  # the parent run: each stage is a child run under it
        print(f"\nMLflow parent run {tracker.run_id}: {tracker.run_url_hint()}" if tracker.run_id else f"\n{tracker.run_url_hint()}")
    if not history.succeeded:
        failed = [r.stage for r in history.stages if r.status == "failed"]
        print(f"\nstage(s) {', '.join(failed)} failed; run the same command again to resume from there")
    return history


# ---------------------------------------------------------------------------------------------
# what flows between stages


def _latest_output(history: PipelineHistory, key: str, before: str) -> str | None:
    """The newest ``key`` output of a succeeded stage that runs before ``before``."""
    value = None
    for record in history.stages:
        if record.stage == before:
            break
        if record.status == "succeeded" and key in record.outputs:
            value = record.outputs[key]
    return value


def _missing_inputs(stage: str, history: PipelineHistory) -> str | None:
    """The failed earlier stage whose output ``stage`` would have used, if any."""
    needs = {"model_dir": ("sft", "dpo", "ppo", "grpo", "at_grpo"), "reward_model_dir": ("reward",), "data_path": ("data",),
             "mark_data": ("data",)}
    uses = {"reward": ("model_dir", "data_path"), "ppo": ("model_dir", "reward_model_dir", "data_path"),
            "evaluate": ("model_dir", "data_path"), "export": ("model_dir",), "grpo": ("model_dir",), "at_grpo": ("model_dir",),
            "classifier": ("mark_data",), "mamba": ("mark_data",), "rag": ("mark_data",)}.get(stage, ("model_dir", "data_path"))
    for record in history.stages:
        if record.stage == stage:
            return None
        if record.status in ("failed", "skipped") and any(record.stage in needs[key] for key in uses):
            return record.stage
    return None


def _chain_overrides(stage: str, history: PipelineHistory) -> list[str]:
    """The overrides that feed earlier outputs into ``stage``."""
    chained = [f"train.output_dir={Path(history.folder) / stage}", "train.resume=auto"]
    data_path = _latest_output(history, "data_path", stage)
    if data_path:
        chained.append(f"data.path={data_path}")
    policy = _latest_output(history, "model_dir", stage)
    if policy:
        chained += ["model.name=hf", f"model.path={policy}"]
    reward_model = _latest_output(history, "reward_model_dir", stage)
    if stage == "ppo" and reward_model:
        chained.append(f"algo.reward_model={reward_model}")
    mark_data = _latest_output(history, "mark_data", stage)
    if mark_data:
        chained += [override.format(data=mark_data) for override in MARK_DATA.get(stage, ())]
    if history.parent_run_id:
        chained.append(f"tracking.parent_run_id={history.parent_run_id}")
    chained.append(f"tracking.run_name={history.name}/{stage}")
    return chained


MARK_DATA = {
    "classifier": ("algo.data={data}/classification",),
    "rag": ("algo.documents={data}/retrieval/documents.jsonl", "algo.queries={data}/retrieval/queries.jsonl"),
    "mamba": ("algo.corpus={data}/corpus",),
}
"""MARK's pipeline: which of the data stage's corpora each stage reads."""


def compose_config(overrides: list[str]):
    """Compose palaestra's Hydra config with ``overrides``, typed as its method's schema and checked (inside or
    outside a Hydra app), as the command line is: a key the YAML lacks but the schema has
    (``task.components.code.path``) is set."""
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    from palaestra.jobs import compose_job, register_schema, to_config

    register_schema()
    if GlobalHydra.instance().is_initialized():
        return to_config(compose_job(overrides))
    with initialize_config_module(config_module="palaestra.conf", version_base="1.3"):
        return to_config(compose_job(overrides))


def _stage_config(stage, history, overrides, stage_overrides, *, chain: bool = True):
    algo = [f"algo={STAGE_METHOD[stage]}", *STAGE_SETTINGS.get(history.name, {}).get(stage, ())]
    chained = _chain_overrides(stage, history) if chain else [f"train.output_dir={Path(history.folder) / stage}"]
    if not chain and _latest_output(history, "data_path", stage):
        chained.append(f"data.path={_latest_output(history, 'data_path', stage)}")
    common = [o for o in overrides if stage_reads(stage, o)]  # the command line's keys that its method reads
    chained = [o for o in chained if stage_reads(stage, o)]
    try:
        return compose_config([*common, *algo, *stage_overrides.get(stage, []), *chained])
    except ConfigError as error:
        raise ConfigError(f"stage {stage}: {error} (keys for one stage only: {stage}.<key>=<value>)") from None
    except Exception as error:  # Hydra's own override errors
        raise ConfigError(f"stage {stage}: {str(error).splitlines()[0]}") from None


# ---------------------------------------------------------------------------------------------
# the stages


def _training_stage(stage, history, overrides, stage_overrides):
    """A recipe: compose its config with the earlier stages' outputs and run it."""
    config = _stage_config(stage, history, overrides, stage_overrides)
    results = METHODS[stage].main(config, evaluate_before_after=stage in EVALUATED_STAGES.get(history.name, ()))
    if not results.get("finished", True):
        raise RuntimeError(f"{stage} stopped at step {results.get('step')} before the end")
    outputs = {key: str(Path(value).resolve()) for key, value in (results.get("outputs") or {}).items()}
    if stage in TASK_STAGES and "model_dir" not in outputs:
        outputs["model_dir"] = _export_checkpoint(config, Path(results["run_dir"]))
    figures = results.get("after") or results.get("figures") or {}
    return outputs, {k: float(v) for k, v in figures.items() if isinstance(v, (int, float))}, results.get("mlflow_run_id")


def _export_checkpoint(config, run_dir: Path) -> str:
    """GRPO/AT-GRPO keep checkpoints; the pipeline passes on a merged Hugging Face folder."""
    from palaestra.export import export_command

    export_command(config.model, str(run_dir), str(run_dir / "model"), merge=True)
    return str((run_dir / "model").resolve())


def _data_stage(config: PipelineJob, history: PipelineHistory, overrides, stage_overrides):
    """Write today's dataset into the pipeline folder with ``data.generator`` (the planner's, say), or
    check that ``data.path`` exists; MARK's pipeline writes its three corpora instead, and the AFlow
    pipeline demonstration workflows for its GRPO stage's training problems."""
    folder = Path(history.folder)
    if history.name == "mark":
        from palaestra.data.mark import prepare_mark_data

        return {"mark_data": str(prepare_mark_data(folder / "data").resolve())}, {}, None
    if history.name == "aflow":
        from palaestra.tasks.build import build_task
        from palaestra.workflows.demonstrations import write_demonstrations

        grpo = _stage_config("grpo", history, overrides, stage_overrides, chain=False)
        written = write_demonstrations(build_task(grpo.task), folder / "data" / date.today().isoformat(), seed=grpo.task.seed)
        return {"data_path": str(written.resolve())}, {}, None
    if not config.data.generator:
        if not Path(config.data.path).exists():
            raise FileNotFoundError(f"data.path={config.data.path} does not exist")
        return {"data_path": str(Path(config.data.path).resolve())}, {}, None
    from palaestra.plugins import lookup

    generate = lookup(config.data.generator, {}, "data.generator")
    dated = Path(generate(folder / "data", date=date.today().isoformat()))
    return {"data_path": str(dated.resolve())}, {}, None


def _evaluate_stage(history, overrides, stage_overrides):
    """Greedy answers of the current policy on the data's test split, scored by the task metrics."""
    from palaestra.evaluation.chat_eval import evaluate_chat
    from palaestra.evaluation.cli import track_evaluation
    from palaestra.models import load_model_and_tokenizer
    from palaestra.runtime import training_device
    from palaestra.registry.replay import load_replay_dataset

    stage = _stage_config("evaluate", history, overrides, stage_overrides)
    examples, _, version = load_replay_dataset(stage.data.path, stage.eval.max_examples)
    device = training_device(stage.train.device)
    model, tokenizer = load_model_and_tokenizer(stage.model.name, path=stage.model.path, device=device)
    model.eval()
    predictions: list[dict] = []
    metrics = evaluate_chat(model, tokenizer, examples, stage.data.name, max_new_tokens=stage.eval.max_new_tokens or 256,
                            batch_size=min(stage.eval.batch_size, 16), rows=predictions, show_progress=True)
    log.info("evaluate: %s", " ".join(f"{k}={v:.3f}" for k, v in metrics.items()))
    tags = {"stage": "evaluate", "dataset_version": version, "model_path": str(stage.model.path or stage.model.name)}
    if history.parent_run_id:
        tags["mlflow.parentRunId"] = history.parent_run_id
    run_id, _ = track_evaluation(
        stage.tracking, f"{history.name}/evaluate", metrics, tags=tags,
        params={"model": str(stage.model.path or stage.model.name), "dataset_version": version, "examples": len(examples)},
        artifacts=lambda tracker: tracker.log_table(predictions, "eval/predictions.json"),
    )
    return {}, metrics, run_id


def _export_stage(config: PipelineJob, history: PipelineHistory):
    """Copy the final policy (already a merged Hugging Face folder) to export.output_dir, atomically;
    when earlier stages made other products too (MARK's pipeline), each goes into its own subfolder
    (policy/, classifier/, language_model/, index/)."""
    products = {key: _latest_output(history, key, "export") for key in PRODUCTS}
    products = {key: folder for key, folder in products.items() if folder}
    if not products:
        raise ConfigError("nothing to export: no earlier stage produced a model (run sft, dpo, ppo or grpo)")
    target = Path(config.export.output_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".tmp-{target.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    if list(products) == ["model_dir"]:
        shutil.copytree(products["model_dir"], tmp)
    else:
        for key, folder in products.items():
            shutil.copytree(folder, tmp / PRODUCTS[key])
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)
    return {"export_dir": str(target.resolve()), **products}, {}, None
