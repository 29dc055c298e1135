"""Run ``palaestra.cli.main(argv)`` and record how far it got: whether torch was imported and which models were built.

    python -m tests.recipes.cli_probe train model=tiny train.steps=0    # PALAESTRA_PROBE=probe.json

The exit code and the output are the command's own; the record (JSON) goes to the file named by the
environment variable ``PALAESTRA_PROBE``: ``{"torch": bool, "models": [class names]}``, where a model
is any ``transformers.PreTrainedModel`` constructed (every model palaestra loads or builds is one:
causal LMs, the tiny model, encoders, Mamba, the sentence embedder). Watching the constructor, not
the clock, says whether a mistake was found before the weights loaded.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import json
import os
import sys

_MODELS: list[str] = []


class _WatchModels(importlib.abc.MetaPathFinder):
    """When transformers.modeling_utils is first imported, wrap PreTrainedModel.__init__ to note each model built."""

    def find_spec(self, name, path, target=None):
        if name != "transformers.modeling_utils":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        execute = spec.loader.exec_module

        def exec_module(module):
            execute(module)
            _wrap_init(module)

        spec.loader.exec_module = exec_module
        return spec


def _wrap_init(module) -> None:
    """Note each model built by ``module`` (transformers.modeling_utils)'s PreTrainedModel."""
    original = module.PreTrainedModel.__init__

    @functools.wraps(original)  # transformers reads the signature and docstring of __init__
    def init(model, *args, **kwargs):
        _MODELS.append(type(model).__name__)
        original(model, *args, **kwargs)

    module.PreTrainedModel.__init__ = init


def record() -> None:
    """Write the record: whether torch is imported, and the models built so far."""
    with open(os.environ["PALAESTRA_PROBE"], "w") as handle:
        json.dump({"torch": "torch" in sys.modules, "models": _MODELS}, handle)


def watch_models() -> None:
    """Note every model built from now on (at transformers.modeling_utils' import, or now if it is imported)."""
    module = sys.modules.get("transformers.modeling_utils")
    if module is None:
        sys.meta_path.insert(0, _WatchModels())
    else:
        _wrap_init(module)


if __name__ == "__main__":
    watch_models()
    from palaestra.cli import main

    code = 0
    try:
        main(sys.argv[1:])
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    record()  # an uncaught exception leaves no record (and a traceback, which the test looks for first)
    sys.exit(code)
