"""The batching scheduler: concurrent requests are decoded together, each with its own sampling settings.

One background thread owns the models. Its loop, top to bottom:

1. **admit**: requests waiting in the queue join the running batch of their model (one prefill
   forward for all that arrive together; on an idle server it first waits ``window_s`` for more).
   A request whose model's batch is full, or cannot take rows mid-flight, waits for the next turn;
2. **step**: each model with rows decodes one token for all of them (models take turns, so a
   long request on one adapter does not stop the others);
3. **hand out**: every new token goes through its row (stop tokens, stop strings, token budget) and
   the text it adds is sent to the request's ``sink`` as a :class:`Delta`; a finished or cancelled
   row leaves the batch at once.

Sampling is per row: temperature (0 is greedy), top-p and a generator of its own (seeded by the
request's ``seed``, so a seeded request draws the same tokens whatever else is in the batch).
Log-probabilities are those of the model's distribution (before temperature and top-p), as
OpenAI's API reports them.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

import torch

from palaestra.models.shapes import bucket_length
from palaestra.rollout.decode import sample_next

__all__ = ["Delta", "Engine", "Failed", "Finished", "GenerationJob", "Sampling", "TokenLogprob"]

log = logging.getLogger(__name__)


@dataclass
class Sampling:
    """How to decode one request's choices."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
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
    """Choice ``index`` is done: ``reason`` is stop (stop token or string) or length (token budget)."""

    index: int
    reason: str
    completion_tokens: int


@dataclass
class Failed:
    """The request could not be decoded; the message is one line, safe to show a client."""

    message: str


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
        self.ids: list[int] = []
        self.count = 0  # tokens sampled, the stop token included
        self.sent = 0  # characters of the text already sent
        self.pending: list[TokenLogprob] = []  # log-probabilities of tokens whose text is not sent yet
        self.longest_stop = max((len(s) for s in sampling.stop), default=0)

    def take(self, token: int, logprob: TokenLogprob | None) -> bool:
        """Account for one sampled token; True when the row is finished."""
        self.count += 1
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
        self.job.sink(Finished(self.index, reason, self.count))
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
    """

    def __init__(self, max_batch_size: int = 32, window_s: float = 0.005, kept_batches: int = 4):
        self.max_batch_size, self.window_s, self.kept_batches = max_batch_size, window_s, kept_batches
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

    def _receive(self, block: bool) -> None:
        """Move requests from the queue to the waiting list (on an idle engine: wait for one, then
        for ``window_s`` more so that requests arriving together start together)."""
        if block:
            job = self._incoming.get()
            if job is None:
                return
            self._waiting.append(job)
            deadline = time.monotonic() + self.window_s
            while (left := deadline - time.monotonic()) > 0:
                try:
                    job = self._incoming.get(timeout=left)
                except queue.Empty:
                    break
                if job is None:
                    return
                self._waiting.append(job)
        while True:
            try:
                job = self._incoming.get_nowait()
            except queue.Empty:
                return
            if job is not None:
                self._waiting.append(job)

    def _admit(self) -> None:
        """Waiting requests join their model's batch, first come first served, in one prefill per model."""
        joining: dict[object, list[GenerationJob]] = {}
        still_waiting = []
        for job in self._waiting:
            if job.cancelled.is_set():
                continue
            try:
                group = self._group(job.route)
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
        tokens, logprobs = _sample(prefilled.logits.index_select(0, select), rows)
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
        tokens, logprobs = _sample(logits, group.rows)
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


def _sample(logits: torch.Tensor, rows: list[_Row]) -> tuple[torch.Tensor, list[TokenLogprob | None]]:
    """The next token of each row [B] (CPU) and, for rows that asked, its log-probabilities.

    Temperature 0 is greedy. Otherwise the rollouts' sampler (:func:`~palaestra.rollout.decode.sample_next`:
    logits / temperature, then top-p) on the row alone, with the row's settings and its own generator.
    """
    logits = logits.float()
    chosen = logits.argmax(dim=-1)
    for i, row in enumerate(rows):
        sampling = row.job.sampling
        if sampling.temperature <= 0:
            continue
        chosen[i] = sample_next(logits[i : i + 1], sampling.temperature, 0, sampling.top_p, greedy=False,
                                generator=row.generator)[0]
    chosen = chosen.cpu()
    wanted = [i for i, row in enumerate(rows) if row.job.sampling.logprobs]
    logprobs: list[TokenLogprob | None] = [None] * len(rows)
    if wanted:
        table = torch.log_softmax(logits[wanted], dim=-1).cpu()
        tokenizer = rows[0].tokenizer
        for slot, i in enumerate(wanted):
            k = rows[i].job.sampling.top_logprobs
            top = []
            if k:
                values, ids = torch.topk(table[slot], k)
                top = [(tokenizer.decode([int(t)]), float(v)) for v, t in zip(values, ids)]
            token = int(chosen[i])
            logprobs[i] = TokenLogprob(tokenizer.decode([token]), float(table[slot, token]), top)
    return chosen, logprobs
