"""Every shipped YAML composes and validates; every bad-input class gets a one-line ConfigError."""

from __future__ import annotations

from pathlib import Path

import pytest

from palaestra.config import ConfigError
from palaestra.jobs import compose_jobs, to_config
from palaestra.recipes.methods import METHODS
from tests.conftest import write_gsm8k

CONF = Path(__file__).resolve().parents[2] / "palaestra" / "conf"


def _compose(overrides: list[str]):
    """Composed and checked as the command line is (palaestra.jobs)."""
    (_, cfg), = compose_jobs(overrides)
    return to_config(cfg)


def test_default_config_is_the_main_job():
    config = _compose([])
    assert config.model.name == "smollm2-135m"
    assert config.task.name == "chain_sum" and config.algo.name == "grpo"
    assert config.train.completions_per_step % config.algo.num_generations == 0


GROUP_METHOD = {"env": "at_grpo", "policy": "at_grpo", "data": "sft"}
"""Groups only some methods read -> a method that reads it (the others are composed with grpo)."""


@pytest.mark.parametrize("group", ["model", "task", "algo", "experiment", "env", "policy", "data"])
def test_every_shipped_yaml_composes_and_validates(group, tmp_path):
    data = write_gsm8k(tmp_path / "gsm8k.jsonl")
    files = sorted((CONF / group).glob("*.yaml"))
    assert files, f"no configs in {group}/"
    for path in files:
        option = f"{group}={path.stem}"
        extra = [f"task.path={data}"] if path.stem in ("gsm8k", "gsm8k_tunix") else []
        if path.stem == "hf":
            extra.append("model.path=some/model")
        if path.stem == "all-minilm-l6-v2":  # the classifier's encoder
            extra.append("algo=classifier")
        if group in GROUP_METHOD:
            extra.append(f"algo={GROUP_METHOD[group]}")
        config = _compose([option, *extra])
        assert isinstance(config, METHODS[config.algo.name].schema)


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["task.dataset=not_a_dataset"], "task.dataset='not_a_dataset' is not a reasoning-gym dataset"),
        (["algo.num_generations=1"], "algo.num_generations=1 must be >= 2"),
        (["train.completions_per_step=30"], "train.completions_per_step=30 is not divisible by algo.num_generations=8"),
        (["train.learning_rate=-0.1"], "train.learning_rate=-0.1 must be >= 0"),
        (["task=gsm8k", "task.path=missing.jsonl"], "task.path=missing.jsonl does not exist"),
        (["task=gsm8k"], "task.source=gsm8k needs task.path"),
        (["algo.loss_type=ppo"], "algo.loss_type='ppo' is unknown"),
        (["algo.scale_rewards=rank"], "algo.scale_rewards='rank' is unknown"),
        (["train.completions_per_forward=5"], "train.completions_per_forward=5 must divide train.completions_per_step=32"),
        (["train.batch_size=32"], "algo=grpo reads no train.batch_size: it is train.completions_per_step now"),
        (["env.train_envs=2"], "algo=grpo does not read env.train_envs (algo=at_grpo reads it)"),
        (["+train.bogus=1"], "unknown config key 'train.bogus'"),
        (["train.steps=many"], "bad value for 'train.steps'"),
        (["task.rewards=[nope]", "task.reward_weights=null"], "nope"),
        (["task.reward_weights=[1.0,2.0]"], "task.reward_weights has 2 values for 1 task.rewards"),
        (["task.show_passage=false"], "task.show_passage=false applies to task.source=qa only"),
        (["model=hf"], "model.name=hf needs model.path"),
        (["eval.num_samples=4"], "eval.num_samples=4 needs eval.greedy=false"),
        (["rollout.engine=sglang"], "rollout.engine='sglang' is unknown"),
        (["rollout.engine=vllm"], "rollout.engine=vllm needs the vllm package"),  # a CPU install has none
        (["algo.rollout_engine=vllm"], "algo=grpo reads no algo.rollout_engine: it is rollout.engine now"),
        (["rollout.engine=server", "rollout.servers=[http://localhost:1]", "model.lora.enabled=false"],
         "rollout.engine=server serves the trained LoRA adapter"),
        (["rollout.engine=server", "rollout.servers=[http://localhost:1]", "model.lora.enabled=true", "train.strategy=fsdp"],
         "rollout.engine=server syncs the adapter from whole weights"),
    ],
)
def test_bad_input_gives_one_line_error(overrides, expected):
    with pytest.raises(ConfigError) as caught:
        _compose(overrides)
    message = str(caught.value)
    assert expected in message
    assert "\n" not in message


def test_the_value_lists_config_checks_without_torch_match_the_code():
    from palaestra.config.choices import PRECISIONS, WEIGHT_DTYPES
    from palaestra.models.loading import DTYPES
    from palaestra.models.precision import resolve_precision

    assert tuple(DTYPES) == WEIGHT_DTYPES
    assert {resolve_precision(p, "cpu") for p in PRECISIONS} <= {"bf16", "fp32"}


def test_a_config_mistake_is_reported_before_torch_is_imported(tmp_path):
    import subprocess
    import sys

    from tests.conftest import REPO

    code = ("import sys\nfrom palaestra.cli import main\ntry:\n    main(['train', '--target=classifier', 'algo.epochs=0'])\n"
            "except SystemExit as exit:\n    assert exit.code == 2, exit.code\n"
            "heavy = sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules)\n"
            "print('imported:', heavy)\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                            env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert "algo.epochs=0 must be positive" in result.stderr
    assert "imported: []" in result.stdout, result.stdout + result.stderr[-2000:]


def test_run_folders_and_checkpoints_are_checked_before_any_work(tmp_path):
    # a finished run at step 5 (a checkpoint is complete once its trainer_state.json is written)
    checkpoint = tmp_path / "run" / "checkpoints" / "step-000005"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text('{"step": 5}')
    (tmp_path / "afile").write_text("")
    for overrides, expected in [
        ([f"train.output_dir={tmp_path / 'afile'}"], "is a file, not a folder"),
        ([f"train.output_dir={tmp_path / 'afile' / 'run'}"], f"cannot be created: {tmp_path / 'afile'} is a file"),
        ([f"train.resume={tmp_path / 'nowhere'}"], "does not exist"),
        ([f"train.resume={tmp_path}"], "holds no complete checkpoint"),
        (["train.resume=auto", f"train.output_dir={tmp_path / 'run'}", "train.steps=3"], "is at step 5; raise train.steps"),
        ([f"train.resume={checkpoint}", "train.steps=4"], "is at step 5"),
        ([f"eval.checkpoint={tmp_path / 'nowhere'}"], "eval.checkpoint="),
        (["model=hf", f"model.path={tmp_path / 'nowhere'}"], "model.path="),
    ]:
        with pytest.raises(ConfigError, match=expected):
            _compose(overrides)
    # a run with steps left, or a method whose epochs decide its length, resumes
    assert _compose(["train.resume=auto", f"train.output_dir={tmp_path / 'run'}", "train.steps=8"]).train.steps == 8
    _compose(["algo=sft", f"data.path={tmp_path}", "data.train_file=afile", "train.resume=auto",
              f"train.output_dir={tmp_path / 'run'}"])
