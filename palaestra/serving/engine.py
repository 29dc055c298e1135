"""The batching scheduler: concurrent requests are decoded together, each with its own sampling settings.

One background thread owns the models. Its loop, top to bottom:

1. **admit**: requests waiting in the queue join the running batch of their model (one prefill
   forward for all that arrive together; on an idle server it first waits ``window_s`` for more).
   A request whose model's batch is full, or cannot take rows mid-flight, waits for the next turn;
2. **step**: each model with rows decodes one token for all of them (models take turns, so a
   long request on one adapter does not stop the others);
3. **hand out**: every new token goes through its row (stop tokens, stop strings, token budget) and
   the text it adds is sent to the request's ``sink`` as a :class:`Delta`; a finished or cancelled
   row leaves the batch at once, its :class:`Finished` carrying every token id it sampled (the stop
   token included) and, when asked, their log-probabilities.

Work that changes the models (loading or unloading a LoRA adapter) goes through :meth:`Engine.call`:
it runs on this thread between two steps, so no forward ever sees a half-changed network, and the
rows of other models go on decoding afterwards. :meth:`Engine.forget` drops a model's batch (its
packed weights) and fails its requests, for a model that is no longer served.

Sampling is per row: temperature (0 is greedy), top-k, top-p and a generator of its own (seeded by
the request's ``seed``, so a seeded request draws the same tokens whatever else is in the batch).
Log-probabilities (``logprobs_mode``, vLLM's names): ``raw_logprobs`` are those of the model's
distribution (before temperature, top-k and top-p), as OpenAI's API reports them;
``processed_logprobs`` those of the distribution the token was drawn from
(``log_softmax(filtered_logits(logits, temperature, top_k, top_p))``; greedy rows: raw), which is
what a trainer's importance ratios need.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Callable, TypeVar

import torch

from palaestra.config.commands import LOGPROBS_MODES
from palaestra.models.shapes import bucket_length
from palaestra.rollout.decode import draw, filtered_logits
from palaestra.serving.catalog import ModelNotFound

__all__ = ["Delta", "Engine", "Failed", "Finished", "GenerationJob", "Sampling", "TokenLogprob"]

log = logging.getLogger(__name__)

_FLOOR = -9999.0  # a log-probability of -inf (a token top-k or top-p ruled out) as vLLM reports it: JSON has no -inf
_T = TypeVar("_T")


@dataclass
class Sampling:
    """How to decode one request's choices."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    """Sample among the top_k most likely tokens only (0: all)."""
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    logprobs: bool = False
    top_logprobs: int = 0


@dataclass
class TokenLogprob:
    """One generated token and its log-probability (and the most likely alternatives when asked)."""

    token: str
    logprob: float
    top: list[tuple[str, float]]


@dataclass
class Delta:
    """New text of choice ``index`` (and the tokens that made it, when log-probabilities were asked)."""

    index: int
    text: str
    logprobs: list[TokenLogprob]


@dataclass
class Finished:
    """Choice ``index`` is done: ``reason`` is stop (stop token or string) or length (token budget).

    ``token_ids`` are every token sampled for it, the stop token included (the text never shows
    that one, and a stop string's text is cut while its tokens stay); ``logprobs`` has one entry per
    id when log-probabilities were asked (else it is empty).
    """

    index: int
    reason: str
    completion_tokens: int
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass
class Failed:
    """The request could not be decoded; the message is one line, safe to show a client. ``status``
    and ``code``: the HTTP status and OpenAI error code to answer with."""

    message: str
    status: int = 500
    code: str | None = None


@dataclass
class _Call:
    """Work for the decode thread (:meth:`Engine.call`) and the future its caller waits on."""

    fn: Callable[[], object]
    future: Future


@dataclass
class GenerationJob:
    """A request for ``len(prompts) * n`` choices: choice ``i * n + j`` is sample ``j`` of prompt ``i``.

    ``route`` says which model decodes it (an object with ``key``, ``batch()`` and ``activate()``,
    see :mod:`palaestra.serving.catalog`); ``sink`` receives the events, from the scheduler thread.
    """

    route: object
    prompts: list[list[int]]
    n: int
    sampling: Sampling
    sink: Callable[[object], None]
    cancelled: threading.Event = field(default_factory=threading.Event)

    @property
    def choices(self) -> int:
        return len(self.prompts) * self.n

    def cancel(self) -> None:
        """Stop decoding this request (its rows leave the batch at the next step)."""
        self.cancelled.set()


class _Row:
    """One choice being decoded: its tokens, its text so far and how much of it was sent."""

    def __init__(self, job: GenerationJob, index: int, tokenizer, stop_ids: set[int], device):
        self.job, self.index, self.tokenizer, self.stop_ids = job, index, tokenizer, stop_ids
        sampling = job.sampling
        self.generator = torch.Generator(device=device)
        seed = sampling.seed + index if sampling.seed is not None else random.SystemRandom().randrange(2**62)
        self.generator.manual_seed(seed)
        self.ids: list[int] = []  # the tokens of the text (no stop token)
        self.sampled: list[int] = []  # every token sampled, the stop token included
        self.sampled_logprobs: list[TokenLogprob] = []  # their log-probabilities, when asked
        self.count = 0  # tokens sampled, the stop token included
        self.sent = 0  # characters of the text already sent
        self.pending: list[TokenLogprob] = []  # log-probabilities of tokens whose text is not sent yet
        self.longest_stop = max((len(s) for s in sampling.stop), default=0)

    def take(self, token: int, logprob: TokenLogprob | None) -> bool:
        """Account for one sampled token; True when the row is finished."""
        self.count += 1
        self.sampled.append(token)
        if logprob is not None:
            self.sampled_logprobs.append(logprob)
        if token in self.stop_ids:
            return self._finish("stop", self._text())
        self.ids.append(token)
        if logprob is not None:
            self.pending.append(logprob)
        text = self._text()
        stops = [text.find(s, max(0, self.sent - self.longest_stop)) for s in self.job.sampling.stop]
        found = [at for at in stops if at >= 0]
        if found:
            return self._finish("stop", text[: min(found)])
        if self.count >= self.job.sampling.max_tokens:
            return self._finish("length", text)
        # hold back what may be the start of a stop string, or half of a multi-byte character
        safe = len(text) - max(self.longest_stop - 1, 0)
        while safe > self.sent and text[safe - 1] == "\ufffd":
            safe -= 1
        if safe > self.sent:
            self._send(text[self.sent : safe])
        return False

    def _text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def _send(self, text: str) -> None:
        self.job.sink(Delta(self.index, text, self.pending))
        self.sent += len(text)
        self.pending = []

    def _finish(self, reason: str, text: str) -> bool:
        if len(text) > self.sent or self.pending:
            self._send(text[self.sent :])
        self.job.sink(Finished(self.index, reason, self.count, self.sampled, self.sampled_logprobs))
        return True


class _Group:
    """The running batch of one route (a model, or one adapter over it) and its rows."""

    def __init__(self, route, batch):
        self.route, self.batch = route, batch
        self.rows: list[_Row] = []
        self.tokens = torch.zeros(0, dtype=torch.long)  # [B] the newest token of each row, not yet fed
        self.positions = torch.zeros(0, dtype=torch.long)  # [B] its position id


class Engine:
    """Decodes :class:`GenerationJob` s in batches on a background thread (see the module docstring).

    Args:
        max_batch_size: rows (choices) decoded together per model at most.
        window_s: how long an idle engine waits for more requests before it starts a batch.
        kept_batches: models whose packed weights are kept while they have no rows (each packed
            copy of a LoRA adapter costs the memory of the model's adapted weights).
        logprobs_mode: raw_logprobs or processed_logprobs (see the module docstring).
    """

    def __init__(self, max_batch_size: int = 32, window_s: float = 0.005, kept_batches: int = 4,
                 logprobs_mode: str = "raw_logprobs"):
        if logprobs_mode not in LOGPROBS_MODES:
            raise ValueError(f"logprobs_mode={logprobs_mode!r} is unknown; use one of {', '.join(LOGPROBS_MODES)}")
        self.max_batch_size, self.window_s, self.kept_batches = max_batch_size, window_s, kept_batches
        self.processed = logprobs_mode == "processed_logprobs"
        self._incoming: queue.Queue = queue.Queue()
        self._waiting: list[GenerationJob] = []
        self._groups: OrderedDict[object, _Group] = OrderedDict()
        self._stopping = False
        self.steps = 0  # decode steps run, and rows decoded by them (rows / steps: the mean batch)
        self.rows_decoded = 0
        self._thread = threading.Thread(target=self._loop, name="palaestra-decode", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------------------------ interface

    def submit(self, job: GenerationJob) -> None:
        """Queue ``job``; its events go to ``job.sink`` from the decode thread."""
        if job.choices > self.max_batch_size:
            raise ValueError(f"a request may ask for at most {self.max_batch_size} choices, got {job.choices}")
        self._incoming.put(job)

    def call(self, fn: Callable[[], _T]) -> _T:
        """Run ``fn()`` on the decode thread between two steps and return its result (or raise its
        exception) here; blocks until done, so call it from a worker thread, not an event loop."""
        if threading.current_thread() is self._thread:
            return fn()
        if self._stopping:
            raise RuntimeError("the engine is shut down")
        future: Future = Future()
        self._incoming.put(_Call(fn, future))
        while True:  # a call queued just as the engine shut down is never run: do not wait for it forever
            try:
                return future.result(timeout=1.0)
            except FutureTimeout:
                if not self._thread.is_alive():
                    raise RuntimeError("the engine is shut down") from None

    def forget(self, key, message: str) -> None:
        """Drop the batch of the model ``key`` (its packed weights go) and fail its running and
        waiting requests with a 404 ``message``: for a model that is no longer served."""
        if threading.current_thread() is not self._thread:
            return self.call(lambda: self.forget(key, message))
        self._receive(block=False)  # requests queued before now are waiting ones too
        group = self._groups.pop(key, None)
        failed = Failed(message, 404, "model_not_found")
        for job in {id(row.job): row.job for row in (group.rows if group else [])}.values():
            job.sink(failed)
        for job in [job for job in self._waiting if job.route.key == key]:
            job.sink(failed)
            self._waiting.remove(job)

    def close(self) -> None:
        self._stopping = True
        self._incoming.put(None)
        self._thread.join(timeout=10)

    @property
    def running_rows(self) -> int:
        return sum(len(group.rows) for group in list(self._groups.values()))

    @property
    def waiting_requests(self) -> int:
        return len(self._waiting) + self._incoming.qsize()

    # ------------------------------------------------------------------------------------ the loop

    def _loop(self) -> None:
        while not self._stopping:
            busy = any(group.rows for group in self._groups.values())
            self._receive(block=not busy and not self._waiting)
            if self._stopping:
                break
            self._admit()
            for group in [g for g in self._groups.values() if g.rows]:
                try:
                    self._step(group)
                except Exception:  # noqa: BLE001 - one model's failure must not stop the others
                    log.exception("decoding failed for %s", group.route.key)
                    self._fail(group.rows, "decoding failed; see the server log")
                    group.rows.clear()
                    self._groups.pop(group.route.key, None)
        for job in self._waiting:
            job.sink(Failed("the server is shutting down"))
        while True:  # calls queued meanwhile would wait forever
            try:
                item = self._incoming.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, _Call):
                item.future.set_exception(RuntimeError("the engine is shut down"))

    def _receive(self, block: bool) -> None:
        """Move requests from the queue to the waiting list and run queued calls (on an idle engine:
        wait for one, then for ``window_s`` more so that requests arriving together start together)."""
        if block:
            job = self._incoming.get()
            if job is None:
                return
            if isinstance(job, _Call):
                return self._run(job)  # an idle engine has nothing to start together with it
            self._waiting.append(job)
            deadline = time.monotonic() + self.window_s
            while (left := deadline - time.monotonic()) > 0:
                try:
                    job = self._incoming.get(timeout=left)
                except queue.Empty:
                    break
                if job is None:
                    return
                if isinstance(job, _Call):
                    self._run(job)
                else:
                    self._waiting.append(job)
        while True:
            try:
                job = self._incoming.get_nowait()
            except queue.Empty:
                return
            if isinstance(job, _Call):
                self._run(job)
            elif job is not None:
                self._waiting.append(job)

    @staticmethod
    def _run(call: _Call) -> None:
        if not call.future.set_running_or_notify_cancel():
            return
        try:
            call.future.set_result(call.fn())
        except Exception as error:  # noqa: BLE001 - the caller re-raises it
            call.future.set_exception(error)

    def _admit(self) -> None:
        """Waiting requests join their model's batch, first come first served, in one prefill per model."""
        joining: dict[object, list[GenerationJob]] = {}
        still_waiting = []
        for job in self._waiting:
            if job.cancelled.is_set():
                continue
            try:
                group = self._group(job.route)
            except ModelNotFound:  # unloaded (or replaced under its id) after the request named it
                job.sink(Failed(f"The model {job.route.key!r} was unloaded; GET /v1/models lists the served ones", 404,
                                "model_not_found"))
                continue
            except Exception as error:  # noqa: BLE001 - a model that fails to prepare fails its requests only
                log.exception("could not prepare %s", job.route.key)
                job.sink(Failed(f"could not prepare model {job.route.key}: {str(error).splitlines()[0] if str(error) else type(error).__name__}"))
                continue
            taken = sum(j.choices for j in joining.get(job.route.key, []))
            room = self.max_batch_size - len(group.rows) - taken
            if job.choices <= room and (group.batch.can_join() or taken):
                joining.setdefault(job.route.key, []).append(job)
            else:
                still_waiting.append(job)
        self._waiting = still_waiting
        for key, jobs in joining.items():
            group = self._groups[key]
            try:
                self._join(group, jobs)
            except Exception:  # noqa: BLE001
                log.exception("prefill failed for %s", key)
                for job in jobs:
                    job.sink(Failed("prefill failed; see the server log"))
        self._evict()

    def _group(self, route) -> _Group:
        group = self._groups.get(route.key)
        if group is not None and group.route != route:
            raise ModelNotFound(route.key)  # a request for an adapter since replaced by another of that name
        if group is None:
            group = _Group(route, route.batch())
            self._groups[route.key] = group
        self._groups.move_to_end(route.key)
        return group

    def _evict(self) -> None:
        """The least recently used idle batches give their packed weights back (``kept_batches`` stay)."""
        idle = [key for key, group in self._groups.items() if not group.rows]
        for key in idle[: max(0, len(self._groups) - self.kept_batches)]:
            del self._groups[key]

    @torch.no_grad()
    def _join(self, group: _Group, jobs: list[GenerationJob]) -> None:
        route, batch = group.route, group.batch
        prompts = [ids for job in jobs for ids in job.prompts]
        width = bucket_length(max(len(ids) for ids in prompts))
        pad_id = route.tokenizer.pad_token_id or 0
        ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt) :] = torch.tensor(prompt)
            mask[row, width - len(prompt) :] = 1
        with route.activate():
            prefilled = batch.prefill(ids.to(route.device), mask.to(route.device))
        rows, prompt_of_row, lengths = [], [], []
        prompt = 0
        for job in jobs:
            for index in range(job.choices):
                rows.append(_Row(job, index, route.tokenizer, route.stop_ids, route.device))
                prompt_of_row.append(prompt + index // job.n)
                lengths.append(len(job.prompts[index // job.n]))
            prompt += len(job.prompts)
        select = torch.tensor(prompt_of_row, device=route.device)
        tokens, logprobs = _sample(prefilled.logits.index_select(0, select), rows, self.processed)
        going = [i for i, row in enumerate(rows) if not row.take(int(tokens[i]), logprobs[i])]
        if not going:
            return
        batch.join(prefilled, select[going])
        group.rows += [rows[i] for i in going]
        group.tokens = torch.cat([group.tokens, tokens[going].to(group.tokens.device)])
        group.positions = torch.cat([group.positions, torch.tensor([lengths[i] for i in going])])

    @torch.no_grad()
    def _step(self, group: _Group) -> None:
        """One token for every row of ``group``; finished and cancelled rows leave."""
        keep = [i for i, row in enumerate(group.rows) if not row.job.cancelled.is_set()]
        if len(keep) < len(group.rows):
            self._keep(group, keep)
            if not group.rows:
                return
        route = group.route
        with route.activate():
            logits = group.batch.step(group.tokens.to(route.device), group.positions.to(route.device))
        group.positions += 1
        self.steps += 1
        self.rows_decoded += len(group.rows)
        tokens, logprobs = _sample(logits, group.rows, self.processed)
        group.tokens = tokens
        keep = [i for i, row in enumerate(group.rows) if not row.take(int(tokens[i]), logprobs[i])]
        if len(keep) < len(group.rows):
            self._keep(group, keep)

    def _keep(self, group: _Group, keep: list[int]) -> None:
        index = torch.tensor(keep, dtype=torch.long)
        group.batch.keep(index.to(group.route.device))
        group.rows = [group.rows[i] for i in keep]
        group.tokens, group.positions = group.tokens[index], group.positions[index]

    @staticmethod
    def _fail(rows: list[_Row], message: str) -> None:
        for job in {id(row.job): row.job for row in rows}.values():
            job.sink(Failed(message))


def _sample(logits: torch.Tensor, rows: list[_Row], processed: bool = False) -> tuple[torch.Tensor, list[TokenLogprob | None]]:
    """The next token of each row [B] (CPU) and, for rows that asked, its log-probabilities.

    Temperature 0 is greedy. Otherwise the rollouts' sampler (what
    :func:`~palaestra.rollout.decode.sample_next` does: :func:`filtered_logits`, i.e. logits /
    temperature, then top-k and top-p, and one :func:`draw`) on the row alone, with the row's
    settings and its own generator. ``processed``: log-probabilities of those filtered scores
    (the distribution drawn from), else of the logits themselves.
    """
    logits = logits.float()
    chosen = logits.argmax(dim=-1)
    drawn_from: dict[int, torch.Tensor] = {}  # row -> the scores [1, V] it was sampled from
    for i, row in enumerate(rows):
        sampling = row.job.sampling
        if sampling.temperature <= 0:
            continue
        scores = filtered_logits(logits[i : i + 1], sampling.temperature, sampling.top_k, sampling.top_p)
        chosen[i] = draw(scores.softmax(dim=-1), row.generator)[0]
        if processed:
            drawn_from[i] = scores
    chosen = chosen.cpu()
    wanted = [i for i, row in enumerate(rows) if row.job.sampling.logprobs]
    logprobs: list[TokenLogprob | None] = [None] * len(rows)
    if wanted:
        table = torch.log_softmax(torch.cat([drawn_from.get(i, logits[i : i + 1]) for i in wanted]), dim=-1).cpu()
        tokenizer = rows[0].tokenizer
        for slot, i in enumerate(wanted):
            k = rows[i].job.sampling.top_logprobs
            top = []
            if k:
                values, ids = torch.topk(table[slot], k)
                top = [(tokenizer.decode([int(t)]), max(float(v), _FLOOR)) for v, t in zip(values, ids)]
            token = int(chosen[i])
            logprobs[i] = TokenLogprob(tokenizer.decode([token]), max(float(table[slot, token]), _FLOOR), top)
    return chosen, logprobs
