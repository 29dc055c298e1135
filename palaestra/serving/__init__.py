"""Serving: an OpenAI-compatible HTTP API over palaestra's models, with requests batched on its own decode loop.

``palaestra serve`` (:mod:`palaestra.serving.command`) runs it; :func:`build_app` is the FastAPI
app, :class:`Engine` the batching scheduler, :class:`Catalog` the served model ids and
:class:`BackgroundServer` runs the API on a thread (tests, notebooks, benchmarks).
"""

from palaestra.serving.app import Services, build_app
from palaestra.serving.catalog import Catalog, ModelNotFound, Route, plan_models
from palaestra.serving.engine import Engine, GenerationJob, Sampling
from palaestra.serving.server import BackgroundServer

__all__ = [
    "BackgroundServer", "Catalog", "Engine", "GenerationJob", "ModelNotFound", "Route", "Sampling", "Services",
    "build_app", "plan_models",
]
