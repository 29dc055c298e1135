"""The ``palaestra`` command: subcommands from one explicit table, each configured by Hydra.

    palaestra run                         # the main job: evaluate, train with GRPO, evaluate again
    palaestra train [key=value ...]       # train (algo=grpo) with Hydra overrides
    palaestra eval [eval.checkpoint=PATH] # evaluate the model (or a checkpoint) on the test split

Every subcommand accepts Hydra's flags: ``--cfg job`` prints the resolved config, ``--multirun``
sweeps comma-separated values, ``+experiment=quick_test`` applies a preset.
"""

from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig

from palaestra.config import ConfigError, PalaestraConfig, to_config

USAGE = """usage: palaestra <command> [key=value ...] [hydra flags]

commands:
  run     the main job: evaluate the model on the task's test split, train it with GRPO, evaluate again
  train   train: GRPO on a task (palaestra train task=countdown train.steps=100 ...) or a team of
          agents with AT-GRPO (palaestra train algo=at_grpo env=plan_path policy=per_role)
  eval    evaluate a model or a checkpoint (eval.checkpoint=runs/.../checkpoints/step-000040;
          add algo=at_grpo env=... for a team in an environment)
  export  write a trained checkpoint as a Hugging Face folder, LoRA merged (export.merge=false: adapter)
          (palaestra export eval.checkpoint=runs/... export.output_dir=exported/my_model)

hydra flags: --cfg job (print the config), --multirun (sweep a,b,c values), +experiment=quick_test,
             --help (all config groups and keys)
"""


def _recipe(config: PalaestraConfig):
    """The recipe module of ``algo.name`` (one readable loop each)."""
    from palaestra.recipes import at_grpo, grpo

    return {"grpo": grpo, "at_grpo": at_grpo}[config.algo.name]


def _train(config: PalaestraConfig) -> int:
    results = _recipe(config).main(config, evaluate_before_after=config.algo.name == "at_grpo")
    _report(results, config)
    return 0


def _run(config: PalaestraConfig) -> int:
    results = _recipe(config).main(config, evaluate_before_after=True)
    _report(results, config)
    return 0


def _eval(config: PalaestraConfig) -> int:
    from palaestra.evaluation.cli import evaluate_command, evaluate_team_command

    print(evaluate_team_command(config) if config.algo.name == "at_grpo" else evaluate_command(config))
    return 0


def _report(results: dict, config: PalaestraConfig) -> None:
    before, after = results.get("before"), results.get("after")
    if before and after:
        subject = config.env.name if config.algo.name == "at_grpo" else config.task.name
        print(_before_after_table(before, after, subject, config.algo.name))
    _print_where(results)


def _export(config: PalaestraConfig) -> int:
    from palaestra.evaluation.cli import export_command

    print(export_command(config))
    return 0


COMMANDS = {"run": _run, "train": _train, "eval": _eval, "export": _export}

# Mistakes a user can make in what they pass: reported in one line, exit code 2.
_USER_ERRORS = (ConfigError, FileNotFoundError)


def _user_error_types() -> tuple:
    from palaestra.models import ModelLoadError

    return _USER_ERRORS + (ModelLoadError,)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        raise SystemExit(0)
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"palaestra: error: unknown command {command!r}; use one of {', '.join(COMMANDS)}", file=sys.stderr)
        raise SystemExit(2)

    def task_function(cfg: DictConfig) -> None:
        logging.getLogger("palaestra").setLevel(logging.INFO)
        try:
            config = to_config(cfg)
            code = COMMANDS[command](config)
        except _user_error_types() as error:
            message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            print(f"palaestra: error: {message}", file=sys.stderr)
            raise SystemExit(2) from None
        if code:
            raise SystemExit(code)

    sys.argv = [f"palaestra {command}", *rest]
    hydra.main(version_base="1.3", config_path="conf", config_name="config")(task_function)()


def _before_after_table(before: dict, after: dict, subject: str, algo: str) -> str:
    lines = [f"\nheld-out {subject}: before vs after {algo}", f"{'metric':<24}{'before':>10}{'after':>10}{'change':>10}"]
    for key in before:
        if key in after:
            change = after[key] - before[key]
            lines.append(f"{key:<24}{before[key]:>10.3f}{after[key]:>10.3f}{change:>+10.3f}")
    return "\n".join(lines)


def _print_where(results: dict) -> None:
    print(f"\nrun folder: {results['run_dir']} (train.log, checkpoints/)")
    if results.get("mlflow_hint"):
        print(f"MLflow run {results['mlflow_run_id']}: {results['mlflow_hint']}")
    if not results.get("finished", True):
        print(f"stopped at step {results['step']}; resume with: palaestra train train.resume=auto train.output_dir={results['run_dir']}")


if __name__ == "__main__":
    main()
