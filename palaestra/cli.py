"""The ``palaestra`` command: subcommands from one explicit table, each configured by Hydra.

    palaestra run                         # the main job: evaluate, train with GRPO, evaluate again
    palaestra train [key=value ...]       # train (algo=grpo) with Hydra overrides; --target=sft|reward|dpo|ppo|grpo|at_grpo
    palaestra eval [eval.checkpoint=PATH] # evaluate the model (or a checkpoint) on the test split
    palaestra pipeline rlhf|full|mark|aflow  # stages run in order (rlhf: SFT -> reward model -> PPO -> ...), one MLflow parent run
    palaestra registry | replay | policy  # MLflow model registry, offline replay gate, policy versions
    palaestra data planner                # write a dated planner dataset folder
    palaestra serve [serve.models=[RUN]]  # an OpenAI-compatible HTTP API over the base model and trained runs

Every subcommand accepts Hydra's flags: ``--cfg job`` prints the resolved config, ``--multirun``
sweeps comma-separated values, ``experiment=quick_test`` applies a preset.
"""

from __future__ import annotations

import logging
import shlex
import sys
from pathlib import Path
from typing import NoReturn

from palaestra.config.errors import ConfigError

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
    "pipeline": "palaestra pipeline rlhf|full|mark|aflow [key=value ...] [<stage>.<section>.<key>=value ...]\n"
                "  rlhf: sft -> reward -> ppo -> evaluate -> export; full: data -> sft -> reward -> dpo -> ppo ->\n"
                "  evaluate -> export; mark: data -> mamba -> classifier -> rag -> grpo -> export;\n"
                "  aflow: data (demonstration workflows) -> sft -> grpo (experiment=aflow);\n"
                "  pipeline.skip=[reward], pipeline.stages=[sft,evaluate]; a re-run resumes at the failed stage",
    "registry": "palaestra registry [--name planner_model]\n  list registered models and their versions",
    "replay": "palaestra replay --model planner_model --version 2 --dataset datasets/planner/2026-11-22 [--baseline 1]\n"
              "  offline gate; on pass the version is tagged as a candidate",
    "policy": "palaestra policy create|promote|retire|list ...\n  policy versions of a registered model",
    "data": "palaestra data planner [--date YYYY-MM-DD] [--root .] [--overwrite]\n  generate the planner dataset",
    "serve": "palaestra serve [model=...] [serve.models=[RUN,...]] [serve.index=RAG_RUN] [serve.port=8000] [key=value ...]\n"
             "  an OpenAI-compatible API (chat, completions, models, embeddings, search, /health, /metrics) over\n"
             "  the base model, trained runs (LoRA adapters share the base), exported folders and registered models",
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


def _method(config):
    from palaestra.recipes.methods import method_of

    return method_of(config)


def _train(config) -> int:
    method = _method(config)
    results = method.main(config, evaluate_before_after=method.evaluate_before_after)
    _report(results, config)
    return _exit_code(results)


def _train_and_evaluate(config) -> int:
    """palaestra train --evaluate: the method's evaluation before and after training."""
    results = _method(config).main(config, evaluate_before_after=True)
    _report(results, config)
    return _exit_code(results)


def _run(config) -> int:
    results = _method(config).main(config, evaluate_before_after=True)
    _report(results, config)
    return _exit_code(results)


def _eval(config) -> int:
    from palaestra.evaluation.cli import (
        evaluate_command,
        evaluate_index_command,
        evaluate_language_model_command,
        evaluate_team_command,
    )

    commands = {"grpo": evaluate_command, "at_grpo": evaluate_team_command, "rag": evaluate_index_command,
                "mamba": evaluate_language_model_command}
    print(commands[config.algo.name](config))
    return 0


def _exit_code(results: dict) -> int:
    """0, or 128 + the signal's number for a run that a signal stopped (130 for Ctrl-C, 143 for SIGTERM), as shells do."""
    return 128 + results["stop_signal"] if results.get("stop_signal") else 0


def _report(results: dict, config) -> None:
    before, after = results.get("before"), results.get("after")
    if before and after:
        section = _method(config).subject  # the task, environment or data trained on (or the recipe says)
        subject = results.get("subject") or (getattr(config, section).name if section else config.algo.name)
        print(_before_after_table(before, after, subject, config.algo.name))
    elif results.get("figures") and all("@" in key for key in results["figures"]):
        print(_figures_table(results["figures"]))
    _print_where(results)


def _export(config) -> int:
    from palaestra.export import export_command

    print(export_command(config.model, config.eval.checkpoint, config.export.output_dir, merge=config.export.merge))
    return 0


def _pipeline(config, name: str, overrides: list[str], stage_overrides: dict) -> int:
    from palaestra.pipeline import run_pipeline

    history = run_pipeline(name, config, overrides, stage_overrides)
    return 0 if history.succeeded else 1


def _serve(config) -> int:
    from palaestra.serving.command import serve_command

    return serve_command(config)  # checks its own sections (model, serve, tracking)


COMMANDS = {"run": _run, "train": _train, "eval": _eval, "export": _export, "pipeline": _pipeline, "serve": _serve}
"""Commands configured by Hydra (key=value overrides)."""

PLAIN_COMMANDS = {
    "registry": "palaestra.registry.cli:registry_main",
    "replay": "palaestra.registry.cli:replay_main",
    "policy": "palaestra.registry.cli:policy_main",
    "data": "palaestra.planner.cli:data_main",
}
"""Commands with ordinary --flags (argparse), not a training config."""
PIPELINES = ("rlhf", "full", "mark", "aflow")

# Mistakes a user can make in what they pass: reported in one line, exit code 2.
_USER_ERRORS = (ConfigError, FileNotFoundError)


_LATER_USER_ERRORS = (("palaestra.models.loading", "ModelLoadError"), ("palaestra.rewards", "RewardError"),
                      ("palaestra.checkpoint", "CorruptCheckpoint"), ("palaestra.tracking.mlflow_tracker", "TrackingError"),
                      ("palaestra.rollout.servers", "RolloutServerError"))
"""More user mistakes, by the module that defines them: only a module already imported can have raised one,
so a config mistake is reported without importing them (models.loading imports torch)."""


def _user_error_types() -> tuple:
    later = tuple(getattr(sys.modules[module], name) for module, name in _LATER_USER_ERRORS if module in sys.modules)
    return _USER_ERRORS + later


def _fail(error: Exception, prefix: str = "") -> NoReturn:
    """A user mistake: its first line on stderr, exit code 2."""
    message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    print(f"palaestra: error: {prefix}{message}", file=sys.stderr)
    raise SystemExit(2)


def _checked_config(command: str, cfg):
    """A composed config as the typed schema of ``command``, checked as it reads it (cheap: no model, no dataset)."""
    from palaestra.jobs import to_config, validate

    config = to_config(cfg, command, check_values=False)
    if command == "eval" and config.algo.name not in EVALUATED:
        raise ConfigError(f"palaestra eval evaluates {', '.join(EVALUATED)} runs, not algo={config.algo.name} "
                          f"(its training run evaluates it: palaestra train algo={config.algo.name})")
    validate(config, command)
    return config


EVALUATED = ("grpo", "at_grpo", "rag", "mamba")
"""The methods whose runs ``palaestra eval`` evaluates (the others evaluate as they train)."""


def _composed_jobs(command: str, args: list[str], own_keys=None):
    """Every job of the command line, composed once and checked before any runs (a sweep's too).

    Returns (Hydra's reading of the arguments, [(the job's overrides, its typed config)]), or None where
    Hydra answers alone (--help, --info, ...). ``own_keys``: for a pipeline, which overrides are its own
    (the others go to its stages). With ``--cfg``, each job's config is printed before it is checked.
    """
    from omegaconf import OmegaConf

    from palaestra.jobs import compose_jobs, parse_command_line

    parsed = parse_command_line(args)
    if parsed is None:
        return None
    overrides = [o for o in parsed.overrides if own_keys is None or own_keys(o)]
    jobs = compose_jobs(overrides, multirun=parsed.multirun, command=command)
    checked = []
    for number, (job, cfg) in enumerate(jobs):
        if parsed.cfg:
            print(OmegaConf.to_yaml(cfg, resolve=bool(parsed.resolve)), end="")
        try:
            checked.append((job, _checked_config(command, cfg)))
        except _user_error_types() as error:
            prefix = "the config above is invalid: " if parsed.cfg else ""
            if len(jobs) == 1:
                _fail(error, prefix)
            swept = " ".join(o for o in job if not all(o in other for other, _ in jobs))
            message = str(error).strip().splitlines()[0]
            _fail(ConfigError(f"job {number} of the sweep ({swept}): {message}; no job ran"), prefix)
    return parsed, checked


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
    try:
        command, rest, evaluate = mark_options(command, rest)
    except ConfigError as error:
        _fail(error)
    run_command = COMMANDS[command]
    if evaluate and command == "train":
        run_command = _train_and_evaluate
    if command == "pipeline":
        if not rest or rest[0] not in PIPELINES:
            print(f"palaestra: error: say which pipeline: palaestra pipeline {'|'.join(PIPELINES)} [key=value ...]", file=sys.stderr)
            raise SystemExit(2)
        from palaestra.pipeline import split_stage_overrides

        pipeline_name = rest[0]
        rest, stage_overrides = split_stage_overrides(rest[1:])

    own_keys = None
    if command == "pipeline":
        from palaestra.pipeline import pipeline_reads

        own_keys = pipeline_reads
    try:
        composed = _composed_jobs(command, rest, own_keys)
    except _user_error_types() as error:
        _fail(error)
    if composed is None:  # --help, --info, ...: Hydra answers
        import hydra

        sys.argv = [f"palaestra {command}", *rest]
        hydra.main(version_base="1.3", config_path="conf", config_name="config")(lambda cfg: None)()
        return
    parsed, jobs = composed
    if parsed.cfg:
        return
    if command == "pipeline":
        overrides = [arg for arg in parsed.overrides]
        run_command = lambda config: _pipeline(config, pipeline_name, overrides, stage_overrides)  # noqa: E731

    from palaestra.rewards import RewardFailed

    logging.getLogger("palaestra").setLevel(logging.INFO)
    for _, config in jobs:
        try:
            tracking = getattr(config, "tracking", None)
            if command in ("run", "train", "pipeline") and tracking is not None and tracking.enabled and tracking.required:
                from palaestra.tracking.buffered import check_store

                check_store(tracking.tracking_uri)  # before the model loads
            code = run_command(config)
        except _user_error_types() as error:
            _fail(error)
        except RewardFailed as failure:  # a bug in a user's reward: their traceback, under one line naming it
            import traceback

            print(f"palaestra: error: {failure}", file=sys.stderr)
            traceback.print_exception(failure.__cause__, file=sys.stderr)
            raise SystemExit(1) from None
        if code:
            raise SystemExit(code)


MARK_TARGETS = {"transformer": "classifier", "rl": "grpo"}
"""MARK's target names that are not palaestra's method names; ``--target=full-pipeline`` is ``palaestra pipeline mark``."""
CONFIG_GROUPS = ("model", "task", "algo", "env", "policy", "data", "experiment")


def mark_options(command: str, args: list[str]) -> tuple[str, list[str], bool]:
    """MARK's orchestrator flags as palaestra settings: (command, Hydra arguments, evaluate before and after).

    ``--target=X`` is ``algo=X`` (MARK's names too: transformer is the classifier, rl is GRPO, and
    full-pipeline runs ``palaestra pipeline mark``), ``--device D`` is ``train.device=D``,
    ``--resume`` is ``train.resume=auto``, ``--evaluate`` evaluates before and after training, and
    ``--config F`` puts the keys of the YAML file F before the command line's (which win). Flags
    take ``--flag=value`` or ``--flag value``.

    >>> mark_options("train", ["--target", "transformer", "--device=cpu", "--resume", "train.seed=1"])
    ('train', ['algo=classifier', 'train.device=cpu', 'train.resume=auto', 'train.seed=1'], False)
    >>> mark_options("train", ["--target=full-pipeline", "model=tiny"])
    ('pipeline', ['mark', 'model=tiny'], False)
    """
    flags = {"--target": True, "--device": True, "--config": True, "--resume": False, "--evaluate": False}
    given: dict[str, str | None] = {}
    passed: list[str] = []
    position = 0
    while position < len(args):
        arg = args[position]
        name, has_value, value = arg.partition("=")
        if name not in flags:
            passed.append(arg)
        elif flags[name] and not has_value:
            if position + 1 >= len(args) or args[position + 1].startswith("-"):
                raise ConfigError(f"{name} needs a value: {name}=VALUE")
            given[name] = args[position + 1]
            position += 1
        elif not flags[name] and has_value:
            raise ConfigError(f"{name} takes no value; write {name} alone")
        else:
            given[name] = value if has_value else None
        position += 1
    settings = _yaml_overrides(given["--config"]) if "--config" in given else []
    target = given.get("--target")
    if target == "full-pipeline":
        if command != "train":
            raise ConfigError("--target=full-pipeline belongs to palaestra train (or run palaestra pipeline mark)")
        command, settings = "pipeline", ["mark", *settings]
    elif target is not None:
        settings.append(f"algo={MARK_TARGETS.get(target, target)}")
    if "--device" in given:
        settings.append(f"train.device={given['--device']}")
    if "--resume" in given:
        settings.append("train.resume=auto")
    return command, [*settings, *passed], "--evaluate" in given


def _yaml_overrides(path: str) -> list[str]:
    """The keys of a user's YAML config as Hydra overrides: ``algo: classifier`` picks a group
    option, nested mappings become dotted keys (``train: {steps: 5}`` -> ``train.steps=5``)."""
    import yaml

    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"--config {path} does not exist; give a YAML file of settings (palaestra train --cfg job shows the keys)")
    try:
        settings = yaml.safe_load(file.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ConfigError(f"--config {path} is not valid YAML ({str(error).splitlines()[0]})") from None
    if settings is None:
        return []
    if not isinstance(settings, dict):
        raise ConfigError(f"--config {path} must be a mapping of sections (train:, algo:, ...), not a {type(settings).__name__}")
    overrides: list[str] = []

    def flatten(key: str, value) -> None:
        if isinstance(value, dict) and value:
            for inner, inner_value in value.items():
                flatten(f"{key}.{inner}", inner_value)
        else:
            overrides.append(f"{key}={_hydra_value(value)}")

    from palaestra.jobs import CONFIG_SECTIONS as sections

    for key, value in settings.items():
        if key not in sections and key != "experiment":
            raise ConfigError(f"--config {path}: unknown section {key!r}; use some of {', '.join(sections)}")
        if key in CONFIG_GROUPS and isinstance(value, str):
            value = MARK_TARGETS.get(value, value) if key == "algo" else value
            overrides.insert(0, f"{key}={value}")  # group choices first, so that their keys can be set
        else:
            flatten(str(key), value)
    return overrides


def _hydra_value(value) -> str:
    """A YAML value in Hydra's override syntax.

    >>> [_hydra_value(v) for v in (None, True, 3, 0.5, "a b", [1, "a"], {"k": 2})]
    ['null', 'true', '3', '0.5', "'a b'", "[1,'a']", '{k:2}']
    """
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ",".join(_hydra_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_hydra_value(v)}" for k, v in value.items()) + "}"
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


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
    if results.get("mlflow_run_id"):
        print(f"MLflow run {results['mlflow_run_id']}: {results['mlflow_hint']}")
    elif results.get("mlflow_hint"):  # the store was away all along: the writes wait in the run folder
        print(results["mlflow_hint"])
    if not results.get("finished", True):
        print(f"stopped at step {results['step']}; resume with: palaestra train train.resume=auto "
              f"train.output_dir={shlex.quote(str(results['run_dir']))}")


if __name__ == "__main__":
    main()
