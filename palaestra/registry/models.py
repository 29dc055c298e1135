"""Registered models in MLflow's own model registry: register a run's model, list, resolve, download.

A *model version* is MLflow's: ``models:/NAME/VERSION`` whose source is the ``model`` artifact
folder of the training run (a merged Hugging Face folder with tokenizer files). Everything else in
``palaestra.registry`` (the replay verdict, policy versions) is stored next to it as MLflow tags and
aliases, so ``mlflow ui`` shows the whole picture and there is no side database.

    version = register_model(tracker, tracker.run_id, "planner_model")   # after logging "model"
    folder = download_model("planner_model", version)                    # AutoModel*.from_pretrained(folder)

User mistakes (an unknown model, version or run, a store that does not exist) raise
``ConfigError`` with a one-line message; the CLI prints it and exits with code 2.
"""

from __future__ import annotations

import logging

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow.artifacts
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from palaestra.config.errors import ConfigError
from palaestra.tracking import default_tracking_uri


log = logging.getLogger("palaestra")

__all__ = [
    "ModelVersionInfo", "download_model", "list_models", "open_client", "register_model", "resolve_version",
]

# Run tags copied onto a new model version, so the registry says what a version was trained on.
_PROVENANCE_TAGS = ("task", "algo", "model", "dataset_version", "policy_id")
_DOWNLOAD_MARKER = ".palaestra_download.json"


@dataclass
class ModelVersionInfo:
    """One registered model version, as ``palaestra registry`` lists it."""

    name: str
    """Registered model name."""
    version: str
    """MLflow version number (as a string, MLflow's own type)."""
    run_id: str | None
    """The training run the version came from."""
    created_at: int
    """Creation time, milliseconds since the epoch."""
    source: str
    """Artifact URI the version points at (the run's ``model`` folder)."""
    tags: dict[str, str] = field(default_factory=dict)
    """Model-version tags: provenance, and ``status`` / ``gate`` once replayed."""
    aliases: list[str] = field(default_factory=list)
    """Aliases pointing at this version (``active``, ``policy-v3``, ...)."""

    @property
    def status(self) -> str:
        """The replay verdict: ``candidate``, ``rejected``, or ``-`` if never replayed."""
        return self.tags.get("status", "-")


def _sqlite_file(tracking_uri: str) -> Path | None:
    if not tracking_uri.startswith("sqlite:///"):
        return None
    path = tracking_uri[len("sqlite:///") :].split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


def open_client(client_or_uri: Any = None) -> MlflowClient:
    """An ``MlflowClient`` from a client, an ``MlflowTracker``, a tracking URI or None (the default).

    A SQLite store that does not exist is an error, not a new empty store: listing or replaying
    against a mistyped path should say so rather than create ``mlflow.db`` as a side effect.
    """
    if isinstance(client_or_uri, MlflowClient):
        return client_or_uri
    if hasattr(client_or_uri, "client") and isinstance(client_or_uri.client, MlflowClient):
        return client_or_uri.client  # an MlflowTracker
    uri = client_or_uri or default_tracking_uri()
    db = _sqlite_file(uri)
    if db is not None and not db.is_file():
        raise FileNotFoundError(f"no MLflow store at {db}; train and register a model first, or pass --tracking-uri")
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _not_found(error: MlflowException) -> bool:
    return getattr(error, "error_code", "") == "RESOURCE_DOES_NOT_EXIST"


def _versions_of(client: MlflowClient, name: str) -> list[ModelVersion]:
    escaped = name.replace("'", "\\'")
    return list(client.search_model_versions(f"name='{escaped}'"))


def _registered_names(client: MlflowClient) -> list[str]:
    return sorted(m.name for m in client.search_registered_models(max_results=1000))


def _check_model(client: MlflowClient, name: str):
    """The registered model ``name``; a one-line error listing the known names if it is absent."""
    try:
        return client.get_registered_model(name)
    except MlflowException as error:
        if not _not_found(error):
            raise
    known = _registered_names(client)
    hint = f"registered: {', '.join(known)}" if known else "nothing is registered in this store yet"
    raise ConfigError(f"unknown registered model {name!r}; {hint}")


def resolve_version(client: MlflowClient, name: str, version: str | int) -> ModelVersion:
    """The model version ``version`` of ``name``: a number, or an alias such as ``active``."""
    model = _check_model(client, name)
    version = str(version).strip()
    try:
        if version.isdigit():
            return client.get_model_version(name, version)
        return client.get_model_version_by_alias(name, version)
    except MlflowException as error:
        if not _not_found(error) and version.isdigit():
            raise
    versions = sorted(int(v.version) for v in _versions_of(client, name))
    aliases = sorted(model.aliases)
    known = f"versions: {', '.join(map(str, versions)) or 'none'}" + (f"; aliases: {', '.join(aliases)}" if aliases else "")
    raise ConfigError(f"model {name!r} has no version {version!r} ({known})")


def register_model(
    client_or_tracker: Any, run_id: str, name: str, artifact_path: str = "model", tags: dict | None = None
) -> str:
    """Register ``runs/<run_id>/<artifact_path>`` as a new version of ``name``; return the version.

    The registered model is created on first use. The version's source is the run's artifact
    folder itself, and the run's provenance tags (task, algo, model, dataset_version, policy_id) are
    copied onto the version next to ``tags``.
    """
    client = open_client(client_or_tracker)
    try:
        run = client.get_run(run_id)
    except MlflowException as error:
        raise ConfigError(f"no MLflow run {run_id!r} to register a model from") from error
    if not client.list_artifacts(run_id, artifact_path):
        raise ConfigError(f"run {run_id} has no artifact folder {artifact_path!r}; log the model there first")
    try:
        client.get_registered_model(name)
    except MlflowException as error:
        if not _not_found(error):
            raise
        client.create_registered_model(name)
    version_tags = {k: run.data.tags[k] for k in _PROVENANCE_TAGS if k in run.data.tags}
    version_tags.update({str(k): str(v) for k, v in (tags or {}).items()})
    source = f"{run.info.artifact_uri.rstrip('/')}/{artifact_path}"
    version = client.create_model_version(name, source, run_id=run_id, tags=version_tags)
    return str(version.version)


def list_models(client: Any = None, name: str | None = None) -> list[ModelVersionInfo]:
    """Every registered version (or those of ``name``), by model name then version number."""
    client = open_client(client)
    models = [_check_model(client, name)] if name else client.search_registered_models(max_results=1000)
    infos = []
    for model in sorted(models, key=lambda m: m.name):
        by_version: dict[str, list[str]] = {}
        for alias, version in (model.aliases or {}).items():
            by_version.setdefault(str(version), []).append(alias)
        for mv in _versions_of(client, model.name):
            infos.append(ModelVersionInfo(
                name=mv.name, version=str(mv.version), run_id=mv.run_id, created_at=int(mv.creation_timestamp),
                source=mv.source, tags=dict(mv.tags or {}), aliases=sorted(by_version.get(str(mv.version), [])),
            ))
    return sorted(infos, key=lambda i: (i.name, int(i.version)))


def _default_download_dir(tracking_uri: str, name: str, version: str) -> Path:
    from palaestra.models import default_cache_dir

    store = hashlib.sha256(tracking_uri.encode()).hexdigest()[:12]
    return default_cache_dir() / "registry" / store / name / version


def download_model(
    name: str, version: str | int, tracking_uri: str | None = None, dst: str | Path | None = None
) -> Path:
    """A local folder holding ``models:/NAME/VERSION``, ready for ``from_pretrained``.

    ``version`` may be an alias (``active``). Without ``dst`` the folder is cached under
    ``<palaestra cache>/registry/<store>/<name>/<version>`` and reused while the version still
    points at the same source; the download is written to a temporary sibling and renamed into
    place, so an interrupted download is never mistaken for a complete one.
    """
    uri = tracking_uri or default_tracking_uri()
    client = open_client(uri)
    mv = resolve_version(client, name, version)
    target = Path(dst) if dst is not None else _default_download_dir(uri, name, str(mv.version))
    marker = {"source": mv.source, "run_id": mv.run_id}
    if _marker(target) == marker:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        # What models:/NAME/VERSION resolves to, asked of this store's client: MLflow's own models:/
        # resolver reads the process-wide registry URI, not the one we were given.
        source = client.get_model_version_download_uri(name, str(mv.version))
        # Through the tracking server when it proxies the artifacts (--artifacts-destination), not from presigned
        # URLs of the object store itself: a proxying server is there for clients that cannot reach that store.
        os.environ.setdefault("MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD", "false")
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(tmp), tracking_uri=uri))
        if not local.is_dir():
            raise ConfigError(f"model version {mv.version} of {name!r} is a file ({source}), not a model folder")
        (local / _DOWNLOAD_MARKER).write_text(json.dumps(marker))  # last: its presence means "complete"
        if target.exists():
            shutil.rmtree(target, ignore_errors=True)
        try:
            os.replace(local, target)
        except OSError:  # another process put a folder there meanwhile: use it if it is this version
            if _marker(target) != marker:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _marker(folder: Path) -> dict | None:
    try:
        return json.loads((folder / _DOWNLOAD_MARKER).read_text())
    except (OSError, ValueError):
        return None


def register(tracker, name: str, results: dict) -> None:
    """Register the run's ``model`` artifact as a new version of ``name`` in MLflow's model registry."""
    store = tracker.live()  # the registry needs the run's writes in the store
    if store is None:
        log.warning("the model was not registered as %s: the tracking store is away; resume the run when it is back "
                    "to register it", name)
        return
    version = register_model(store, store.run_id, name)
    tracker.set_tags({"registered_model": name, "registered_model_version": version})
    results["registered_model_version"] = version
    log.info("registered models:/%s/%s", name, version)
