"""The jobs of one command line, composed with Hydra's compose API before any of them runs.

``palaestra train a=1 b=2`` is one job; ``palaestra train -m train.seed=0,1 train.learning_rate=1e-3,1e-4``
is four (Hydra's basic sweeper: every combination, in its order). The CLI composes and checks them all
first, so that a mistake in the last job is reported before the first one trains, and Hydra's own
errors (an unknown key or group option, an override it cannot parse) read as one line.

Hydra refuses ``key=value`` for a key that its composed YAML lacks, though palaestra's schema may
have it (``task.components.math.path`` where the YAML gives the math component no path, a key of a
``params`` dict): such an override is applied as ``++key=value`` and the schema judges the key
(:func:`palaestra.config.to_config` reports an unknown one in one line).
"""

from __future__ import annotations

import argparse
import re

from omegaconf import DictConfig

from palaestra.config import ConfigError

__all__ = ["compose_job", "compose_jobs", "hydra_error_line", "parse_command_line"]

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


def compose_jobs(overrides: list[str], *, multirun: bool = False) -> tuple[list[str], list[tuple[list[str], DictConfig]]]:
    """Compose every job of ``overrides`` (a sweep's with ``multirun``).

    Returns the overrides as Hydra should get them (``++key=value`` where Hydra's YAML lacks a key the
    schema decides on) and each job's overrides with its composed config. Raises a one-line
    :class:`ConfigError` for what Hydra cannot compose.
    """
    from hydra import compose, initialize_config_module
    from hydra.errors import HydraException

    with initialize_config_module(config_module="palaestra.conf", version_base="1.3"):
        overrides, jobs, first = _compose_first(overrides, multirun)
        composed = [(jobs[0], first)]
        for job in jobs[1:]:
            try:
                composed.append((job, compose(config_name="config", overrides=job)))
            except HydraException as error:
                raise ConfigError(hydra_error_line(error)) from None
    return overrides, composed


def compose_job(overrides: list[str]) -> DictConfig:
    """One job's config, inside an initialized Hydra (``++`` added where the YAML lacks a key, as for the
    command line); a one-line :class:`ConfigError` for what Hydra cannot compose."""
    return _compose_first(overrides, multirun=False)[2]


def _compose_first(overrides: list[str], multirun: bool) -> tuple[list[str], list[list[str]], DictConfig]:
    """The overrides (``++`` added where refused), the jobs they sweep to and the first job's config."""
    from hydra import compose
    from hydra.errors import HydraException

    overrides = list(overrides)
    while True:  # each round adds ++ to one refused override, so it ends
        try:
            jobs = _sweep(overrides) if multirun else [overrides]
            return overrides, jobs, compose(config_name="config", overrides=jobs[0])
        except HydraException as error:
            refused = _refused(error, overrides)
            if refused is None:
                raise ConfigError(hydra_error_line(error)) from None
            overrides[refused] = "++" + overrides[refused]


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
