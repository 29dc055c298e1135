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
    from palaestra.config import ConfigError, to_config
    from palaestra.pipeline import STAGES, TRAINING_STAGES

    assert TRAINING_STAGES == tuple(METHODS) and set(METHODS) <= set(STAGES)
    with pytest.raises(ConfigError, match="algo.name='nope' is unknown; use one of sft, reward, dpo, ppo, grpo, at_grpo"):
        to_config({"algo": {"name": "nope"}})
    for name, method in METHODS.items():
        assert method.schema().name == name and callable(method.main)


def test_cli_and_pipeline_do_not_import_each_other():
    code = ("import sys, palaestra.pipeline; assert 'palaestra.cli' not in sys.modules, 'pipeline imports cli'")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
    source = (REPO / "palaestra" / "pipeline.py").read_text()
    assert "palaestra.cli" not in source
