"""The configuration's error and the small checks every schema uses.

A leaf module: it imports nothing of palaestra, so any module may raise :class:`ConfigError` without
pulling in the schemas (or torch).
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["ConfigError", "check", "check_writable", "missing_local_path", "not_a_file", "one_of"]


class ConfigError(ValueError):
    """A user mistake in the configuration; the message is one line."""


def check(condition: bool, message: str) -> None:
    """Raise a ConfigError with ``message`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(message)


def one_of(key: str, value, allowed) -> None:
    """``key=value`` must be one of ``allowed``.

    >>> one_of("train.device", "tpu", ("auto", "cpu"))
    Traceback (most recent call last):
    palaestra.config.errors.ConfigError: train.device='tpu' is unknown; use one of auto, cpu
    """
    check(value in allowed, f"{key}={value!r} is unknown; use one of {', '.join(allowed)}")


def not_a_file(path: str | None) -> str:
    """Why ``path`` is not a readable file: a folder, or missing."""
    return "is a folder, not a file" if path and os.path.isdir(path) else "does not exist"


def missing_local_path(path: str) -> bool:
    """True for a model path that names a local file or folder (absolute, ./, ~ or deeper than a hub id
    ``org/name``) that does not exist; models.loading reads any other path as a hub id.

    >>> [missing_local_path(p) for p in ("./nowhere", "/no/such/model", "HuggingFaceTB/SmolLM2-135M", ".")]
    [True, True, False, False]
    """
    local = Path(path).expanduser()
    looks_local = local.is_absolute() or path.startswith((".", "~")) or path.count("/") > 1
    return looks_local and not local.exists()


def check_writable(key: str, path) -> None:
    """``key=path`` is a folder palaestra creates or writes into: a one-line ConfigError when it cannot
    (a file in the way, or a folder without write permission), before any work starts."""
    target = Path(path).expanduser()
    existing = target
    while not existing.exists() and existing != existing.parent:  # the nearest part of the path that exists
        existing = existing.parent
    if existing == target and not target.is_dir():
        raise ConfigError(f"{key}={path} is a file, not a folder; give a folder path (it is created if missing)")
    if not existing.is_dir():
        raise ConfigError(f"{key}={path} cannot be created: {existing} is a file; give a folder path")
    check(os.access(existing, os.W_OK | os.X_OK), f"{key}={path} cannot be written: {existing} is read-only; "
          "give a folder you can write to")
