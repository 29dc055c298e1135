"""The HTTP API: OpenAI's chat, completions, models and embeddings endpoints, search, health and metrics.

    POST /v1/chat/completions   POST /v1/completions     (streamed as server-sent events on request)
    GET  /v1/models             GET  /v1/models/{id}
    POST /v1/embeddings         POST /v1/search           (the served retrieval index)
    POST /v1/load_lora_adapter  POST /v1/unload_lora_adapter   (vLLM's runtime LoRA, serve.runtime_lora)
    GET  /health                GET  /metrics             (Prometheus)

``build_app(load)`` answers at once: ``load`` (which loads the models) runs on a thread while
``/health`` says 503, and every other endpoint answers 503 in OpenAI's error shape until it is done.
Generation goes to the :class:`~palaestra.serving.engine.Engine`, which batches concurrent
requests; a client that disconnects cancels its request. Every error is OpenAI's
``{"error": {...}}`` with a one-line message; a stack trace goes to the server log only.

A rollout worker for a trainer in another process (vLLM's conventions, so one client serves both):

* ``POST /v1/load_lora_adapter {"lora_name", "lora_path"}`` loads a peft adapter folder over the
  base model and serves it as ``lora_name`` (200, text ``Success: ...``); 400 for a taken name, a
  folder without ``adapter_config.json`` or an adapter that does not fit the base; 404 when the
  server was not started with ``serve.runtime_lora=true``. ``POST /v1/unload_lora_adapter
  {"lora_name"}`` frees it (404 for a name not served, 400 for a model that is no adapter). Both
  run on the decode thread between steps: requests for other models go on meanwhile;
* completions take ``top_k`` and ``return_token_ids``: each choice then carries ``token_ids``
  (every sampled id, the stop token included) and ``prompt_token_ids``, and its log-probabilities
  one entry per id of ``token_ids`` (without it the stop token has none: the text never shows it);
* ``serve.logprobs_mode=processed_logprobs`` reports the log-probabilities of the distribution the
  tokens were drawn from (temperature, top-k, top-p applied), which a trainer compares its own with.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from palaestra.serving.catalog import AdapterRefused, Catalog, ModelNotFound, Route
from palaestra.serving.engine import Delta, Engine, Failed, Finished, GenerationJob, Sampling
from palaestra.serving.protocol import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    LoadLoraAdapterRequest,
    SearchRequest,
    UnloadLoraAdapterRequest,
    error_body,
    model_not_found,
)

__all__ = ["Services", "build_app"]

log = logging.getLogger(__name__)


@dataclass
class Services:
    """What the endpoints serve once loaded."""

    catalog: Catalog
    engine: Engine
    max_tokens: int
    """Completion budget of a request that gives none (capped by the model's context)."""
    embedder: object | None = None
    """The :class:`~palaestra.retrieval.embedder.Embedder` of ``/v1/embeddings``, or None."""
    embedder_id: str | None = None
    index: object | None = None
    """The :class:`~palaestra.retrieval.index.RetrievalIndex` of ``/v1/search``, or None."""
    runtime_lora: bool = False
    """Whether ``/v1/load_lora_adapter`` and ``/v1/unload_lora_adapter`` are open."""


class _Metrics:
    def __init__(self, app: FastAPI):
        self.registry = CollectorRegistry()
        self.requests = Counter("palaestra_requests", "HTTP requests", ["endpoint", "status"], registry=self.registry)
        self.latency = Histogram("palaestra_request_latency_seconds", "Time to the response (a stream: its start)",
                                 ["endpoint"], registry=self.registry)
        self.generation = Histogram("palaestra_generation_seconds", "Time from request to its last token",
                                    ["model"], registry=self.registry, buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120))
        self.tokens = Counter("palaestra_tokens", "Prompt and completion tokens", ["model", "kind"], registry=self.registry)
        engine = lambda: getattr(app.state, "services", None) and app.state.services.engine  # noqa: E731
        Gauge("palaestra_running_rows", "Choices being decoded", registry=self.registry).set_function(
            lambda: engine().running_rows if engine() else 0)
        Gauge("palaestra_decode_steps", "Decode steps run (each decodes one token of every row of a batch)",
              registry=self.registry).set_function(lambda: engine().steps if engine() else 0)
        Gauge("palaestra_decoded_rows", "Tokens decoded by those steps (divided by the steps: the mean batch)",
              registry=self.registry).set_function(lambda: engine().rows_decoded if engine() else 0)
        Gauge("palaestra_waiting_requests", "Requests waiting to join a batch", registry=self.registry).set_function(
            lambda: engine().waiting_requests if engine() else 0)


def build_app(load: Callable[[], Services], *, api_key: str | None = None,
              on_load_error: Callable[[BaseException], None] | None = None) -> FastAPI:
    """The FastAPI app; ``load`` runs on a thread at startup (``on_load_error`` hears of its failure)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        def loader():
            try:
                app.state.services = load()
            except BaseException as error:  # noqa: BLE001 - reported by /health and on_load_error
                log.exception("loading failed")
                app.state.load_error = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                if on_load_error is not None:
                    on_load_error(error)

        threading.Thread(target=loader, name="palaestra-load", daemon=True).start()
        yield
        services = getattr(app.state, "services", None)
        if services is not None:
            services.engine.close()

    app = FastAPI(title="palaestra", lifespan=lifespan)
    app.state.services, app.state.load_error = None, None
    metrics = _Metrics(app)

    @app.middleware("http")
    async def count(request: Request, call_next):
        start = time.perf_counter()
        if api_key and request.url.path.startswith("/v1") and request.headers.get("authorization") != f"Bearer {api_key}":
            response = _error(ApiError(401, "Incorrect or missing API key (Authorization: Bearer ...)", code="invalid_api_key"))
        else:
            response = await call_next(request)
        route = request.scope.get("route")
        endpoint = getattr(route, "path", "other")
        metrics.requests.labels(endpoint, str(response.status_code)).inc()
        metrics.latency.labels(endpoint).observe(time.perf_counter() - start)
        return response

    @app.exception_handler(ApiError)
    async def api_error(_: Request, error: ApiError):
        return _error(error)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, error: RequestValidationError):
        first = (error.errors() or [{"msg": "invalid request", "loc": ()}])[0]
        loc = [str(part) for part in first.get("loc", ()) if part != "body"]
        param = ".".join(loc) or None
        message = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
        if first.get("type") == "json_invalid":
            message, param = "the request body is not valid JSON", None
        return _error(ApiError(400, f"{param}: {message}" if param else message, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, error: StarletteHTTPException):
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        return _error(ApiError(error.status_code, str(error.detail), type=kind))

    @app.exception_handler(Exception)
    async def crashed(_: Request, error: Exception):
        log.error("request failed", exc_info=error)
        return _error(ApiError(500, "internal server error; see the server log", type="server_error"))

    def services() -> Services:
        if app.state.services is None:
            detail = f"loading failed: {app.state.load_error}" if app.state.load_error else "the server is still loading its models"
            raise ApiError(503, detail, type="server_error", code="loading")
        return app.state.services

    @app.get("/health")
    async def health():
        if app.state.services is not None:
            return {"status": "ok"}
        if app.state.load_error:
            return JSONResponse({"status": "failed", "error": app.state.load_error}, status_code=503)
        return JSONResponse({"status": "loading"}, status_code=503)

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def list_models():
        served = services()
        ids = await run_in_threadpool(served.catalog.ids)
        if served.embedder_id:
            ids.append(served.embedder_id)
        return {"object": "list", "data": [_model_card(i, served.catalog.created) for i in ids]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str):
        served = services()
        if model_id != served.embedder_id:
            await _route(served, model_id)
        return _model_card(model_id, served.catalog.created)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request):
        served = services()
        route = await _route(served, body.model)
        prompt = body.prompt_ids(route.tokenizer)
        top = body.top_logprobs or 0
        job, events = _job(served, route, [prompt], body, body.max_completion_tokens or body.max_tokens, bool(body.logprobs), top)
        ids = bool(body.return_token_ids)
        meta = _meta("chatcmpl", body.model)
        started = time.perf_counter()
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return _sse(_chat_stream(job, events, meta, include_usage, bool(body.logprobs), [prompt], metrics, started))
        result = await _collect(job, events, request)
        _account(metrics, body.model, [prompt], result, started)
        choices = []
        for i, (text, reason, _, lps, done) in enumerate(result):
            lps = done.logprobs if ids else lps
            choices.append({"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": reason,
                            "logprobs": {"content": [_chat_logprob(t) for t in lps], "refusal": None} if body.logprobs else None,
                            **({"token_ids": done.token_ids, "prompt_token_ids": prompt} if ids else {})})
        extra = {"prompt_token_ids": prompt} if ids else {}  # vLLM puts the prompt's ids beside the choices
        return {**meta, "object": "chat.completion", "choices": choices, "usage": _usage([prompt], result), **extra}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        served = services()
        route = await _route(served, body.model)
        prompts = []
        for prompt in body.prompts():
            ids = list(prompt) if isinstance(prompt, list) else route.tokenizer(prompt)["input_ids"]
            if not ids:
                raise ApiError(400, "prompt: a prompt must have at least one token", param="prompt")
            if max(ids) >= len(route.tokenizer) or min(ids) < 0:
                raise ApiError(400, "prompt: a token id is outside the model's vocabulary", param="prompt")
            prompts.append(ids)
        wants_logprobs = body.logprobs is not None
        job, events = _job(served, route, prompts, body, body.max_tokens, wants_logprobs, body.logprobs or 0)
        meta = _meta("cmpl", body.model)
        started = time.perf_counter()
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return _sse(_completion_stream(job, events, meta, include_usage, wants_logprobs, prompts, metrics, started))
        result = await _collect(job, events, request)
        _account(metrics, body.model, prompts, result, started)
        choices = []
        for i, (text, reason, _, lps, done) in enumerate(result):
            if body.return_token_ids:
                lps = done.logprobs
            choices.append({"index": i, "text": text, "finish_reason": reason,
                            "logprobs": _text_logprobs(lps) if wants_logprobs else None,
                            **({"token_ids": done.token_ids, "prompt_token_ids": prompts[i // job.n]}
                               if body.return_token_ids else {})})
        return {**meta, "object": "text_completion", "choices": choices, "usage": _usage(prompts, result)}

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest):
        served = services()
        if served.embedder is None or body.model != served.embedder_id:
            raise model_not_found(body.model)
        texts = body.texts()
        if body.dimensions not in (None, served.embedder.dim):
            raise ApiError(400, f"dimensions: {served.embedder_id} makes {served.embedder.dim}-dimensional embeddings",
                           param="dimensions")
        vectors, tokens = await run_in_threadpool(_embed, served.embedder, texts)
        data = [{"object": "embedding", "index": i,
                 "embedding": base64.b64encode(v.astype("<f4").tobytes()).decode() if body.encoding_format == "base64" else v.tolist()}
                for i, v in enumerate(vectors)]
        metrics.tokens.labels(body.model, "prompt").inc(tokens)
        return {"object": "list", "data": data, "model": body.model, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    @app.post("/v1/search")
    async def search(body: SearchRequest):
        served = services()
        if served.index is None:
            raise ApiError(404, "this server has no retrieval index; start it with serve.index=<rag run folder>", code="no_index")
        hits = (await run_in_threadpool(_search, served.index, body.query, body.k))[0]
        return {"object": "list", "data": [{"object": "search.result", "rank": rank, "id": hit.id, "score": hit.score,
                                            "text": hit.text, "metadata": hit.metadata} for rank, hit in enumerate(hits, 1)]}

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(body: LoadLoraAdapterRequest):
        served = _runtime_lora(services())
        folder = Path(body.lora_path).expanduser()
        if not (folder / "adapter_config.json").is_file():
            raise ApiError(400, f"lora_path: {body.lora_path} is not a folder with a peft adapter (adapter_config.json)",
                           param="lora_path")
        try:
            await run_in_threadpool(served.engine.call, lambda: served.catalog.add_adapter(body.lora_name, folder))
        except AdapterRefused as refused:
            raise ApiError(400, str(refused), param=refused.param) from None
        log.info("loaded LoRA adapter %s from %s", body.lora_name, folder)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(body: UnloadLoraAdapterRequest):
        served = _runtime_lora(services())
        name = body.lora_name

        def unload():
            route = served.catalog.remove_adapter(name)  # raises before anything changes
            served.engine.forget(route.key, f"The model {name!r} was unloaded while this request ran")

        try:
            await run_in_threadpool(served.engine.call, unload)
        except ModelNotFound:
            raise ApiError(404, f"The LoRA adapter {name!r} is not loaded; GET /v1/models lists the served ones",
                           param="lora_name", code="model_not_found") from None
        except AdapterRefused as refused:
            raise ApiError(400, str(refused), param=refused.param) from None
        log.info("unloaded LoRA adapter %s", name)
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")

    return app


# ------------------------------------------------------------------------------------ helpers


def _runtime_lora(served: Services) -> Services:
    if not served.runtime_lora:
        raise ApiError(404, "this server does not load adapters at runtime; start it with serve.runtime_lora=true",
                       code="runtime_lora_off")
    return served


_EMBED_LOCK = threading.Lock()


def _embed(embedder, texts: list[str]) -> tuple[np.ndarray, int]:
    with _EMBED_LOCK:
        vectors = embedder.encode(texts)
        tokens = sum(len(ids) for ids in embedder.model.tokenizer(texts)["input_ids"]) if texts else 0
    return vectors, tokens


def _search(index, query: str, k: int):
    with _EMBED_LOCK:
        return index.search([query], k)


def _error(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


def _model_card(model_id: str, created: int) -> dict:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "palaestra"}


def _meta(prefix: str, model: str) -> dict:
    return {"id": f"{prefix}-{uuid.uuid4().hex}", "created": int(time.time()), "model": model}


async def _route(served: Services, model_id: str) -> Route:
    try:
        route = served.catalog.routes.get(model_id)  # one look: an adapter may be unloaded meanwhile
        if route is not None:
            return route
        return await run_in_threadpool(served.catalog.route, model_id)  # a registered model may load now
    except ModelNotFound:
        raise model_not_found(model_id) from None


def _job(served: Services, route: Route, prompts: list[list[int]], body, max_tokens: int | None, logprobs: bool,
         top_logprobs: int) -> tuple[GenerationJob, asyncio.Queue]:
    """The generation job of a request (its budget checked against the model's context) and the
    queue its events arrive in."""
    longest = max(len(p) for p in prompts)
    room = route.max_positions - longest
    if room < 1:
        raise ApiError(400, f"the prompt has {longest} tokens; this model reads at most {route.max_positions - 1}",
                       param="messages" if isinstance(body, ChatCompletionRequest) else "prompt", code="context_length_exceeded")
    if max_tokens is not None and max_tokens > room:
        raise ApiError(400, f"max_tokens={max_tokens} and the {longest}-token prompt exceed this model's "
                       f"{route.max_positions}-token context", param="max_tokens", code="context_length_exceeded")
    n = body.n or 1
    if len(prompts) * n > served.engine.max_batch_size:
        raise ApiError(400, f"n: at most {served.engine.max_batch_size} choices per request (prompts x n)", param="n")
    temperature = 1.0 if body.temperature is None else body.temperature
    sampling = Sampling(max_tokens=max_tokens or min(served.max_tokens, room), temperature=temperature,
                        top_p=1.0 if body.top_p is None else body.top_p, top_k=max(body.top_k or 0, 0), stop=body.stops,
                        seed=body.seed, logprobs=logprobs, top_logprobs=top_logprobs)
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    job = GenerationJob(route, prompts, n, sampling, lambda event: loop.call_soon_threadsafe(events.put_nowait, event))
    served.engine.submit(job)
    return job, events


class _ClientGone(Exception):
    pass


async def _collect(job: GenerationJob, events: asyncio.Queue, request: Request) -> list[tuple]:
    """(text, finish reason, completion tokens, token log-probabilities of the text, the
    :class:`Finished` event) per choice; a client that disconnects meanwhile cancels the job."""
    texts, logprobs = [""] * job.choices, [[] for _ in range(job.choices)]
    finished: dict[int, Finished] = {}
    try:
        while len(finished) < job.choices:
            try:
                event = await asyncio.wait_for(events.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    raise _ClientGone() from None
                continue
            if isinstance(event, Delta):
                texts[event.index] += event.text
                logprobs[event.index] += event.logprobs
            elif isinstance(event, Finished):
                finished[event.index] = event
            elif isinstance(event, Failed):
                kind = "server_error" if event.status >= 500 else "invalid_request_error"
                raise ApiError(event.status, event.message, type=kind, code=event.code)
    except _ClientGone:
        raise ApiError(499, "the client closed the request", code="client_closed") from None  # nobody reads it
    finally:
        if len(finished) < job.choices:
            job.cancel()
    return [(texts[i], finished[i].reason, finished[i].completion_tokens, logprobs[i], finished[i]) for i in range(job.choices)]


def _usage(prompts: list[list[int]], result: list[tuple]) -> dict:
    prompt_tokens = sum(len(p) for p in prompts)
    completion_tokens = sum(r[2] for r in result)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}


def _account(metrics: _Metrics, model: str, prompts: list[list[int]], result: list[tuple], started: float) -> None:
    usage = _usage(prompts, result)
    metrics.tokens.labels(model, "prompt").inc(usage["prompt_tokens"])
    metrics.tokens.labels(model, "completion").inc(usage["completion_tokens"])
    metrics.generation.labels(model).observe(time.perf_counter() - started)


def _chat_logprob(token) -> dict:
    def entry(text, logprob):
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {**entry(token.token, token.logprob), "top_logprobs": [entry(t, lp) for t, lp in token.top]}


def _text_logprobs(tokens: list, offset: int = 0) -> dict:
    offsets, at = [], offset
    for token in tokens:
        offsets.append(at)
        at += len(token.token)
    return {"tokens": [t.token for t in tokens], "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [dict(t.top) for t in tokens], "text_offset": offsets}


def _sse(chunks) -> StreamingResponse:
    return StreamingResponse(chunks, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _data(payload) -> str:
    import json

    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def _events(job: GenerationJob, events: asyncio.Queue):
    """The job's events until every choice is finished; cancels the job if the stream is dropped."""
    done = 0
    try:
        while done < job.choices:
            event = await events.get()
            yield event
            if isinstance(event, Failed):
                return
            done += isinstance(event, Finished)
    finally:
        if done < job.choices:
            job.cancel()  # the client went away (the response was closed) or the job failed


async def _stream(job, events, meta, include_usage, prompts, metrics, started, *, kind: str, choice, opening=()):
    """Server-sent events of a streamed job: ``opening`` choices first, then a chunk per piece of text
    and one per finished choice (``choice(index, text, token_logprobs, finish_reason)`` shapes them as the
    endpoint does), the usage when asked, and ``[DONE]``."""
    base = {**meta, "object": kind, **({"usage": None} if include_usage else {})}
    for opened in opening:
        yield _data({**base, "choices": [opened]})
    result = [["", None, 0, []] for _ in range(job.choices)]
    async for event in _events(job, events):
        if isinstance(event, Delta) and (event.text or event.logprobs):
            result[event.index][3] += event.logprobs
            yield _data({**base, "choices": [choice(event.index, event.text, event.logprobs, None)]})
        elif isinstance(event, Finished):
            result[event.index][1:3] = [event.reason, event.completion_tokens]
            yield _data({**base, "choices": [choice(event.index, "", [], event.reason)]})
        elif isinstance(event, Failed):
            yield _data(error_body(event.message, "server_error"))
            return
    _account(metrics, meta["model"], prompts, result, started)
    if include_usage:
        yield _data({**base, "choices": [], "usage": _usage(prompts, result)})
    yield "data: [DONE]\n\n"


def _chat_stream(job, events, meta, include_usage, wants_logprobs, prompts, metrics, started):
    def choice(index, text, logprobs, finish):
        listed = {"content": [_chat_logprob(t) for t in logprobs], "refusal": None} if wants_logprobs and not finish else None
        return {"index": index, "delta": {} if finish else {"content": text}, "logprobs": listed, "finish_reason": finish}

    opening = [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
               for i in range(job.choices)]
    return _stream(job, events, meta, include_usage, prompts, metrics, started, kind="chat.completion.chunk",
                   choice=choice, opening=opening)


def _completion_stream(job, events, meta, include_usage, wants_logprobs, prompts, metrics, started):
    offsets = [0] * job.choices  # characters of each choice's text so far (the logprobs' text_offset)

    def choice(index, text, logprobs, finish):
        listed = _text_logprobs(logprobs, offsets[index]) if wants_logprobs and not finish else None
        offsets[index] += sum(len(t.token) for t in logprobs)
        return {"index": index, "text": text, "logprobs": listed, "finish_reason": finish}

    return _stream(job, events, meta, include_usage, prompts, metrics, started, kind="text_completion", choice=choice)
