"""The command table: every command answers --help with its own usage; the table of methods feeds the CLI,
the pipelines and validation, and cli.py and pipeline.py do not import each other."""

from __future__ import annotations

import subprocess
import sys

import pytest

from palaestra.cli import COMMAND_USAGE, COMMANDS, PLAIN_COMMANDS, main
from palaestra.recipes.methods import METHODS
from tests.conftest import REPO


@pytest.mark.parametrize("command", [*COMMANDS, *PLAIN_COMMANDS])
def test_every_command_prints_its_usage_on_help(command, capsys):
    assert set(COMMAND_USAGE) == {*COMMANDS, *PLAIN_COMMANDS}
    with pytest.raises(SystemExit) as caught:
        main([command, "--help"])
    assert caught.value.code in (0, None)
    out = capsys.readouterr().out
    assert out.startswith(f"usage: palaestra {command}"), out


def test_the_methods_table_is_the_one_list():
    from palaestra.config import ConfigError
    from palaestra.jobs import to_config
    from palaestra.pipeline import STAGES, TRAINING_STAGES

    assert TRAINING_STAGES == tuple(METHODS) and set(METHODS) <= set(STAGES)
    with pytest.raises(ConfigError, match="algo.name='nope' is unknown; use one of sft, reward, dpo, ppo, grpo, at_grpo"):
        to_config({"algo": {"name": "nope"}})
    for name, method in METHODS.items():
        assert method.schema().algo.name == name and callable(method.main)


def test_cli_and_pipeline_do_not_import_each_other():
    code = ("import sys, palaestra.pipeline; assert 'palaestra.cli' not in sys.modules, 'pipeline imports cli'")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
    source = (REPO / "palaestra" / "pipeline.py").read_text()
    assert "palaestra.cli" not in source


def _composed(algo: str, overrides: list[str]):
    from palaestra.jobs import compose_jobs, to_config

    (_, cfg), = compose_jobs([f"algo={algo}", *overrides])
    return to_config(cfg, check_values=False)


@pytest.mark.parametrize("algo, override, message", [
    ("sft", "train.steps=3", "algo=sft does not read train.steps (algo=ppo, algo=grpo, algo=at_grpo read it); remove it"),
    ("sft", "task=countdown", "algo=sft does not read task (algo=grpo reads it); remove it"),
    ("dpo", "data.rewards=[planner_quality]", "algo=dpo does not read data.rewards (algo=ppo reads it); remove it"),
    ("ppo", "train.batch_size=4", "algo=ppo reads no train.batch_size: it is algo.prompts_per_step now (rename it)"),
    ("grpo", "+env.params.size=3", "algo=grpo does not read env.params.size (algo=at_grpo reads it); remove it"),
    ("at_grpo", "eval.pass_k=[1]", "algo=at_grpo does not read eval.pass_k (algo=grpo reads it); remove it"),
    ("rag", "model=tiny", "algo=rag does not read model"),
])
def test_a_key_the_method_does_not_read_is_a_one_line_error(algo, override, message):
    from palaestra.config import ConfigError

    with pytest.raises(ConfigError) as caught:
        _composed(algo, [override])
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)


def test_keys_the_method_reads_pass():
    _composed("grpo", ["model=tiny", "task=countdown", "train.steps=3", "eval.pass_k=[1]", "experiment=quick_test"])
    _composed("sft", ["data.path=x", "algo.epochs=1", "train.sequences_per_step=4", "tracking.registered_model=m"])
    _composed("at_grpo", ["env=sokoban", "policy=per_role", "env.params.size=3", "train.steps=2"])


def test_the_cli_rejects_an_ignored_key_before_any_work(tmp_path):
    from tests.conftest import run_cli

    result = run_cli(["train", "algo=sft", "model=tiny", "train.steps=3"], tmp_path, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "palaestra: error: algo=sft does not read train.steps (algo=ppo, algo=grpo, algo=at_grpo read it); remove it"]
    assert list(tmp_path.iterdir()) == []


def test_the_library_core_does_not_import_the_planner_domain():
    core = ["palaestra.config", "palaestra.pipeline", "palaestra.tracking", "palaestra.checkpoint", "palaestra.cli",
            *[method.recipe for method in METHODS.values()]]
    code = f"import sys; import {', '.join(core)}; print([m for m in sys.modules if m.startswith('palaestra.planner')])"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_the_planner_contract_comes_from_configuration():
    from hydra import compose, initialize_config_module

    from palaestra.jobs import to_config

    with initialize_config_module(config_module="palaestra.conf", version_base="1.3"):
        planner = to_config(compose(config_name="config", overrides=["experiment=planner"]), check_values=False)
        plain = to_config(compose(config_name="config", overrides=["algo=sft"]), check_values=False)
        ppo = to_config(compose(config_name="config", overrides=["algo=ppo"]), check_values=False)
    assert (planner.tracking.params, planner.tracking.registered_model, planner.train.best_metric) == ("contract", "planner_model", None)
    assert plain.tracking.params == "config"
    assert ppo.data.metrics == "palaestra.planner.metrics:planner_figures"  # the domain, named only in conf/


def test_mark_orchestrator_flags_become_settings(tmp_path):
    from palaestra.cli import mark_options
    from palaestra.config import ConfigError

    assert mark_options("train", ["--target=rl", "--evaluate", "--device", "cuda"]) == (
        "train", ["algo=grpo", "train.device=cuda"], True)
    assert mark_options("eval", ["eval.checkpoint=x"]) == ("eval", ["eval.checkpoint=x"], False)
    settings = tmp_path / "mine.yaml"
    settings.write_text("experiment: quick_test\ntrain:\n  output_dir: \"it's here\"\n  steps: 3\n"
                        "task:\n  params: {min_terms: 2}\n  rewards: [correctness]\nmodel: tiny\n")
    command, args, _ = mark_options("train", ["--config", str(settings), "train.steps=5"])
    # group choices first, nested keys dotted, the command line last (it wins)
    assert args == ["model=tiny", "experiment=quick_test", "train.output_dir='it\\'s here'", "train.steps=3",
                    "task.params.min_terms=2", "task.rewards=['correctness']", "train.steps=5"]
    for flags, message in [(["--device"], "--device needs a value"), (["--resume=yes"], "--resume takes no value"),
                           (["--config", "nope.yaml"], "--config nope.yaml does not exist"),
                           (["--target=full-pipeline"], "belongs to palaestra train")]:
        with pytest.raises(ConfigError, match=message):
            mark_options("eval" if "full-pipeline" in flags[0] else "train", flags)
    settings.write_text("- a list\n")
    with pytest.raises(ConfigError, match="must be a mapping of sections"):
        mark_options("train", ["--config", str(settings)])
    settings.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        mark_options("train", ["--config", str(settings)])


def test_a_user_yaml_overrides_compose_like_the_command_line(tmp_path):
    from palaestra.cli import mark_options
    from palaestra.pipeline import compose_config

    settings = tmp_path / "mine.yaml"
    settings.write_text("algo: transformer\ntrain:\n  output_dir: \"it's here\"\nmodel:\n  name: tiny\n")
    _, args, _ = mark_options("train", ["--config", str(settings), "algo.epochs=2"])
    config = compose_config(args)
    assert config.algo.name == "classifier" and config.algo.epochs == 2
    assert config.train.output_dir == "it's here" and config.model.name == "tiny"
    assert config.train.texts_per_step == 16  # the classifier's own default (MARK's)
