"""The executor: the LLM that workflow operators call, behind one OpenAI-style chat interface.

A workflow's operators never talk to a model directly. They ``await client.chat(messages)`` on an
:class:`ExecutorClient`, which belongs to one workflow run and enforces its budget (calls and
tokens). All clients of one training step share an :class:`Executor`, which

- **batches**: calls that arrive while the step's workflows run concurrently (one asyncio loop) are
  gathered and answered by one ``backend.complete(requests)`` call, so an in-process model decodes
  them as one batch instead of one by one;
- **caches**: a call identical to an earlier one (same messages, same sampling, and the same
  occurrence number inside its workflow) gets the earlier reply without reaching the backend. The
  occurrence number keeps self-consistency alive: a workflow that asks the same question three times
  gets three samples, while the four workflows of a GRPO group asking the same first question share
  one.

Three backends answer the batched requests, all with ``complete(requests) -> list[Reply]``:

- :class:`GeneratorBackend`: in-process, on palaestra's own batched generation
  (:class:`palaestra.rollout.HFGenerator`): the embedded model by default, or the policy being
  trained with its adapter switched off. No server, no network.
- :class:`OpenAIBackend`: any OpenAI-compatible ``/v1/chat/completions`` URL (``palaestra serve``,
  vLLM, a hosted API), requests sent concurrently.
- :class:`ScriptedBackend`: deterministic replies chosen by substring rules, for tests.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from collections import Counter, OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass

__all__ = [
    "BudgetExceeded",
    "Executor",
    "ExecutorClient",
    "GeneratorBackend",
    "OpenAIBackend",
    "Reply",
    "Request",
    "ScriptedBackend",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Request:
    """One chat completion asked of the executor."""

    messages: tuple[tuple[str, str], ...]
    """``(role, content)`` pairs, in order (a tuple, so that a request can be a cache key)."""
    max_tokens: int
    """Most new tokens of the reply."""
    temperature: float
    """Sampling temperature; 0 is greedy."""

    def chat(self) -> list[dict]:
        """The messages as OpenAI-style dicts."""
        return [{"role": role, "content": content} for role, content in self.messages]


@dataclass(frozen=True)
class Reply:
    """The executor's answer to one request."""

    text: str
    tokens: int
    """Tokens the reply cost (prompt + completion where the backend knows both; else completion)."""


class BudgetExceeded(RuntimeError):
    """A workflow asked for more executor calls or tokens than its budget allows."""


# --------------------------------------------------------------------------------------- backends


class ScriptedBackend:
    """Deterministic replies for tests: the first rule whose key occurs in the last user message wins.

    ``rules`` maps a substring to a reply (a string, or a function of the request's last user
    message); ``default`` answers everything else. ``seen`` records every request, so that a test can
    count what reached the backend.

    >>> backend = ScriptedBackend({"2 + 2": "Answer: 4"}, default="no idea")
    >>> [r.text for r in backend.complete([Request((("user", "What is 2 + 2?"),), 8, 0.0),
    ...                                     Request((("user", "hi"),), 8, 0.0)])]
    ['Answer: 4', 'no idea']
    """

    def __init__(self, rules: dict[str, str | Callable[[str], str]] | None = None, default: str = ""):
        self.rules = dict(rules or {})
        self.default = default
        self.seen: list[Request] = []
        self.batches: list[int] = []
        """Size of every ``complete`` call, in order (how the executor batched)."""

    def complete(self, requests: list[Request]) -> list[Reply]:
        self.batches.append(len(requests))
        replies = []
        for request in requests:
            self.seen.append(request)
            prompt = next((content for role, content in reversed(request.messages) if role == "user"), "")
            text = self.default
            for key, rule in self.rules.items():
                if key in prompt:
                    text = rule(prompt) if callable(rule) else rule
                    break
            replies.append(Reply(text, len(text.split())))
        return replies


class GeneratorBackend:
    """In-process replies from a :class:`palaestra.rollout.HFGenerator`, one generate per sampling setting.

    ``adapter_off=True`` samples from the generator's model with its LoRA adapter switched off (the
    policy's base model as executor, sharing its weights). Requests are grouped by
    ``(max_tokens, temperature)`` and each group is one ``generate`` call.
    """

    def __init__(self, generator, *, adapter_off: bool = False):
        self.generator = generator
        self.adapter_off = adapter_off

    def complete(self, requests: list[Request]) -> list[Reply]:
        from palaestra.rollout import SamplingParams

        replies: list[Reply | None] = [None] * len(requests)
        groups: dict[tuple[int, float], list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault((request.max_tokens, request.temperature), []).append(index)
        model = self.generator.model
        off = model.disable_adapter() if self.adapter_off and hasattr(model, "disable_adapter") else nullcontext()
        with off, self.generator.reusing_weights():  # one packing of the weights for all the groups
            for (max_tokens, temperature), indices in groups.items():
                sampling = SamplingParams(max_tokens, temperature=max(temperature, 1e-5), greedy=temperature <= 0)
                rollout = self.generator.generate([requests[i].chat() for i in indices], 1, sampling)
                prompt_tokens = rollout.prompt_mask.sum(dim=1).tolist()
                completion_tokens = rollout.completion_mask.sum(dim=1).tolist()
                for row, index in enumerate(indices):
                    replies[index] = Reply(rollout.texts[row].strip(), int(prompt_tokens[row] + completion_tokens[row]))
        return replies  # type: ignore[return-value]


class OpenAIBackend:
    """Replies from an OpenAI-compatible ``/v1/chat/completions`` endpoint, requests sent concurrently.

    A request that fails (network, HTTP error, bad JSON) gets an empty reply and a warning: one bad
    call makes its workflow's answer worse, it does not stop training.
    """

    def __init__(self, base_url: str, model: str, *, api_key: str | None = None, timeout_s: float = 60.0,
                 concurrency: int = 8):
        import httpx

        self.url = base_url.rstrip("/") + ("/chat/completions" if base_url.rstrip("/").endswith("/v1") else "/v1/chat/completions")
        self.model = model
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(headers=headers, timeout=timeout_s)
        self.concurrency = concurrency

    def complete(self, requests: list[Request]) -> list[Reply]:
        with ThreadPoolExecutor(max_workers=max(1, min(self.concurrency, len(requests)))) as pool:
            return list(pool.map(self._one, requests))

    def _one(self, request: Request) -> Reply:
        body = {"model": self.model, "messages": request.chat(), "max_tokens": request.max_tokens,
                "temperature": request.temperature}
        try:
            response = self.client.post(self.url, json=body)
            response.raise_for_status()
            data = response.json()
            text = data["choices"][0]["message"]["content"] or ""
            usage = data.get("usage") or {}
            tokens = int(usage.get("total_tokens") or usage.get("completion_tokens") or len(text.split()))
            return Reply(text.strip(), tokens)
        except Exception as error:  # noqa: BLE001 - any failure of a remote call is an empty reply
            log.warning("executor call to %s failed: %s", self.url, str(error).splitlines()[0] if str(error) else type(error).__name__)
            return Reply("", 0)


# --------------------------------------------------------------------------------------- batching


class Executor:
    """Batches and caches the calls of concurrently running workflows onto one backend.

    Use inside one asyncio loop: every :class:`ExecutorClient` made by :meth:`client` submits here;
    pending calls are flushed together once every runnable workflow has had its turn.
    """

    def __init__(self, backend, *, max_tokens: int = 256, temperature: float = 0.0, cache_size: int = 4096,
                 max_batch: int = 64, cost_per_million_tokens: float = 0.0, max_wait_s: float = 2.0):
        self.backend = backend
        self.cost_per_million_tokens = cost_per_million_tokens
        """The executor's price: what a run's usage summary reports as its cost (0: a local model)."""
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.cache: OrderedDict[tuple, Reply] = OrderedDict()
        self.cache_size = cache_size
        self.max_batch = max_batch
        self._pending: list[tuple[tuple, Request, asyncio.Future]] = []
        self._flush: asyncio.Task | None = None
        self.computing = 0
        """Workflows running in processes of their own that are computing (neither waiting on a call nor done): a
        batch waits for them to reach their next call (:mod:`palaestra.workflows.isolation`)."""
        self.max_wait_s = max_wait_s
        """The longest a batch waits for them: a process's start is a fork, their code between two calls is bounded
        by its lines; a single huge C-level operation is what this bound is for."""
        self.stats = Counter()
        """calls (asked by workflows), cache_hits, backend_calls, batches."""

    def reset_loop(self) -> None:
        """Forget pending calls of an earlier event loop (each step's run is a fresh ``asyncio.run``)."""
        self._pending, self._flush, self.computing = [], None, 0

    def client(self, *, max_calls: int, max_tokens: int) -> ExecutorClient:
        """A client for one workflow run, with its own budget and occurrence counts."""
        return ExecutorClient(self, max_calls=max_calls, max_tokens=max_tokens)

    async def submit(self, key: tuple, request: Request) -> Reply:
        self.stats["calls"] += 1
        if key in self.cache:
            self.stats["cache_hits"] += 1
            self.cache.move_to_end(key)
            return self.cache[key]
        for pending_key, _, future in self._pending:  # the same call already waits in this batch
            if pending_key == key:
                self.stats["cache_hits"] += 1
                return await asyncio.shield(future)
        future = asyncio.get_running_loop().create_future()
        self._pending.append((key, request, future))
        if self._flush is None or self._flush.done():
            self._flush = asyncio.ensure_future(self._flush_when_idle())
        return await asyncio.shield(future)

    async def _flush_when_idle(self) -> None:
        """Wait until no workflow adds calls any more, then answer them all in one backend call."""
        while self._pending:
            loop = asyncio.get_running_loop()
            waited_until = loop.time() + self.max_wait_s
            while len(self._pending) < self.max_batch:
                seen = len(self._pending)
                for _ in range(4):  # a few scheduler rounds: each workflow reaches its next await
                    await asyncio.sleep(0)
                if self.computing and loop.time() < waited_until:  # workflows in their own processes, too: once
                    await asyncio.sleep(0.002)  # they stop computing, their calls still take those rounds to arrive
                    continue
                if len(self._pending) == seen:
                    break
            batch, self._pending = self._pending[: self.max_batch], self._pending[self.max_batch :]
            trace = sys.gettrace()
            sys.settrace(None)  # the runner traces workflow code; the model's forward pass need not pay for it
            try:
                replies = self.backend.complete([request for _, request, _ in batch])
            except Exception as error:  # noqa: BLE001 - the workflows waiting on it see the error
                for _, _, future in batch:
                    if not future.done():
                        future.set_exception(error)
                continue
            finally:
                sys.settrace(trace)
            self.stats["backend_calls"] += len(batch)
            self.stats["batches"] += 1
            for (key, _, future), reply in zip(batch, replies):
                self.cache[key] = reply
                if len(self.cache) > self.cache_size:
                    self.cache.popitem(last=False)
                if not future.done():
                    future.set_result(reply)


class ExecutorClient:
    """One workflow run's door to the executor: an OpenAI-style ``chat`` with a budget."""

    def __init__(self, executor: Executor, *, max_calls: int, max_tokens: int):
        self.executor = executor
        self.max_calls, self.max_tokens = max_calls, max_tokens
        self.calls = self.tokens = 0
        self._occurrences: Counter = Counter()

    async def chat(self, messages: list[dict], *, max_tokens: int | None = None, temperature: float | None = None) -> str:
        """The reply text to ``messages``; raises :class:`BudgetExceeded` past the call or token budget."""
        if self.calls >= self.max_calls:
            raise BudgetExceeded(f"more than {self.max_calls} executor calls")
        if self.tokens >= self.max_tokens:
            raise BudgetExceeded(f"more than {self.max_tokens} executor tokens")
        request = Request(tuple((m["role"], m["content"]) for m in messages),
                          max_tokens or self.executor.max_tokens,
                          self.executor.temperature if temperature is None else temperature)
        identity = json.dumps([request.messages, request.max_tokens, request.temperature])
        self._occurrences[identity] += 1
        self.calls += 1
        reply = await self.executor.submit((identity, self._occurrences[identity]), request)
        self.tokens += reply.tokens
        return reply.text

    def usage(self) -> dict:
        """This run's executor usage so far, as AFlow's ``llm.get_usage_summary()`` gives it: ``total_cost`` (its
        tokens at the executor's price), ``total_tokens`` and ``calls``."""
        return {"total_cost": self.tokens * self.executor.cost_per_million_tokens / 1e6, "total_tokens": self.tokens,
                "calls": self.calls}
