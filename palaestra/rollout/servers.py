"""Rollouts on inference servers: OpenAI-compatible workers that sample while the trainer trains.

``rollout.engine=server rollout.servers=[http://a:8001, http://b:8001]``. Each worker loads the base model
once (``palaestra serve serve.runtime_lora=true serve.logprobs_mode=processed_logprobs``, or
``vllm serve BASE --enable-lora --logprobs-mode processed_logprobs`` with
``VLLM_ALLOW_RUNTIME_LORA_UPDATING=true``); the trainer talks to it over vLLM's conventions only:

* **adapter sync**: after every update :meth:`ServerGenerator.sync_adapter` saves the LoRA adapter (a few MB,
  not merged weights) to ``rollout.adapter_dir`` under a new versioned name (``default-<trainer>-v<N>``),
  asks every worker to load it (``POST /v1/load_lora_adapter``) and to drop the previous version
  (``POST /v1/unload_lora_adapter``). Requests name the version, so no request can be answered by a
  stale adapter: a worker that lacks it answers 404 and is sent it again;
* **sampling**: one ``POST /v1/completions`` per group (the prompt's token ids, ``n`` = the group size,
  ``logprobs=0``, ``return_token_ids=true``), groups spread over the workers round-robin and sent
  together (a worker batches what arrives together). The answer's token ids are the training tokens (nothing
  is re-tokenized) and its log-probs are the rollout's ``sampler_logprobs``, which the mismatch correction
  compares with the trainer's (:mod:`palaestra.algorithms.rollout_correction`);
* **failures**: a worker that refuses the connection, times out or answers 5xx is set aside, its groups are
  re-sent to the others, and it is tried again after a back-off (0.5 s, doubling up to 30 s; a restarted worker
  is sent the current adapter first, a slow one has the versions it missed dropped). Loading and unloading an
  adapter may take ``ADAPTER_TIMEOUT_S``, a group's request ``rollout.request_timeout_s``. When no worker answers
  for ``rollout.server_wait_s`` after a failure the run stops with a one-line error; it never hangs. A 4xx other
  than a missing adapter is a request the worker will never accept: a one-line error at once.

With several training processes each pushes its own copy of the adapter (the same weights under its own
name): the workers hold one adapter per process.

Each request carries a seed drawn from the trainer's random generator, so a resumed run asks for the same
samples.
"""

from __future__ import annotations

import itertools
import logging
import secrets
import shutil
import threading
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import torch

from palaestra.rollout.hf import Rollout, SamplingParams, encode_chat, rollout_from_token_ids, stop_token_ids

__all__ = ["RolloutServerError", "ServerGenerator", "check_servers"]

log = logging.getLogger("palaestra")

MAX_CHOICES_PER_REQUEST = 16  # palaestra serve's cap on n (the protocol's); a larger group is asked for in pieces
ADAPTER_TIMEOUT_S = 60.0  # loading or unloading an adapter (a few MB) takes seconds; a worker past this is down


class RolloutServerError(RuntimeError):
    """A rollout worker cannot serve the run (a one-line reason)."""


class _WorkerDown(Exception):
    """The worker did not answer (connection, timeout, 5xx): try another, and this one later."""


@dataclass
class _Worker:
    url: str
    """The base URL, without /v1."""
    client: httpx.Client
    holds: set[str] = field(default_factory=set)
    """The adapter versions this worker has loaded (as far as this trainer knows)."""
    maybe_holds: set[str] = field(default_factory=set)
    """Versions it held when it failed: unloaded once it answers again, unless it restarted and lost them."""
    retry_at: float = 0.0
    """While down: when to try it again (monotonic clock); 0: up."""
    failures: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def available(self, now: float) -> bool:
        return now >= self.retry_at

    def set_aside(self, reason: object) -> None:
        """Down: what it holds is uncertain (a restarted worker holds nothing, a slow one still does); back off
        0.5 s, doubling up to 30 s."""
        if not self.failures:
            log.warning("rollout server %s failed (%s); its requests go to the others until it answers", self.url, reason)
        self.failures += 1
        self.retry_at = time.monotonic() + min(30.0, 0.5 * 2 ** (self.failures - 1))
        self.maybe_holds |= self.holds
        self.holds.clear()

    def answered(self) -> None:
        if self.failures:
            log.info("rollout server %s answers again", self.url)
        self.failures, self.retry_at = 0, 0.0


def base_url(url: str) -> str:
    """A worker's base URL without a trailing slash or ``/v1``.

    >>> base_url("http://h:8000/v1/"), base_url("http://h:8000")
    ('http://h:8000', 'http://h:8000')
    """
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def check_servers(urls: list[str], *, wait_s: float, api_key: str | None = None) -> None:
    """Wait up to ``wait_s`` for at least one worker to answer ``GET /v1/models``; a one-line
    :class:`RolloutServerError` naming them when none does (called before any model loads)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    deadline = time.monotonic() + wait_s
    while True:
        for url in urls:
            try:
                if httpx.get(f"{base_url(url)}/v1/models", headers=headers, timeout=5.0).status_code == 200:
                    return
            except httpx.InvalidURL as error:
                raise RolloutServerError(f"rollout.servers: {url!r} is not a valid URL ({error})") from None
            except httpx.HTTPError:
                pass
        if time.monotonic() >= deadline:
            raise RolloutServerError(
                f"no rollout server answers GET /v1/models at {', '.join(urls)} (waited {wait_s:.0f} s); start one with "
                "palaestra serve serve.runtime_lora=true serve.logprobs_mode=processed_logprobs, or fix rollout.servers")
        time.sleep(1.0)


class ServerGenerator:
    """Samples on OpenAI-compatible rollout workers, to which it pushes the trained LoRA adapter.

    The same ``generate(prompts, num_samples, sampling, adapter) -> Rollout`` as the in-process engines; its
    rollouts carry the workers' ``sampler_logprobs``.

    Args:
        model: the peft-wrapped policy being trained (``sync_adapter`` saves its adapters).
        tokenizer: its tokenizer (prompts are rendered with its chat template here and sent as token ids).
        servers: the workers' base URLs.
        adapter_dir: where adapter versions are saved; every worker must be able to read it.
        max_prompt_length: prompts keep their last this many tokens.
        precision: the trainer's compute precision (read by tasks that run the policy in process).
        request_timeout_s: the longest one request may take.
        server_wait_s: how long to wait when no worker answers before giving up.
        api_key: sent as ``Authorization: Bearer`` when set.
    """

    def __init__(self, model, tokenizer, servers: list[str], *, adapter_dir: str | Path, max_prompt_length: int = 512,
                 precision: str = "fp32", request_timeout_s: float = 600.0, server_wait_s: float = 120.0,
                 api_key: str | None = None):
        self.model, self.tokenizer, self.precision = model, tokenizer, precision
        self.max_prompt_length, self.server_wait_s = max_prompt_length, server_wait_s
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        timeout = httpx.Timeout(request_timeout_s, connect=5.0)
        self.workers = [_Worker(base_url(url), httpx.Client(base_url=base_url(url), timeout=timeout, headers=headers))
                        for url in servers]
        self.stop_ids = stop_token_ids(model, tokenizer)
        self.adapter_dir = Path(adapter_dir)
        self._trainer = secrets.token_hex(4)  # this trainer process's adapter names: never a stale one's
        self._versions = itertools.count(1)
        self._current: dict[str, tuple[str, Path]] = {}  # adapter -> (served name, folder) of its latest version
        self._pool = ThreadPoolExecutor(max_workers=8 * len(self.workers), thread_name_prefix="palaestra-rollout")
        self.resent = 0  # requests re-sent after a worker failed (logged by the recipe)
        self._closed = False

    # ------------------------------------------------------------------------------------ the adapter

    def sync_adapter(self, adapter: str = "default") -> None:
        """Publish the current weights of ``adapter``: a new version on every worker that answers, the previous
        one dropped (a worker that is down is sent the newest when it is back)."""
        name = f"{adapter}-{self._trainer}-v{next(self._versions)}"
        folder = self.adapter_dir / name
        partial = folder.with_name(f".{name}.partial")
        self.model.save_pretrained(str(partial), selected_adapters=[adapter])
        partial.rename(folder)  # a worker never reads a half-written adapter
        saved = folder / adapter if (folder / adapter).is_dir() else folder  # peft nests non-default adapters
        previous = self._current.get(adapter)
        self._current[adapter] = (name, saved)
        now = time.monotonic()

        def publish(worker: _Worker) -> None:
            try:
                self._push(worker, name, saved)
                if previous is not None and previous[0] in worker.holds:
                    self._post(worker, "/v1/unload_lora_adapter", {"lora_name": previous[0]}, timeout=ADAPTER_TIMEOUT_S)
                    worker.holds.discard(previous[0])
            except _WorkerDown as reason:
                worker.set_aside(reason)

        for future in [self._pool.submit(publish, worker) for worker in self.workers if worker.available(now)]:
            future.result()  # every worker at once: a slow one costs its timeout once, not once per worker
        if previous is not None:
            shutil.rmtree(self.adapter_dir / previous[0], ignore_errors=True)

    def _push(self, worker: _Worker, name: str, folder: Path) -> None:
        """Make sure ``worker`` holds adapter version ``name``."""
        with worker.lock:
            if name in worker.holds:
                return
            response = self._post(worker, "/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(folder.resolve())},
                                  timeout=ADAPTER_TIMEOUT_S)
            if response.status_code == 404:
                raise RolloutServerError(
                    f"rollout server {worker.url} could not load adapter {name} ({_message(response)}): it must load adapters "
                    "at runtime (palaestra serve serve.runtime_lora=true; vLLM --enable-lora with "
                    f"VLLM_ALLOW_RUNTIME_LORA_UPDATING=true) and read rollout.adapter_dir ({self.adapter_dir.resolve()})")
            if response.status_code >= 400 and "already" not in response.text:
                raise RolloutServerError(f"rollout server {worker.url} could not load adapter {name}: {_message(response)}")
            worker.holds.add(name)
            for stale in worker.maybe_holds - {name}:  # versions it held before it failed, if it still does
                self._post(worker, "/v1/unload_lora_adapter", {"lora_name": stale}, timeout=ADAPTER_TIMEOUT_S)
            worker.maybe_holds.clear()

    def _post(self, worker: _Worker, path: str, body: dict, timeout: float | None = None) -> httpx.Response:
        try:
            response = worker.client.post(path, json=body, **({"timeout": httpx.Timeout(timeout, connect=5.0)} if timeout else {}))
        except httpx.HTTPError as error:
            raise _WorkerDown(f"{worker.url}: {type(error).__name__}") from None
        if response.status_code >= 500:
            raise _WorkerDown(f"{worker.url}: HTTP {response.status_code}")
        return response

    # ------------------------------------------------------------------------------------ sampling

    def reusing_weights(self):
        """The workers hold their own weights; nothing to reuse between calls (see HFGenerator)."""
        return nullcontext(self)

    def encode_prompts(self, prompts: list[list[dict]]) -> list[list[int]]:
        return [encode_chat(self.tokenizer, messages)[-self.max_prompt_length :] for messages in prompts]

    def generate(self, prompts: list[list[dict]], num_samples: int, sampling: SamplingParams, adapter: str = "default") -> Rollout:
        """``num_samples`` completions per prompt from the latest synced ``adapter``, grouped prompt by prompt."""
        if adapter not in self._current:
            self.sync_adapter(adapter)
        unique = self.encode_prompts(prompts)
        pieces = [(prompt, min(MAX_CHOICES_PER_REQUEST, num_samples - start))
                  for prompt in range(len(unique)) for start in range(0, num_samples, MAX_CHOICES_PER_REQUEST)]
        bodies = [{"prompt": unique[prompt], "n": count, "max_tokens": sampling.max_new_tokens,
                   "temperature": 0.0 if sampling.greedy else sampling.temperature,
                   "top_p": 1.0 if sampling.greedy else sampling.top_p,
                   "top_k": -1 if sampling.greedy or not sampling.top_k else sampling.top_k,
                   "logprobs": 0, "return_token_ids": True, "seed": int(torch.randint(2**31 - 1, ()))}
                  for prompt, count in pieces]
        answers = self._dispatch(bodies, adapter)
        completions, truncated, logprobs = [], [], []
        for choices in answers:  # pieces in prompt order: each prompt's samples together
            for choice in choices:
                completions.append(choice["token_ids"])
                truncated.append(choice["finish_reason"] == "length")
                logprobs.append(choice["logprobs"])
        return rollout_from_token_ids(
            unique, completions, num_samples, truncated, pad_id=self.tokenizer.pad_token_id, stop_ids=self.stop_ids,
            decode=lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True), logprobs=logprobs,
        )

    def _dispatch(self, bodies: list[dict], adapter: str) -> list[list[dict]]:
        """Every request answered, spread over the workers that answer; a failed one is sent again."""
        answers: list = [None] * len(bodies)
        pending = deque(range(len(bodies)))
        running: dict = {}
        turn = itertools.count()
        stalled_since = None  # the first failure since the last answer: the wait for a worker counts from there
        try:
            while pending or running:
                now = time.monotonic()
                if stalled_since is not None and now - stalled_since > self.server_wait_s:
                    raise RolloutServerError(
                        f"no rollout server answered for {self.server_wait_s:.0f} s ({', '.join(w.url for w in self.workers)}); "
                        "restart them or raise rollout.server_wait_s")
                ready = [worker for worker in self.workers if worker.available(now)]
                while pending and ready:
                    index = pending.popleft()
                    worker = ready[next(turn) % len(ready)]
                    running[self._pool.submit(self._complete, worker, adapter, bodies[index])] = (index, worker)
                if not running:  # every worker is set aside: wait for one to come back, not forever
                    time.sleep(0.2)
                    continue
                done, _ = wait(running, timeout=1.0, return_when=FIRST_COMPLETED)
                for future in done:
                    index, worker = running.pop(future)
                    try:
                        answers[index] = future.result()
                    except _WorkerDown as reason:
                        worker.set_aside(reason)
                        pending.append(index)
                        self.resent += 1
                        stalled_since = stalled_since or time.monotonic()
                        continue
                    worker.answered()
                    stalled_since = None
        except BaseException:
            self.close()  # nothing of this step is waited for: its requests are dropped with the clients
            raise
        return answers

    def _complete(self, worker: _Worker, adapter: str, body: dict) -> list[dict]:
        """One request on ``worker`` (the current adapter version pushed first when it lacks it): its choices as
        {token_ids, logprobs, finish_reason}, in order."""
        for attempt in range(2):
            name, folder = self._current[adapter]
            self._push(worker, name, folder)
            response = self._post(worker, "/v1/completions", {"model": name, **body})
            if response.status_code == 404 and attempt == 0:  # it lost the adapter (restarted): send it again
                worker.holds.discard(name)
                continue
            if response.status_code >= 400:
                raise RolloutServerError(f"rollout server {worker.url} refused a completion request: {_message(response)}")
            try:
                choices = sorted(response.json()["choices"], key=lambda c: c["index"])
            except (ValueError, KeyError, TypeError):
                raise RolloutServerError(f"rollout server {worker.url} answered a completion request with no choices: "
                                         f"{response.text[:200]!r}") from None
            return [_choice(choice, worker.url) for choice in choices]
        raise RolloutServerError(f"rollout server {worker.url} does not serve adapter {name} right after loading it")

    def close(self) -> None:
        """Drop this trainer's adapters from the workers that answer (best effort) and let go of them."""
        if self._closed:
            return
        self._closed = True
        self._pool.shutdown(wait=False, cancel_futures=True)
        for worker in self.workers:
            for name in worker.holds | worker.maybe_holds:
                try:
                    worker.client.post("/v1/unload_lora_adapter", json={"lora_name": name}, timeout=5.0)
                except httpx.HTTPError:
                    break  # it is gone: nothing to drop
            worker.client.close()


def _choice(choice: dict, url: str) -> dict:
    """A completion choice's sampled ids, their log-probs and finish reason, checked."""
    ids = choice.get("token_ids")
    logprobs = (choice.get("logprobs") or {}).get("token_logprobs")
    if ids is None:
        raise RolloutServerError(f"rollout server {url} returned no token_ids; it needs return_token_ids "
                                 "(palaestra serve, or vLLM 0.10.2 and later)")
    if logprobs is None or len(logprobs) != len(ids):
        raise RolloutServerError(f"rollout server {url} returned {0 if logprobs is None else len(logprobs)} log-probs for "
                                 f"{len(ids)} tokens; it must report one per sampled token")
    return {"token_ids": list(ids), "logprobs": [float(value) for value in logprobs], "finish_reason": choice.get("finish_reason")}


def _message(response: httpx.Response) -> str:
    """The one-line reason of an error answer (OpenAI's error shape, or the body's first line)."""
    try:
        error = response.json().get("error")
        text = error.get("message") if isinstance(error, dict) else error or response.text
    except ValueError:
        text = response.text
    return f"HTTP {response.status_code}: {(str(text).strip().splitlines() or [''])[0]}"
