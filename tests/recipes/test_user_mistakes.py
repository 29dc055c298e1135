"""A catalogue of user mistakes through the real ``palaestra`` command, and what each must give.

palaestra's promise for every mistake a user can make on the command line: a non-zero exit code,
no Python traceback, and one line ``palaestra: error: ...`` (``palaestra <command>: error: ...`` for
the argparse commands) that names the bad key, value or file. A config or data mistake is found
before any model is built, and a pure config mistake before torch is imported. Each case runs the
real CLI through :mod:`tests.recipes.cli_probe`, which records what was imported and built.

How far a case may get (``before``): ``TORCH``: torch was never imported (a config mistake); ``MODEL``:
no model was built, though torch was imported (a data file is read by the recipe, a checkpoint folder
by the evaluation). Read-only folders stop no one running as root: those cases are skipped for root;
a path under an existing *file* fails for everyone and stands for them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from palaestra.cli import PLAIN_COMMANDS
from tests.conftest import REPO, WARM, warm, write_gsm8k

pytestmark = pytest.mark.slow

TORCH, MODEL = "torch", "model"
TINY = ["model=tiny", "tracking.enabled=false"]
QUICK = [*TINY, "experiment=quick_test", "train.steps=2"]
ERROR_LINE = re.compile(r"^palaestra( [a-z]+)*: error: ")


@dataclass(frozen=True)
class Mistake:
    args: list[str]
    """The command line after ``palaestra``; ``{run}`` is a finished tiny GRPO run (the ``trained_run`` fixture)."""
    names: str
    """What the error line must contain (the bad key, value or file)."""
    before: str = TORCH
    """TORCH or MODEL (see the module docstring)."""
    stdout: str = ""
    """What stdout must contain as well (``--cfg job`` prints the config)."""
    as_root: bool = True
    """False: the mistake is a read-only folder, which root can write anyway (the case is skipped for root)."""


CHAT = {"messages": [{"role": "user", "content": "plan a meal"}, {"role": "assistant", "content": "rice and beans"}]}


def _workspace(root: Path) -> None:
    """The small files the mistakes point at, in the test's working directory."""
    (root / "empty.jsonl").write_text("")
    (root / "empty.txt").write_text("")
    write_gsm8k(root / "gsm8k.jsonl", count=4)
    (root / "brokenchat.jsonl").write_text(json.dumps(CHAT) + "\n{\"messages\": [\n")
    (root / "notjson.jsonl").write_text((root / "gsm8k.jsonl").read_text().splitlines()[0] + "\n{question: 'two'}\n")
    (root / "latin1.jsonl").write_bytes(json.dumps(CHAT, ensure_ascii=False).replace("rice", "riz épicé").encode("latin-1") + b"\n")
    (root / "chat_only").mkdir()
    (root / "chat_only" / "train.jsonl").write_text(4 * (json.dumps(CHAT) + "\n"))
    (root / "pairs").mkdir()
    (root / "pairs" / "preferences_train.jsonl").write_text(json.dumps({"prompt": "plan", "chosen": "a", "rejected": "b"}) + "\n")
    (root / "labels.jsonl").write_text('{"text": "the printer is jammed", "label": "hardware"}\n{"text": oops}\n')
    (root / "afile").write_text("a file, not a folder\n")
    (root / "emptydir").mkdir()
    (root / "readonly").mkdir()
    (root / "readonly").chmod(0o555)
    (root / "bad.yaml").write_text("train: [unclosed\n")
    (root / "list.yaml").write_text("- train.steps=3\n")
    (root / "sections.yaml").write_text("trian:\n  steps: 3\n")
    dated = root / "datasets" / "planner" / "2026-01-15"
    dated.mkdir(parents=True)
    (dated / "manifest.json").write_text('{"task": "planner", "date": "2026-01-15"}\n')


MISTAKES: dict[str, Mistake] = {
    # ---- palaestra train, GRPO (the default method): values, types, keys, group options
    "grpo-negative-lr": Mistake(["train", *TINY, "train.learning_rate=-1"], "train.learning_rate=-1"),
    "grpo-zero-steps": Mistake(["train", *TINY, "train.steps=0"], "train.steps=0"),
    "grpo-zero-batch": Mistake(["train", *TINY, "train.completions_per_step=0"], "train.completions_per_step=0"),
    "grpo-negative-micro-batch": Mistake(["train", *TINY, "train.completions_per_forward=-4"], "train.completions_per_forward=-4"),
    "grpo-renamed-batch-key": Mistake(["train", *TINY, "train.batch_size=8"], "train.completions_per_step now"),
    "agent-unknown-tool": Mistake(["train", *TINY, "agent.tools=[abacus]"], "agent.tools: 'abacus' is not a tool"),
    "agent-tool-without-schema": Mistake(["train", *TINY, "agent.tools=[tests.unit.test_agent_tools:no_docstring]"],
                                         "tool 'no_docstring': its JSON schema cannot be built"),
    "agent-zero-turns": Mistake(["train", *TINY, "agent.tools=[calculator]", "agent.max_turns=0"], "agent.max_turns=0"),
    "agent-program-not-importable": Mistake(["train", *TINY, "agent.program=no_such_package.agents:run"],
                                            "agent.program 'no_such_package.agents:run' could not be imported"),
    "agent-program-without-function": Mistake(["train", *TINY, "agent.program=run"], "agent.program='run' must be"),
    "agent-program-wrong-signature": Mistake(["train", *TINY, "agent.program=tests.recipes.agent_programs:one_argument"],
                                             "cannot be called as run(example, client)"),
    "agent-program-and-tools": Mistake(["train", *TINY, "agent.program=tests.recipes.agent_programs:openai_agent",
                                        "agent.tools=[calculator]"], "agent.program and agent.tools"),
    "agent-program-dynamic-sampling": Mistake(["train", *TINY, "agent.program=tests.recipes.agent_programs:openai_agent",
                                               "algo.dynamic_sampling=true"], "algo.dynamic_sampling"),
    "agent-tools-on-a-server": Mistake(["train", *TINY, "agent.tools=[calculator]", "model.lora.enabled=true",
                                        "rollout.engine=server", "rollout.servers=[http://127.0.0.1:9]"], "agent.tools"),
    "rollout-unknown-quantization": Mistake(["train", *TINY, "rollout.quantize=int4"], "rollout.quantize='int4'"),
    "rollout-int8-on-a-server": Mistake(["train", *TINY, "rollout.quantize=int8", "model.lora.enabled=true",
                                         "rollout.engine=server", "rollout.servers=[http://127.0.0.1:9]"],
                                        "rollout.quantize=int8 quantizes palaestra's own sampler"),
    "rollout-int8-with-tools": Mistake(["train", *TINY, "rollout.quantize=int8", "agent.tools=[calculator]"],
                                       "use rollout.quantize=none with it"),
    "negative-time-budget": Mistake(["train", *TINY, "train.time_budget_s=-5"], "train.time_budget_s=-5"),
    "grpo-string-for-number": Mistake(["train", *TINY, "train.steps=ten"], "train.steps"),
    "grpo-group-of-one": Mistake(["train", *TINY, "algo.num_generations=1"], "algo.num_generations=1"),
    "grpo-batch-not-divisible": Mistake(["train", *TINY, "train.completions_per_step=6", "algo.num_generations=4"], "train.completions_per_step=6"),
    "grpo-unknown-loss": Mistake(["train", *TINY, "algo.loss_type=hinge"], "algo.loss_type='hinge'"),
    "grpo-top-p": Mistake(["train", *TINY, "algo.top_p=1.5"], "algo.top_p=1.5"),
    "unknown-model-option": Mistake(["train", "model=gpt5"], "model=gpt5"),
    "unknown-model-name": Mistake(["train", "model.name=gpt5", "tracking.enabled=false"], "model.name='gpt5'"),
    "hf-model-without-path": Mistake(["train", "model=hf", "tracking.enabled=false"], "model.path"),
    "missing-model-path": Mistake(["train", "model=hf", "model.path=./nowhere", "tracking.enabled=false"], "model.path=./nowhere"),
    "unknown-task-option": Mistake(["train", *TINY, "task=chess"], "task=chess"),
    "unknown-dataset": Mistake(["train", *TINY, "task.dataset=chess"], "task.dataset='chess'"),
    "unknown-algo-option": Mistake(["train", *TINY, "algo=rm"], "algo=rm"),
    "unknown-algo-name": Mistake(["train", *TINY, "algo.name=reward_model"], "algo.name='reward_model'"),
    "unknown-experiment": Mistake(["train", *TINY, "experiment=quick"], "experiment=quick"),
    "unknown-key": Mistake(["train", *TINY, "train.stepz=3"], "train.stepz"),
    "unknown-key-appended": Mistake(["train", *TINY, "+train.stepz=3"], "train.stepz"),
    "unknown-section": Mistake(["train", *TINY, "trian.steps=3"], "trian"),
    "append-existing-key": Mistake(["train", *TINY, "+train.steps=3"], "train.steps"),
    "override-syntax": Mistake(["train", *TINY, "train.steps=[1"], "train.steps=[1"),
    "unquoted-braces": Mistake(["train", *TINY, "task.template={answer}"], "task.template={answer}"),
    "sweep-without-multirun": Mistake(["train", *TINY, "train.seed=0,1"], "train.seed=0,1"),
    "unknown-hydra-flag": Mistake(["train", *TINY, "--cfgg", "job"], "--cfgg"),
    "unknown-reward": Mistake(["train", *TINY, "task.rewards=[kindness]"], "kindness"),
    "unknown-device": Mistake(["train", *TINY, "train.device=tpu"], "train.device='tpu'"),
    "ignored-key": Mistake(["train", *TINY, "algo=sft", "train.steps=3"], "train.steps"),
    "cfg-job-invalid": Mistake(["train", "--cfg", "job", *TINY, "train.learning_rate=-1"], "train.learning_rate=-1",
                               stdout="learning_rate: -1"),
    "multirun-second-job-invalid": Mistake(["train", "-m", *QUICK, "train.steps=1", "train.learning_rate=0.001,-1"],
                                           "train.learning_rate=-1"),
    # ---- task files (read before the model loads)
    "gsm8k-missing-file": Mistake(["train", *TINY, "task=gsm8k", "task.path=nowhere.jsonl"], "task.path=nowhere.jsonl"),
    "gsm8k-folder-as-file": Mistake(["train", *TINY, "task=gsm8k", "task.path=emptydir"], "task.path=emptydir"),
    "gsm8k-empty-file": Mistake(["train", *TINY, "task=gsm8k", "task.path=empty.jsonl"], "empty.jsonl", MODEL),
    "gsm8k-line-not-json": Mistake(["train", *TINY, "task=gsm8k", "task.path=notjson.jsonl"], "notjson.jsonl:2", MODEL),
    "mixture-math-path-as-hydra-refuses": Mistake(  # Hydra's YAML gives the component no path; the schema has one
        ["train", *TINY, "task=mixture", "task.components.math.source=gsm8k", "task.components.math.path=empty.jsonl"],
        "empty.jsonl", MODEL),
    "mixture-math-path-as-hydra-suggests": Mistake(
        ["train", *TINY, "task=mixture", "task.components.math.source=gsm8k", "+task.components.math.path=empty.jsonl"],
        "empty.jsonl", MODEL),
    "mixture-new-component-without-source": Mistake(["train", *TINY, "task=mixture", "+task.components.extra.path=gsm8k.jsonl"],
                                                    "task.components.extra.source"),
    # ---- run folders and resume
    "resume-not-a-checkpoint": Mistake(["train", *TINY, "train.resume=emptydir"], "train.resume=emptydir"),
    "resume-missing": Mistake(["train", *TINY, "train.resume=runs/nothing"], "train.resume=runs/nothing"),
    "resume-below-checkpoint": Mistake(["train", *QUICK, "train.steps=1", "train.resume=auto", "train.output_dir={run}"],
                                       "train.steps=1"),
    "output-dir-is-a-file": Mistake(["train", *TINY, "train.output_dir=afile"], "train.output_dir=afile"),
    "output-dir-under-a-file": Mistake(["train", *TINY, "train.output_dir=afile/run"], "train.output_dir=afile/run"),
    "output-dir-read-only": Mistake(["train", *TINY, "train.output_dir=readonly/run"], "train.output_dir=readonly/run",
                                    as_root=False),
    # ---- MARK's flags
    "target-unknown": Mistake(["train", "--target=quantum", *TINY], "quantum"),
    "target-full-pipeline-on-eval": Mistake(["eval", "--target=full-pipeline"], "--target=full-pipeline"),
    "device-unknown": Mistake(["train", "--device", "tpu", *TINY], "train.device='tpu'"),
    "device-without-value": Mistake(["train", "--device"], "--device"),
    "resume-with-value": Mistake(["train", "--resume=yes"], "--resume"),
    "config-missing": Mistake(["train", "--config", "mine.yaml"], "mine.yaml"),
    "config-bad-yaml": Mistake(["train", "--config", "bad.yaml"], "bad.yaml"),
    "config-not-a-mapping": Mistake(["train", "--config=list.yaml"], "list.yaml"),
    "config-unknown-section": Mistake(["train", "--config=sections.yaml"], "trian"),
    # ---- the data methods: sft, reward, dpo, ppo
    "sft-missing-data": Mistake(["train", *TINY, "algo=sft", "data.path=nowhere"], "data.path=nowhere"),
    "sft-not-utf8": Mistake(["train", *TINY, "algo=sft", "data.path=latin1.jsonl"], "latin1.jsonl", MODEL),
    "sft-empty-file": Mistake(["train", *TINY, "algo=sft", "data.path=empty.jsonl"], "empty.jsonl", MODEL),
    "sft-line-not-json": Mistake(["train", *TINY, "algo=sft", "data.path=brokenchat.jsonl"], "brokenchat.jsonl:2", MODEL),
    "sft-zero-epochs": Mistake(["train", *TINY, "algo=sft", "data.path=chat_only", "algo.epochs=0"], "algo.epochs=0"),
    "reward-no-pairs": Mistake(["train", *TINY, "algo=reward", "data.path=chat_only"], "preferences_train.jsonl"),
    "reward-string-margin": Mistake(["train", *TINY, "algo=reward", "data.path=pairs", "algo.margin=wide"], "algo.margin"),
    "dpo-zero-beta": Mistake(["train", *TINY, "algo=dpo", "data.path=pairs", "algo.beta=0"], "algo.beta=0"),
    "dpo-unknown-loss": Mistake(["train", *TINY, "--target=dpo", "data.path=pairs", "algo.loss_type=hinge"],
                                "algo.loss_type='hinge'"),
    "ppo-missing-reward-model": Mistake(["train", *TINY, "algo=ppo", "data.path=chat_only", "algo.reward_model=nowhere"],
                                        "algo.reward_model=nowhere"),
    "ppo-gamma": Mistake(["train", *TINY, "algo=ppo", "data.path=chat_only", "algo.gamma=2"], "algo.gamma=2"),
    # ---- teams of agents
    "at-grpo-unknown-env-option": Mistake(["train", *TINY, "algo=at_grpo", "env=chess"], "env=chess"),
    "at-grpo-unknown-env-name": Mistake(["train", *TINY, "algo=at_grpo", "env.name=chess"], "chess"),
    "at-grpo-group-of-one": Mistake(["train", *TINY, "algo=at_grpo", "algo.samples_per_state=1"], "algo.samples_per_state=1"),
    "at-grpo-unknown-policy": Mistake(["train", *TINY, "algo=at_grpo", "policy.mode=swarm"], "policy.mode='swarm'"),
    # ---- MARK's targets: classifier, mamba, rag
    "classifier-missing-data": Mistake(["train", "--target=transformer", "model.name=tiny", "algo.data=nowhere"], "algo.data=nowhere"),
    "classifier-one-label": Mistake(["train", "--target=classifier", "algo.num_labels=1"], "algo.num_labels=1"),
    "classifier-line-not-json": Mistake(["train", "--target=classifier", "model.name=tiny", "algo.data=labels.jsonl"],
                                        "labels.jsonl:2", MODEL),
    "mamba-missing-corpus": Mistake(["train", "--target=mamba", "algo.corpus=nowhere.txt"], "algo.corpus=nowhere.txt"),
    "mamba-small-vocabulary": Mistake(["train", "--target=mamba", "algo.vocab_size=100"], "algo.vocab_size=100"),
    "mamba-empty-corpus": Mistake(["train", "--target=mamba", "algo.corpus=empty.txt"], "empty.txt", MODEL),
    "rag-missing-documents": Mistake(["train", "--target=rag", "algo.documents=nowhere.jsonl"], "algo.documents=nowhere.jsonl"),
    "rag-unknown-mode": Mistake(["train", "--target=rag", "algo.mode=sparse"], "algo.mode='sparse'"),
    "rag-empty-documents": Mistake(["train", "--target=rag", "algo.documents=empty.jsonl"], "empty.jsonl", MODEL),
    # ---- palaestra run, eval, export
    "run-group-of-one": Mistake(["run", *TINY, "algo.num_generations=1"], "algo.num_generations=1"),
    "eval-missing-checkpoint": Mistake(["eval", *TINY, "eval.checkpoint=/nope"], "eval.checkpoint=/nope"),
    "eval-not-a-checkpoint": Mistake(["eval", *TINY, "eval.checkpoint=emptydir"], "eval.checkpoint=emptydir", MODEL),
    "eval-greedy-samples": Mistake(["eval", *TINY, "eval.num_samples=4"], "eval.num_samples=4"),
    "eval-rag-without-checkpoint": Mistake(["eval", "algo=rag"], "eval.checkpoint", MODEL),
    "export-without-checkpoint": Mistake(["export", "model=tiny"], "eval.checkpoint"),
    "export-missing-checkpoint": Mistake(["export", "model=tiny", "eval.checkpoint=nowhere"], "eval.checkpoint=nowhere"),
    "export-under-a-file": Mistake(["export", "model=tiny", "eval.checkpoint=emptydir", "export.output_dir=afile/exported"],
                                   "export.output_dir=afile/exported"),
    "export-read-only": Mistake(["export", "model=tiny", "eval.checkpoint=emptydir", "export.output_dir=readonly/exported"],
                                "export.output_dir=readonly/exported", as_root=False),
    # ---- palaestra pipeline: every stage's config is checked before the first one trains
    "pipeline-unnamed": Mistake(["pipeline"], "palaestra pipeline rlhf|full|mark|aflow"),
    "pipeline-unknown-stage": Mistake(["pipeline", "rlhf", *TINY, "pipeline.stages=[sft,judge]"], "judge", MODEL),
    "pipeline-missing-data": Mistake(["pipeline", "rlhf", *TINY, "data.path=nowhere"], "data.path=nowhere", MODEL),
    "pipeline-stage-value": Mistake(["pipeline", "rlhf", *TINY, "data.path=chat_only", "pipeline.skip=[reward]",
                                     "ppo.train.steps=0"], "train.steps=0", MODEL),
    "pipeline-export-under-a-file": Mistake(["pipeline", "rlhf", *TINY, "data.path=chat_only", "pipeline.skip=[reward]",
                                             "export.output_dir=afile/exported"],
                                            "export.output_dir=afile/exported"),
    "pipeline-mark-bad-data-setting": Mistake(["pipeline", "mark", *TINY, "classifier.algo.val_fraction=0.9"],
                                              "algo.val_fraction=0.9", MODEL),
    "pipeline-aflow-grpo-setting": Mistake(["pipeline", "aflow", *TINY, "grpo.task.workflow.executor.backend=nope"],
                                           "task.workflow.executor.backend", MODEL),
    "pipeline-mark-target": Mistake(["train", "--target=full-pipeline", *TINY, "rag.algo.ks=[0]"], "algo.ks", MODEL),
    # ---- palaestra serve
    "serve-port-range": Mistake(["serve", "model=tiny", "serve.port=99999"], "serve.port=99999"),
    "serve-port-string": Mistake(["serve", "model=tiny", "serve.port=http"], "serve.port"),
    "serve-missing-model-path": Mistake(["serve", "model=hf", "model.path=./nowhere"], "model.path=./nowhere"),
    "serve-missing-run": Mistake(["serve", "model=tiny", "serve.models=[runs/nowhere]"], "runs/nowhere"),
    "serve-missing-index": Mistake(["serve", "model=tiny", "serve.index=emptydir"], "serve.index=emptydir"),
    "serve-zero-batch": Mistake(["serve", "model=tiny", "serve.max_batch_size=0"], "serve.max_batch_size=0"),
    # ---- the argparse commands: data, registry, replay, policy
    "data-negative-count": Mistake(["data", "planner", "--train", "-5"], "--train: -5"),
    "data-same-version": Mistake(["data", "planner", "--date", "2026-01-15", "--train", "4", "--val", "2", "--test", "2"],
                                 "--overwrite"),
    "data-bad-date": Mistake(["data", "planner", "--date", "2026-13-01"], "2026-13-01"),
    "data-root-under-a-file": Mistake(["data", "planner", "--root", "afile/sub"], "afile"),
    "data-root-read-only": Mistake(["data", "planner", "--root", "readonly"], "readonly", as_root=False),
    "data-unknown-dataset": Mistake(["data", "recipes"], "recipes"),
    # (the MLflow store in the working directory has planner_model version 1: the mlflow_store fixture)
    "registry-unknown-model": Mistake(["registry", "--name", "nobody"], "nobody"),
    "registry-missing-store": Mistake(["registry", "--tracking-uri", "sqlite:///nowhere.db"], "nowhere.db"),
    "replay-missing-dataset": Mistake(["replay", "--model", "planner_model", "--version", "1", "--dataset", "nowhere"],
                                      "nowhere", MODEL),
    "replay-unknown-alias": Mistake(["replay", "--model", "planner_model", "--version", "champion", "--dataset",
                                     "datasets/planner/2026-01-15"], "champion", MODEL),
    "replay-without-model": Mistake(["replay", "--version", "1"], "--model"),
    "policy-unknown-model": Mistake(["policy", "create", "--model", "nobody", "--version", "1"], "nobody"),
    "policy-unknown-version": Mistake(["policy", "promote", "--model", "planner_model", "--policy-version", "7"], "7"),
    "policy-version-not-a-number": Mistake(["policy", "promote", "--model", "m", "--policy-version", "two"], "two"),
    "unknown-command": Mistake(["trian"], "trian"),
}


@pytest.fixture(scope="module")
def mlflow_store(tmp_path_factory) -> Path:
    """An MLflow store (SQLite) with one registered model, planner_model, version 1."""
    from mlflow.tracking import MlflowClient

    folder = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_registered_model("planner_model")
    client.create_model_version("planner_model", source=str(folder / "model"))
    return folder / "mlflow.db"


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """A finished two-step GRPO run of the tiny model (its last checkpoint is step 2)."""
    folder = tmp_path_factory.mktemp("trained")
    result = _palaestra(["train", *QUICK, "train.output_dir=run"], folder, MODEL)
    assert result.returncode == 0, result.stderr[-3000:]
    return folder / "run"


def _palaestra(args: list[str], cwd: Path, before: str = TORCH) -> subprocess.CompletedProcess:
    """The real command in ``cwd`` (its MLflow store there too), recording what it imported in ``cwd/probe.json``.

    A case that must stop before torch is imported runs in a fresh interpreter; one that may import torch (its
    record says which models were built) is forked from the warm command, which has imported it already."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1",
               MLFLOW_TRACKING_URI=f"sqlite:///{cwd / 'mlflow.db'}", PALAESTRA_PROBE=str(cwd / "probe.json"))
    if before != TORCH and warm():
        return WARM.run(args, cwd, env, 300, probe=True)
    return subprocess.run([sys.executable, "-m", "tests.recipes.cli_probe", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("name", MISTAKES)
def test_a_user_mistake_is_one_line_before_the_work(name, tmp_path, request):
    mistake = MISTAKES[name]
    if not mistake.as_root and os.geteuid() == 0:
        pytest.skip("root writes into a read-only folder")
    _workspace(tmp_path)
    if mistake.args[0] in ("registry", "replay", "policy"):
        shutil.copy(request.getfixturevalue("mlflow_store"), tmp_path / "mlflow.db")
    args = mistake.args
    if any("{run}" in arg for arg in args):
        run = request.getfixturevalue("trained_run")
        args = [arg.replace("{run}", str(run)) for arg in args]
    result = _palaestra(args, tmp_path, mistake.before)
    output = result.stdout + result.stderr

    assert result.returncode != 0, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    lines = [line for line in result.stderr.splitlines() if ERROR_LINE.match(line)]
    assert len(lines) == 1, result.stderr[-3000:]
    assert mistake.names in lines[0], lines[0]
    assert mistake.stdout in result.stdout
    if mistake.before == TORCH and args[0] not in PLAIN_COMMANDS:  # argparse prints its usage above the line
        assert result.stderr.strip().splitlines() == lines, result.stderr[-3000:]
    record = json.loads((tmp_path / "probe.json").read_text())
    if mistake.before == TORCH:
        assert not record["torch"], f"torch was imported before: {lines[0]}"
    if mistake.before in (TORCH, MODEL):
        assert not record["models"], f"{record['models']} built before: {lines[0]}"


def test_pipeline_help_exits_zero(tmp_path):
    result = _palaestra(["pipeline", "--help"], tmp_path)
    assert result.returncode == 0 and result.stdout.startswith("usage: palaestra pipeline"), result.stderr
