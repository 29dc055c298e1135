"""The ``palaestra`` command: subcommands from one explicit table, each configured by Hydra.

    palaestra run                         # the main job: evaluate, train with GRPO, evaluate again
    palaestra train [key=value ...]       # train (algo=grpo) with Hydra overrides; --target=sft|reward|dpo|ppo|grpo|at_grpo
    palaestra eval [eval.checkpoint=PATH] # evaluate the model (or a checkpoint) on the test split
    palaestra pipeline rlhf|full          # SFT -> reward model -> PPO -> evaluation -> export, one MLflow parent run
    palaestra registry | replay | policy  # MLflow model registry, offline replay gate, policy versions
    palaestra data planner                # write a dated planner dataset folder

Every subcommand accepts Hydra's flags: ``--cfg job`` prints the resolved config, ``--multirun``
sweeps comma-separated values, ``experiment=quick_test`` applies a preset.
"""

from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig

from palaestra.config import ConfigError, PalaestraConfig, register_schema, to_config, validate

COMMAND_USAGE = {
    "run": "palaestra run [key=value ...]\n"
           "  the main job: evaluate the model on the task's test split, train it (GRPO by default), evaluate again",
    "train": "palaestra train [key=value ...] [--target=METHOD]\n"
             "  train with a method: GRPO on a task (palaestra train task=countdown train.steps=100 ...), a team of\n"
             "  agents with AT-GRPO (palaestra train algo=at_grpo env=plan_path policy=per_role), or --target=X\n"
             "  (short for algo=X): {methods}; experiment=planner runs the planner template's SFT contract",
    "eval": "palaestra eval [eval.checkpoint=PATH] [key=value ...]\n"
            "  evaluate a model or a checkpoint (eval.checkpoint=runs/.../checkpoints/step-000040;\n"
            "  add algo=at_grpo env=... for a team in an environment)",
    "export": "palaestra export eval.checkpoint=PATH [export.output_dir=DIR] [export.merge=false]\n"
              "  write a trained checkpoint as a Hugging Face folder, LoRA merged (export.merge=false: the adapter)",
    "pipeline": "palaestra pipeline rlhf|full [key=value ...] [<stage>.<section>.<key>=value ...]\n"
                "  rlhf: sft -> reward -> ppo -> evaluate -> export; full: data -> sft -> reward -> dpo -> ppo ->\n"
                "  evaluate -> export; pipeline.skip=[reward], pipeline.stages=[sft,evaluate]; a re-run resumes\n"
                "  at the failed stage",
    "registry": "palaestra registry [--name planner_model]\n  list registered models and their versions",
    "replay": "palaestra replay --model planner_model --version 2 --dataset datasets/planner/2026-11-22 [--baseline 1]\n"
              "  offline gate; on pass the version is tagged as a candidate",
    "policy": "palaestra policy create|promote|retire|list ...\n  policy versions of a registered model",
    "data": "palaestra data planner [--date YYYY-MM-DD] [--root .]\n  generate the planner dataset",
}
"""command -> its usage (``palaestra <command> --help`` prints it)."""

HYDRA_FLAGS = """hydra flags: --cfg job (print the resolved config: every key), --multirun (sweep a,b,c values),
             experiment=quick_test (a preset); config groups: model= task= algo= env= policy= data= experiment="""


def _usage(command: str | None = None) -> str:
    from palaestra.recipes.methods import METHODS

    if command is not None:
        text = COMMAND_USAGE[command].format(methods=", ".join(METHODS))
        return f"usage: {text}" + (f"\n\n{HYDRA_FLAGS}" if command in COMMANDS else "")
    lines = ["usage: palaestra <command> [key=value ...] [hydra flags]", "", "commands:"]
    for name, text in COMMAND_USAGE.items():
        lines += ["  " + line for line in text.format(methods=", ".join(METHODS)).splitlines()]
    return "\n".join([*lines, "", HYDRA_FLAGS, "", "palaestra <command> --help prints one command's usage."])


def _method(config: PalaestraConfig):
    from palaestra.recipes.methods import method_of

    return method_of(config)


def _train(config: PalaestraConfig) -> int:
    method = _method(config)
    results = method.main(config, evaluate_before_after=method.evaluate_before_after)
    _report(results, config)
    return 0


def _run(config: PalaestraConfig) -> int:
    results = _method(config).main(config, evaluate_before_after=True)
    _report(results, config)
    return 0


def _eval(config: PalaestraConfig) -> int:
    from palaestra.evaluation.cli import evaluate_command, evaluate_index_command, evaluate_team_command

    commands = {"at_grpo": evaluate_team_command, "rag": evaluate_index_command}
    print(commands.get(config.algo.name, evaluate_command)(config))
    return 0


def _report(results: dict, config: PalaestraConfig) -> None:
    before, after = results.get("before"), results.get("after")
    if before and after:
        subject = getattr(config, _method(config).reads[0]).name  # the task, environment or data trained on
        print(_before_after_table(before, after, subject, config.algo.name))
    elif results.get("figures") and all("@" in key for key in results["figures"]):
        print(_figures_table(results["figures"]))
    _print_where(results)


def _export(config: PalaestraConfig) -> int:
    from palaestra.export import export_command

    print(export_command(config))
    return 0


def _pipeline(config: PalaestraConfig, name: str, overrides: list[str], stage_overrides: dict) -> int:
    from palaestra.pipeline import run_pipeline

    history = run_pipeline(name, config, overrides, stage_overrides)
    return 0 if history.succeeded else 1


COMMANDS = {"run": _run, "train": _train, "eval": _eval, "export": _export, "pipeline": _pipeline}
"""Commands configured by Hydra (key=value overrides)."""

PLAIN_COMMANDS = {
    "registry": "palaestra.registry.cli:registry_main",
    "replay": "palaestra.registry.cli:replay_main",
    "policy": "palaestra.registry.cli:policy_main",
    "data": "palaestra.planner.cli:data_main",
}
"""Commands with ordinary --flags (argparse), not a training config."""
PIPELINES = ("rlhf", "full")

# Mistakes a user can make in what they pass: reported in one line, exit code 2.
_USER_ERRORS = (ConfigError, FileNotFoundError)


def _user_error_types() -> tuple:
    from palaestra.models import ModelLoadError

    return _USER_ERRORS + (ModelLoadError,)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        raise SystemExit(0)
    command, rest = argv[0], argv[1:]
    if command in COMMANDS and any(arg in ("-h", "--help") for arg in rest):  # argparse commands answer it themselves
        print(_usage(command))
        raise SystemExit(0)
    if command in PLAIN_COMMANDS:
        raise SystemExit(_plain_command(command, rest))
    if command not in COMMANDS:
        print(f"palaestra: error: unknown command {command!r}; use one of {', '.join([*COMMANDS, *PLAIN_COMMANDS])}", file=sys.stderr)
        raise SystemExit(2)
    run_command = COMMANDS[command]
    if command == "pipeline":
        if not rest or rest[0] not in PIPELINES:
            print(f"palaestra: error: say which pipeline: palaestra pipeline {'|'.join(PIPELINES)} [key=value ...]", file=sys.stderr)
            raise SystemExit(2)
        from palaestra.pipeline import split_stage_overrides

        pipeline_name = rest[0]
        rest, stage_overrides = split_stage_overrides(rest[1:])
        overrides = [arg for arg in rest if not arg.startswith("-")]
        run_command = lambda config: _pipeline(config, pipeline_name, overrides, stage_overrides)  # noqa: E731
    rest = [_target_override(arg) for arg in rest]

    def task_function(cfg: DictConfig) -> None:
        logging.getLogger("palaestra").setLevel(logging.INFO)
        try:
            config = to_config(cfg, check_values=False)
            if command in ("run", "train"):  # a key the method ignores is a mistake
                from hydra.core.hydra_config import HydraConfig

                from palaestra.recipes.methods import check_read

                check_read(config.algo.name, list(HydraConfig.get().overrides.task))
            if command != "pipeline":  # a pipeline checks each stage's config
                validate(config)
            code = run_command(config)
        except _user_error_types() as error:
            message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            print(f"palaestra: error: {message}", file=sys.stderr)
            raise SystemExit(2) from None
        if code:
            raise SystemExit(code)

    sys.argv = [f"palaestra {command}", *rest]
    register_schema()  # the dataclasses' defaults, which conf/config.yaml composes over
    hydra.main(version_base="1.3", config_path="conf", config_name="config")(task_function)()


def _target_override(arg: str) -> str:
    """``--target=sft`` (the MARK spelling) is ``algo=sft``; anything else passes through."""
    if arg.startswith("--target="):
        return "algo=" + arg.split("=", 1)[1]
    return arg


def _plain_command(command: str, argv: list[str]) -> int:
    """Run an argparse command; user mistakes are one line on stderr and exit code 2."""
    import importlib

    module_name, function_name = PLAIN_COMMANDS[command].split(":")
    function = getattr(importlib.import_module(module_name), function_name)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return int(function(argv) or 0)
    except _user_error_types() as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"palaestra {command}: error: {message}", file=sys.stderr)
        return 2


def _before_after_table(before: dict, after: dict, subject: str, algo: str) -> str:
    lines = [f"\nheld-out {subject}: before vs after {algo}", f"{'metric':<24}{'before':>10}{'after':>10}{'change':>10}"]
    for key in before:
        if key in after:
            change = after[key] - before[key]
            lines.append(f"{key:<24}{before[key]:>10.3f}{after[key]:>10.3f}{change:>+10.3f}")
    return "\n".join(lines)


def _figures_table(figures: dict) -> str:
    """Figures named ``<metric>@<k>`` as a grid, one row per metric and one column per k.

    >>> print(_figures_table({"recall@1": 0.5, "recall@10": 0.75, "ndcg@1": 0.5, "ndcg@10": 0.625}))
    <BLANKLINE>
    metric          @1     @10
    recall       0.500   0.750
    ndcg         0.500   0.625
    """
    metrics = list(dict.fromkeys(key.split("@")[0] for key in figures))
    ks = list(dict.fromkeys(key.split("@")[1] for key in figures if "@" in key))
    lines = ["", f"{'metric':<10}" + "".join(f"{'@' + k:>8}" for k in ks)]
    for metric in metrics:
        lines.append(f"{metric:<10}" + "".join(f"{figures.get(f'{metric}@{k}', float('nan')):>8.3f}" for k in ks))
    return "\n".join(lines)


def _print_where(results: dict) -> None:
    print(f"\nrun folder: {results['run_dir']} (train.log, checkpoints/)")
    if results.get("mlflow_hint"):
        print(f"MLflow run {results['mlflow_run_id']}: {results['mlflow_hint']}")
    if not results.get("finished", True):
        print(f"stopped at step {results['step']}; resume with: palaestra train train.resume=auto train.output_dir={results['run_dir']}")


if __name__ == "__main__":
    main()
