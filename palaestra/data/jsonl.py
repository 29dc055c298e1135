"""JSONL files: read line by line (every mistake in them a one-line error that names the file and line), written atomically."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

from palaestra.config.errors import ConfigError

__all__ = ["read_jsonl", "write_jsonl"]


def read_jsonl(path: str | Path, what: str = "data") -> Iterator[tuple[str, dict]]:
    """``("file:line", object)`` for every non-blank line of a JSONL file.

    A missing file, bytes that are not UTF-8, a line that is not valid JSON or not a JSON object
    raise a :class:`ConfigError` naming the file (and line) and what to do.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} file {path} does not exist; give a JSONL file with one JSON object a line")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise ConfigError(f"{what} file {path} is not UTF-8 text (byte {error.start}); save it as UTF-8") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ConfigError(f"{path}:{number}: not valid JSON ({error.msg} at column {error.colno}); "
                              "write one JSON object a line") from None
        if not isinstance(row, dict):
            raise ConfigError(f"{path}:{number}: each line must be a JSON object, got {type(row).__name__}")
        yield f"{path}:{number}", row


def write_jsonl(path: str | Path, records) -> Path:
    """Write ``records`` (dicts) one JSON object a line, UTF-8, through a temp file renamed into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    temporary.write_text("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records), encoding="utf-8")
    os.replace(temporary, path)
    return path
