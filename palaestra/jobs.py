"""The jobs of one command line: composed once with Hydra's compose API, typed and checked before any runs.

``palaestra train a=1 b=2`` is one job; ``palaestra train -m train.seed=0,1 train.learning_rate=1e-3,1e-4``
is four (Hydra's basic sweeper: every combination, in its order). The CLI composes and checks them all
first, so that a mistake in the last job is reported before the first one trains, and Hydra's own
errors (an unknown key or group option, an override it cannot parse) read as one line.

Each command composes its own primary config (``conf/<command>.yaml``; train, run and eval share
``conf/config.yaml``, where the method chosen by ``algo`` brings every section it reads), and
:func:`to_config` types it as that command's schema: a method's (:mod:`palaestra.recipes.methods`) or
a command's (:mod:`palaestra.config.commands`). A key that schema lacks is an error naming who reads
it; a key that was renamed names its new name (:data:`RENAMED`).

Hydra refuses ``key=value`` for a key that its composed YAML lacks, though palaestra's schema may
have it (``task.components.math.path`` where the YAML gives the math component no path, a key of a
``params`` dict): such an override is applied as ``++key=value`` and the schema judges the key.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import typing

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from palaestra.config import ExportJob, PipelineJob, ServeJob
from palaestra.config.commands import validate_export, validate_pipeline_job
from palaestra.config.sections import validate_sections
from palaestra.config.errors import ConfigError
from palaestra.recipes.methods import METHODS

__all__ = ["CONFIG_SECTIONS", "RENAMED", "compose_job", "compose_jobs", "config_name", "hydra_error_line", "parse_command_line",
           "reader_of", "reads", "register_schema", "schema_keys", "to_config", "validate"]

COMMAND_SCHEMAS = {"export": (ExportJob, validate_export), "serve": (ServeJob, None),
                   "pipeline": (PipelineJob, validate_pipeline_job)}
"""Commands that are not a method -> (the schema of their whole config, its checks); the others (train,
run, eval) use the schema of the method ``algo`` names."""

RENAMED: dict[tuple[str, str], str] = {
    ("grpo", "train.batch_size"): "train.completions_per_step",
    ("grpo", "train.micro_batch_size"): "train.completions_per_forward",
    ("at_grpo", "train.micro_batch_size"): "train.answers_per_forward",
    ("sft", "train.batch_size"): "train.sequences_per_step",
    ("sft", "train.micro_batch_size"): "train.sequences_per_forward",
    ("mamba", "train.batch_size"): "train.sequences_per_step",
    ("mamba", "train.micro_batch_size"): "train.sequences_per_forward",
    ("reward", "train.batch_size"): "train.pairs_per_step",
    ("reward", "train.micro_batch_size"): "train.pairs_per_forward",
    ("dpo", "train.batch_size"): "train.pairs_per_step",
    ("dpo", "train.micro_batch_size"): "train.pairs_per_forward",
    ("ppo", "train.micro_batch_size"): "train.minibatch_size",
    ("ppo", "train.batch_size"): "algo.prompts_per_step",
    ("classifier", "train.batch_size"): "train.texts_per_step",
    ("rag", "algo.batch_size"): "algo.documents_per_step",
    ("grpo", "algo.rollout_engine"): "rollout.engine",
}
"""(method, a key it read before each method owned its settings) -> the key's name now."""


CONFIG_SECTIONS = tuple(dict.fromkeys(
    f.name for schema in [*(m.schema for m in METHODS.values()), *(c for c, _ in COMMAND_SCHEMAS.values())]
    for f in dataclasses.fields(schema)))
"""Every top-level section some command or method reads."""


def reads(schema, override: str) -> bool:
    """Whether a config of ``schema`` has the key (or, for ``group=option``, the section) that ``override`` sets.

    >>> from palaestra.recipes.rag_config import RagConfig
    >>> [reads(RagConfig, o) for o in ("model=tiny", "algo.ks=[1]", "+train.seed=1", "task.params.x=1")]
    [False, True, True, False]
    """
    key = override.lstrip("+~").split("=", 1)[0]
    return _has_key(schema, key.split("."))


def config_name(command: str) -> str:
    """The primary config (``conf/<name>.yaml``) that ``command`` composes."""
    return command if command in COMMAND_SCHEMAS else "config"


def register_schema() -> None:
    """Give Hydra the dataclasses' defaults, so that no YAML file restates them.

    ``algo/<method>_defaults`` (every section of the method's schema, at the top level) is the first
    default of each ``algo/<method>.yaml``, and ``<command>_job`` that of ``conf/<command>.yaml``; both
    are untyped copies, so that types and unknown keys are checked by :func:`to_config` (one-line errors).
    Called by the ``palaestra`` command and by ``palaestra.conf`` (compose API); storing twice is harmless.
    """
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    for name, method in METHODS.items():
        store.store(group="algo", name=f"{name}_defaults", package="_global_",
                    node=OmegaConf.to_container(OmegaConf.structured(method.schema)))
    for command, (schema, _) in COMMAND_SCHEMAS.items():
        store.store(name=f"{command}_job", node=OmegaConf.to_container(OmegaConf.structured(schema)))


def to_config(cfg: DictConfig | dict, command: str = "train", *, check_values: bool = True):
    """A composed config as the typed schema of ``command`` (the method's for train, run and eval), its values
    checked too unless ``check_values`` is False (a pipeline checks each stage's once the stages before it
    have written what it reads).

    Raises:
        ConfigError: a one-line message naming the bad key and value (an unknown key: who reads it).
    """
    algo = _algo_name(cfg) if command not in COMMAND_SCHEMAS else None
    schema = COMMAND_SCHEMAS[command][0] if algo is None else METHODS[algo].schema
    try:
        config = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), cfg))
    except OmegaConfBaseException as error:
        key = getattr(error, "full_key", None) or "?"
        message = str(error).splitlines()[0]
        if "not in struct" in message or ("Key '" in message and ("not found" in message or "not in '" in message)):
            raise ConfigError(unknown_key_line(_first_leaf(cfg, key), command, algo)) from None
        raise ConfigError(f"bad value for '{key}': {message}") from None
    if check_values:
        validate(config, command)
    return config


def validate(config, command: str = "train") -> None:
    """Check the values of ``config`` (a schema of ``command``): its shared sections, then its own keys; cheap,
    no model or dataset loads."""
    validate_sections(config)
    if command in COMMAND_SCHEMAS:
        own_checks = COMMAND_SCHEMAS[command][1]  # serve has none beyond its sections'
        if own_checks:
            own_checks(config)
    else:
        METHODS[config.algo.name].validate(config)


def _first_leaf(cfg, key: str) -> str:
    """``key`` or, where it is a section of the composed config, the dotted key of its first value (the one
    the user set: ``env.train_envs`` rather than ``env``)."""
    node = OmegaConf.select(cfg, key) if isinstance(cfg, DictConfig) else None
    while isinstance(node, DictConfig) and len(node) > 0:
        first = next(iter(node))
        key, node = f"{key}.{first}", node[first]
    return key


def _algo_name(cfg) -> str:
    name = OmegaConf.select(cfg, "algo.name") if isinstance(cfg, DictConfig) else cfg.get("algo", {}).get("name")
    name = name or "grpo"
    if name not in METHODS:
        raise ConfigError(f"algo.name={name!r} is unknown; use one of {', '.join(METHODS)}")
    return name


def unknown_key_line(key: str, command: str, algo: str | None) -> str:
    """The one line for a key the schema lacks: its new name, or the methods that read it, or that nobody does.

    >>> unknown_key_line("train.batch_size", "train", "grpo")
    'algo=grpo reads no train.batch_size: it is train.completions_per_step now (rename it)'
    >>> unknown_key_line("env.train_envs", "train", "grpo")
    'algo=grpo does not read env.train_envs (algo=at_grpo reads it); remove it'
    >>> unknown_key_line("train.stepz", "train", "grpo")
    "unknown config key 'train.stepz'; run with --cfg job to see the valid keys"
    """
    who = f"algo={algo}" if algo else f"palaestra {command}"
    if (algo, key) in RENAMED:
        return f"{who} reads no {key}: it is {RENAMED[algo, key]} now (rename it)"
    readers = reader_of(key)
    if readers:
        return f"{who} does not read {key} ({', '.join(f'algo={r}' for r in readers)} {'reads' if len(readers) == 1 else 'read'} it); remove it"
    return f"unknown config key '{key}'; run with --cfg job to see the valid keys"


def reader_of(key: str) -> list[str]:
    """The methods whose schema has ``key`` (a section, or a dotted key)."""
    return [name for name, method in METHODS.items() if _has_key(method.schema, key.split("."))]


def _has_key(schema, parts: list[str]) -> bool:
    if not parts:
        return True
    if not dataclasses.is_dataclass(schema):
        return schema in (dict, typing.Any) or typing.get_origin(schema) is dict  # a dict takes any key
    hints = typing.get_type_hints(schema)
    return parts[0] in hints and _has_key(_unwrap(hints[parts[0]]), parts[1:])


def _unwrap(hint):
    """Optional[X] -> X."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if typing.get_origin(hint) is typing.Union and len(args) == 1 else hint


def schema_keys(schema, prefix: str = "") -> dict[str, str]:
    """Every key of a schema (dotted) -> its documentation line (the field's docstring, first sentence).

    Dict fields (``task.params``, ``env.params``) are keys themselves; their entries are free.
    """
    import ast
    import inspect
    import textwrap

    docs: dict[str, str] = {}
    for klass in reversed(schema.__mro__):  # each field's docstring sits under it in its class's source
        if not dataclasses.is_dataclass(klass):
            continue
        body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        for before, after in zip(body, body[1:]):
            if isinstance(before, ast.AnnAssign) and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant):
                docs[before.target.id] = " ".join(str(after.value.value).split())
    keys: dict[str, str] = {}
    hints = typing.get_type_hints(schema)
    for field in dataclasses.fields(schema):
        inner = _unwrap(hints[field.name])
        if dataclasses.is_dataclass(inner):
            keys.update(schema_keys(inner, f"{prefix}{field.name}."))
        else:
            keys[prefix + field.name] = docs.get(field.name, "")
    return keys

_HYDRA_ANSWERS_ALONE = ("help", "hydra_help", "info", "shell_completion", "config_path", "config_name", "config_dir",
                        "experimental_rerun")
"""Hydra flags after which the command composes no job of palaestra's config (or another config)."""


def parse_command_line(args: list[str]) -> argparse.Namespace | None:
    """Hydra's own reading of the arguments (``.overrides``, ``.multirun``, ``.cfg``); None where Hydra
    answers alone (``--info``, its config-location flags, ...). An argument Hydra would reject is a
    one-line ConfigError (Hydra prints its usage over it)."""
    from hydra._internal.utils import get_args_parser

    parser = get_args_parser()
    parser.exit_on_error = False
    try:
        parsed, unknown = parser.parse_known_args(args)
    except argparse.ArgumentError as error:
        raise ConfigError(f"{error}; --help lists the flags") from None
    if unknown:
        hint = ("write the key=value overrides together, before or after the flags"
                if any("=" in u and not u.startswith("-") for u in unknown)
                else "--help lists the flags")
        raise ConfigError(f"unrecognized arguments: {' '.join(unknown)}; {hint}")
    if any(getattr(parsed, flag, None) for flag in _HYDRA_ANSWERS_ALONE):
        return None
    return parsed


def compose_jobs(overrides: list[str], *, multirun: bool = False, command: str = "train") -> list[tuple[list[str], DictConfig]]:
    """Compose every job of ``overrides`` (a sweep's with ``multirun``) from ``command``'s primary config.

    Returns each job's overrides (``++key=value`` where Hydra's YAML lacks a key the schema decides on)
    with its composed config. Raises a one-line :class:`ConfigError` for what Hydra cannot compose.
    """
    from hydra import compose, initialize_config_module
    from hydra.errors import HydraException

    register_schema()
    name = config_name(command)
    with initialize_config_module(config_module="palaestra.conf", version_base="1.3"):
        overrides, jobs, first = _compose_first(overrides, multirun, name)
        composed = [(jobs[0], first)]
        for job in jobs[1:]:
            try:
                composed.append((job, compose(config_name=name, overrides=job)))
            except HydraException as error:
                raise ConfigError(hydra_error_line(error)) from None
    return composed


def compose_job(overrides: list[str], command: str = "train") -> DictConfig:
    """One job's config, inside an initialized Hydra (``++`` added where the YAML lacks a key, as for the
    command line); a one-line :class:`ConfigError` for what Hydra cannot compose."""
    return _compose_first(overrides, False, config_name(command))[2]


def _compose_first(overrides: list[str], multirun: bool, name: str) -> tuple[list[str], list[list[str]], DictConfig]:
    """The overrides (``++`` added where refused), the jobs they sweep to and the first job's config."""
    from hydra import compose
    from hydra.errors import HydraException

    overrides = list(overrides)
    while True:  # each round adds ++ to one refused override, so it ends
        try:
            jobs = _sweep(overrides) if multirun else [overrides]
            return overrides, jobs, compose(config_name=name, overrides=jobs[0])
        except HydraException as error:
            group = _refused_group(error)
            if group is not None:
                raise ConfigError(_group_line(group, overrides, name)) from None
            refused = _refused(error, overrides)
            if refused is None:
                raise ConfigError(hydra_error_line(error)) from None
            overrides[refused] = "++" + overrides[refused]


def _refused_group(error: Exception) -> str | None:
    """The group of a ``group=option`` override that Hydra refused because the chosen config has no such group."""
    found = re.match(r"Could not override '([^'.]+)'\. No match in the defaults list", str(error))
    return found.group(1) if found else None


def _group_line(group: str, overrides: list[str], name: str) -> str:
    """The one line for ``group=option`` where the command (or the method it runs) has no such section."""
    from hydra import compose

    if name != "config":
        return unknown_key_line(group, name, None)
    rest = [o for o in overrides if o.lstrip("+~").split("=", 1)[0] != group]
    try:
        algo = _algo_name(compose(config_name=name, overrides=rest))
    except Exception:  # noqa: BLE001 - only for naming the method; the line is still right without it
        algo = "grpo"
    return unknown_key_line(group, "train", algo)


def _sweep(overrides: list[str]) -> list[list[str]]:
    """The jobs of a --multirun, as Hydra's basic sweeper makes them."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(overrides), None)[0]


def _refused(error: Exception, overrides: list[str]) -> int | None:
    """The position of the plain ``key=value`` that Hydra refused because its YAML has no such key, if that was the error."""
    found = re.match(r"Could not override '([^']+)'", str(error))
    if not found:
        return None
    key = found.group(1)
    return next((i for i, override in enumerate(overrides)
                 if override.split("=", 1)[0] == key and not override.startswith(("+", "~"))), None)


def hydra_error_line(error: Exception) -> str:
    """One line for a Hydra composition error: the override, what is wrong, what to write instead.

    >>> from hydra.errors import MissingConfigException
    >>> hydra_error_line(MissingConfigException("...", "model/gpt5", ["hf", "tiny"]))
    'model=gpt5 is unknown; use one of hf, tiny'
    """
    from hydra.errors import MissingConfigException, OverrideParseException

    text = str(error)
    if isinstance(error, MissingConfigException) and error.missing_cfg_file and error.options:
        group, _, option = error.missing_cfg_file.rpartition("/")
        options = [o for o in error.options if not o.endswith("_defaults")]  # the schema's bases (config.register_schema)
        return f"{group}={option} is unknown; use one of {', '.join(options)}"
    if isinstance(error, OverrideParseException):
        return (f"cannot read the override {error.override!r} ({text.splitlines()[0]}); quote a value that holds "
                "brackets, braces, commas or spaces: key='a value'")
    ambiguous = re.match(r"Ambiguous value for argument '([^']+)'", text)
    if ambiguous:
        return (f"{ambiguous.group(1)} has several values: add --multirun (-m) to sweep over them, or write "
                "key=[a,b] for a list, or quote it for a string: key='a,b'")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith(("See https", "Config search path", "provider="))]
    return " ".join(lines) or type(error).__name__
