"""Components chosen by name: a plain table of built-ins, or an import path for user code."""

from __future__ import annotations

import importlib
from typing import Any


def lookup(name: str, table: dict[str, Any], kind: str) -> Any:
    """``table[name]``, or the object at "package.module:attribute".

    Raises a one-line ValueError naming the valid choices when neither works.
    """
    if name in table:
        return table[name]
    if ":" in name:
        module_name, _, attribute = name.partition(":")
        try:
            return getattr(importlib.import_module(module_name), attribute)
        except (ImportError, AttributeError) as error:
            raise ValueError(f"{kind} {name!r} could not be imported: {error}") from None
    raise ValueError(f"unknown {kind} {name!r}; use one of {', '.join(table)} or 'package.module:attribute'")
