"""``palaestra serve``: the OpenAI-compatible API over the base model and what was trained from it.

    palaestra serve model=tiny serve.port=8000
    palaestra serve serve.models=[runs/chain_sum-grpo/20260101-120000] serve.index=runs/faq-rag/20260101-130000
    palaestra serve +serve.named_models.planner=runs/planner-sft/x +serve.named_models.merged=exported/chain_sum serve.registry=true
    palaestra serve model=tiny serve.runtime_lora=true serve.logprobs_mode=processed_logprobs   (a trainer's rollout worker)

The configuration is checked and the folders are classified first (one-line errors); then the
server listens at once and loads the models on a thread (``GET /health`` answers 503 until they
are loaded, 200 after).
"""

from __future__ import annotations

import logging
from pathlib import Path

from palaestra.config import ServeJob
from palaestra.config.sections import validate_sections
from palaestra.config.errors import ConfigError

__all__ = ["base_model_id", "build_services", "serve_command"]

log = logging.getLogger(__name__)


def base_model_id(config: ServeJob) -> str:
    """The base model's id: serve.base_id, else model.name (the folder name for model.path)."""
    if config.serve.base_id:
        return config.serve.base_id
    return Path(config.model.path).expanduser().resolve().name if config.model.path else config.model.name


def build_services(config: ServeJob):
    """A loader of everything the API serves (run on the server's loading thread)."""
    from palaestra.serving.catalog import plan_models

    serve = config.serve
    base_id = base_model_id(config)
    plan = plan_models(serve.models, base_id, serve.named_models)  # cheap: checked before the server starts
    index_folder = None
    if serve.index:
        given = Path(serve.index)
        index_folder = given if (given / "index.json").is_file() else given / "index"

    def load():
        import torch

        from palaestra.models.precision import resolve_precision
        from palaestra.runtime import training_device
        from palaestra.serving.app import Services
        from palaestra.serving.catalog import Catalog
        from palaestra.serving.engine import Engine

        if serve.threads:
            torch.set_num_threads(serve.threads)
        device = training_device(serve.device)
        dtype = config.model.dtype
        if dtype == "auto":  # inference only: bf16 weights where the hardware multiplies bf16 fast
            dtype = "bfloat16" if resolve_precision(config.model.precision, device) == "bf16" else "float32"
        catalog = Catalog.load(model_name=config.model.name, model_path=config.model.path, base_id=base_id, plan=plan,
                               device=device, dtype=dtype,
                               registry=serve.registry, tracking_uri=config.tracking.tracking_uri)
        embedder = index = None
        if serve.embedder:
            from palaestra.retrieval.embedder import Embedder

            embedder = Embedder(serve.embedder, device=device)
        if index_folder is not None:
            from palaestra.retrieval.index import RetrievalIndex

            index = RetrievalIndex.load(index_folder, embedder=embedder if embedder and embedder.name == _index_embedder(index_folder) else None,
                                        device=device)
        engine = Engine(max_batch_size=serve.max_batch_size, window_s=serve.batch_window_ms / 1000,
                        logprobs_mode=serve.logprobs_mode)
        embedder_id = Path(serve.embedder).name if serve.embedder and Path(serve.embedder).is_dir() else serve.embedder
        return Services(catalog, engine, serve.max_tokens, embedder, embedder_id, index, runtime_lora=serve.runtime_lora)

    return load


def _index_embedder(folder: Path) -> str | None:
    import json

    return json.loads((folder / "index.json").read_text()).get("embedder")


def serve_command(config: ServeJob) -> int:
    """Serve until interrupted; a failure to load the models is a one-line error (exit code 2)."""
    import uvicorn

    from palaestra.serving.app import build_app

    validate_sections(config)
    load = build_services(config)
    failure: list[BaseException] = []
    server: uvicorn.Server | None = None

    def on_load_error(error: BaseException) -> None:
        failure.append(error)
        if server is not None:
            server.should_exit = True

    app = build_app(load, api_key=config.serve.api_key, on_load_error=on_load_error)
    server = uvicorn.Server(uvicorn.Config(app, host=config.serve.host, port=config.serve.port, log_level="info"))
    log.info("serving %s on http://%s:%s/v1", base_model_id(config), config.serve.host, config.serve.port)
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn shuts down gracefully on Ctrl+C, then passes the signal on
        pass
    if failure:
        error = failure[0]
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"palaestra serve could not load its models: {message}")
    return 0
