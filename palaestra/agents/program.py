"""Any agent program, trained through palaestra's own endpoint: ``agent.program=my_pkg.agent:run``.

``run(example, client)`` is ordinary code: it gets the task's :class:`~palaestra.tasks.base.Example` and an
``openai.OpenAI`` client whose ``base_url`` is this episode's endpoint, talks to it however it likes (the OpenAI
SDK, LangChain's ``ChatOpenAI(base_url=str(client.base_url), api_key=client.api_key, model="policy")``, a
LangGraph graph of such calls), and returns its reward (a number) or its answer (a string, scored by
``task.rewards``).

The endpoint (:class:`RecordingEndpoint`) is an OpenAI-compatible chat completions route served from the
policy being trained, one base URL per episode (``http://127.0.0.1:PORT/episodes/<id>/v1``). Its requests are
queued; the trainer's thread (:meth:`ProgramAgent.run_episodes`) samples every pending request of every episode
in one batch, records each call's prompt ids and sampled ids under its episode, and answers. During training the
policy samples at the algorithm's settings (temperature, top_p, top_k, algo.max_completion_length as the most
tokens), whatever the request asks, so that the update is on-policy; a request's ``stop`` strings are honoured.

Each recorded call becomes a row of the training batch, trained with its episode's group advantage. An episode
whose program raises, returns nothing usable, overruns ``agent.program_timeout_s`` or never calls the endpoint
gets reward 0 and is counted (``program/failed_share``, ``program/no_call_share``); the run goes on.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from palaestra.agents.episodes import Episode, episode_rollout
from palaestra.rollout.decode import StopStrings
from palaestra.rollout.hf import Rollout, SamplingParams
from palaestra.serving.protocol import ApiError, ChatCompletionRequest, error_body

__all__ = ["ProgramAgent", "ProgramBatch", "RecordingEndpoint", "evaluate_program", "program_rewards"]

log = logging.getLogger("palaestra")

MODEL_NAME = "policy"
"""The model name the endpoint lists (any name is accepted)."""


@dataclass
class _Call:
    """One request waiting for the trainer's thread."""

    episode: str
    prompt_ids: list[int]
    stops: tuple[str, ...]
    answer: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)


@dataclass
class ProgramEpisode:
    """One run of the program: its calls (prompt ids, sampled ids) and what it returned."""

    id: str
    example: object
    calls: list[tuple[list[int], list[int], str]] = field(default_factory=list)
    """(prompt ids, sampled ids, how the turn ended) per endpoint call, in order."""
    value: object = None
    failure: str | None = None
    """Why the episode gets no reward of its own: the program's exception, a timeout, a bad return value."""


@dataclass
class ProgramBatch:
    """A step's program episodes as training rows: one row per endpoint call."""

    rollout: Rollout
    """The calls, each prompt and its sampled tokens (rows in episode order)."""
    row_episode: torch.Tensor
    """[R] the episode of each row."""
    answers: list[str]
    """Per episode: the answer the program returned ("" when it returned a reward or failed)."""
    rewards: list[float | None]
    """Per episode: the reward the program returned, 0.0 for a failed episode, None when it returned an answer."""
    episodes: list[ProgramEpisode]


class RecordingEndpoint:
    """The OpenAI-compatible chat route of the episodes, on a thread; requests wait in ``pending`` for the trainer."""

    def __init__(self, tokenizer, max_calls: int, host: str = "127.0.0.1"):
        from palaestra.serving.server import BackgroundServer

        self.tokenizer, self.max_calls = tokenizer, max_calls
        self.pending: queue.Queue[_Call] = queue.Queue()
        self.open: dict[str, int] = {}  # episode id -> calls so far
        self.lock = threading.Lock()
        self.server = BackgroundServer(self._app(), host=host).start()

    def base_url(self, episode: str) -> str:
        return f"{self.server.url}/episodes/{episode}/v1"

    def close(self) -> None:
        self.server.stop()

    def _app(self):
        app = FastAPI(title="palaestra agent endpoint")

        @app.exception_handler(ApiError)
        async def api_error(_: Request, error: ApiError):
            return JSONResponse(error.body(), status_code=error.status)

        @app.exception_handler(RequestValidationError)
        async def invalid(_: Request, error: RequestValidationError):
            first = error.errors()[0]
            where = ".".join(str(p) for p in first.get("loc", ())[1:])
            return JSONResponse(error_body(f"{where}: {first.get('msg')}", param=where or None), status_code=400)

        @app.get("/health")
        async def health():
            return {"status": "ok"}

        @app.get("/episodes/{episode}/v1/models")
        async def models(episode: str):
            return {"object": "list", "data": [{"id": MODEL_NAME, "object": "model", "created": 0, "owned_by": "palaestra"}]}

        @app.post("/episodes/{episode}/v1/chat/completions")
        async def chat(episode: str, body: ChatCompletionRequest):
            if body.stream:
                raise ApiError(400, "stream=true is not supported by the training endpoint; leave it out", param="stream")
            if (body.n or 1) > 1:
                raise ApiError(400, "n > 1 is not supported by the training endpoint; make one request per answer", param="n")
            if body.tools:
                raise ApiError(400, "tools are not supported by the training endpoint; describe them in the messages",
                               param="tools")
            prompt = body.prompt_ids(self.tokenizer)
            call = _Call(episode, prompt, tuple(body.stops))
            with self.lock:  # queued under the lock: an episode that ends drains every call it has queued
                if episode not in self.open:
                    raise ApiError(404, f"episode {episode} is not running (finished or timed out)", code="episode_closed")
                if self.open[episode] >= self.max_calls:
                    raise ApiError(429, f"this episode made its agent.program_max_calls={self.max_calls} calls",
                                   code="call_limit")
                self.open[episode] += 1
                self.pending.put(call)
            text, reason, completion = await asyncio.wrap_future(call.answer)
            return {"id": f"chatcmpl-{uuid.uuid4().hex[:12]}", "object": "chat.completion", "created": int(time.time()),
                    "model": body.model, "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                                      "finish_reason": reason, "logprobs": None}],
                    "usage": {"prompt_tokens": len(prompt), "completion_tokens": completion,
                              "total_tokens": len(prompt) + completion}}

        return app


class ProgramAgent:
    """Runs ``program(example, client)`` for each episode and serves its calls from the policy (see the module docstring).

    Args:
        generator: an :class:`~palaestra.rollout.hf.HFGenerator` of the policy.
        program: the user's function.
        max_calls: the most endpoint calls one episode may make (agent.program_max_calls).
        timeout_s: the longest a batch of episodes may run (agent.program_timeout_s; they all run at once with
            ``workers=0``).
        workers: episodes run at once (threads); 0: all of a batch at once.
    """

    gather_s = 0.05
    """After a first request, how long the trainer waits for the other running episodes' requests to batch them."""

    def __init__(self, generator, program, *, max_calls: int = 8, timeout_s: float = 120.0, workers: int = 0):
        self.generator, self.program, self.timeout_s, self.workers = generator, program, timeout_s, workers
        self.endpoint = RecordingEndpoint(generator.tokenizer, max_calls)
        self._stops: dict[tuple[str, ...], StopStrings] = {}
        self._current: list[ProgramEpisode] = []
        self._totals = {"episodes": 0, "calls": 0, "failed": 0, "no_call": 0}

    def __getattr__(self, name):  # sync_adapter, reusing_weights, tokenizer, ... are the engine's
        return getattr(self.generator, name)

    def close(self) -> None:
        self.endpoint.close()

    @torch.no_grad()
    def run_episodes(self, examples: list, num_samples: int, sampling: SamplingParams) -> ProgramBatch:
        """``num_samples`` episodes per example (grouped example by example), their calls sampled in batches."""
        episodes = [ProgramEpisode(uuid.uuid4().hex[:16], example) for example in examples for _ in range(num_samples)]
        with self.endpoint.lock:
            self.endpoint.open.update({e.id: 0 for e in episodes})
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=self.workers or len(episodes),
                                                     thread_name_prefix="agent-program")
        self._current = episodes
        running = {pool.submit(self._run_one, episode): episode for episode in episodes}
        deadline = time.monotonic() + self.timeout_s
        try:
            while any(not future.done() for future in running) and time.monotonic() < deadline:
                calls = self._take(wait_s=0.02)
                gather_until = time.monotonic() + self.gather_s
                # one batch for every episode that is waiting: the others are still computing (or are about to call)
                while calls and len(calls) < sum(not f.done() for f in running) and time.monotonic() < gather_until:
                    calls += self._take(wait_s=0.002)
                if calls:
                    self._answer(calls, sampling)
        finally:
            with self.endpoint.lock:  # a later call is refused (a 404): the program stops soon
                for episode in episodes:
                    self.endpoint.open.pop(episode.id, None)
                for call in self._take(wait_s=0):
                    call.answer.set_exception(ApiError(410, "the episode is over (agent.program_timeout_s)",
                                                       code="episode_closed"))
            pool.shutdown(wait=False, cancel_futures=True)
        for future, episode in running.items():
            if not future.done():
                episode.failure = f"timed out after agent.program_timeout_s={self.timeout_s:g}"
        return self._batch(episodes)

    def _run_one(self, episode: ProgramEpisode) -> None:
        import openai

        client = openai.OpenAI(base_url=self.endpoint.base_url(episode.id), api_key="palaestra", max_retries=0,
                               timeout=self.timeout_s)
        try:
            value = self.program(episode.example, client)
        except Exception as error:  # the program's failure costs its episode, not the run
            episode.failure = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:300]
            return
        finally:
            client.close()
        if isinstance(value, bool) or not isinstance(value, (int, float, str)) or (
                not isinstance(value, str) and not math.isfinite(value)):
            episode.failure = f"the program returned {type(value).__name__}, not a reward (a number) or an answer (a str)"
        else:
            episode.value = value

    def _take(self, wait_s: float) -> list[_Call]:
        """Every pending call (waiting up to ``wait_s`` for the first)."""
        calls = []
        try:
            calls.append(self.endpoint.pending.get(timeout=wait_s) if wait_s else self.endpoint.pending.get_nowait())
            while True:
                calls.append(self.endpoint.pending.get_nowait())
        except queue.Empty:
            return calls

    def _answer(self, calls: list[_Call], sampling: SamplingParams) -> None:
        """Sample every call (one batch per set of stop strings), record it under its episode, answer it."""
        by_episode = {episode.id: episode for episode in self._current}
        for stops in sorted({call.stops for call in calls}):
            group = [call for call in calls if call.stops == stops]
            stop_strings = self._stop_strings(stops)
            try:
                turns = self.generator.generate_ids([c.prompt_ids for c in group], 1, sampling, stop_strings)
            except Exception as error:  # noqa: BLE001 - the requests get the error; the trainer re-raises it
                for call in group:
                    call.answer.set_exception(ApiError(500, f"sampling failed: {type(error).__name__}", type="server_error"))
                raise
            for call, (ids, end) in zip(group, turns):
                content = ids[:-1] if end == "stop" else ids
                text = self.generator.tokenizer.decode(content, skip_special_tokens=True)
                for stop in stops:  # OpenAI's convention: the stop string is not part of the answer
                    if stop in text:
                        text = text[: text.index(stop)]
                if call.episode in by_episode:
                    by_episode[call.episode].calls.append((call.prompt_ids, ids, end))
                call.answer.set_result((text, "length" if end == "length" else "stop", len(ids)))

    def _stop_strings(self, stops: tuple[str, ...]) -> StopStrings | None:
        if not stops:
            return None
        if stops not in self._stops:
            self._stops[stops] = StopStrings(self.generator.tokenizer, list(stops))
        return self._stops[stops]

    def _batch(self, episodes: list[ProgramEpisode]) -> ProgramBatch:
        rows, row_episode = [], []
        for index, episode in enumerate(episodes):
            for prompt_ids, ids, end in episode.calls:
                rows.append(Episode(prompt_ids, ids=list(ids), sampled=[1] * len(ids), answer_ids=ids, end=end))
                row_episode.append(index)
        for episode in episodes:
            if episode.failure is None and not episode.calls:
                episode.failure = "the program never called the endpoint"
        self._totals["episodes"] += len(episodes)
        self._totals["calls"] += len(rows)
        self._totals["failed"] += sum(e.failure is not None and bool(e.calls) for e in episodes)
        self._totals["no_call"] += sum(not e.calls for e in episodes)
        failures = [e.failure for e in episodes if e.failure]
        if failures:
            log.info("%d of %d program episodes get reward 0, e.g. %s", len(failures), len(episodes), failures[0])
        if not rows:  # no call at all: one empty row keeps the batch's shape; it trains nothing (reward 0, no tokens)
            rows, row_episode = [Episode([self.generator.tokenizer.pad_token_id], end="length")], [0]
        rollout = episode_rollout(rows, pad_id=self.generator.tokenizer.pad_token_id,
                                  decode=lambda ids: self.generator.tokenizer.decode(ids, skip_special_tokens=True))
        answers = [e.value if isinstance(e.value, str) and e.failure is None else "" for e in episodes]
        rewards = [None if isinstance(e.value, str) and e.failure is None else
                   (float(e.value) if e.failure is None else 0.0) for e in episodes]
        return ProgramBatch(rollout, torch.tensor(row_episode, dtype=torch.long), answers, rewards, episodes)

    def figures(self) -> dict[str, float]:
        """Program episodes since the last call: calls per episode, the share that failed, the share with no call."""
        totals, self._totals = self._totals, {"episodes": 0, "calls": 0, "failed": 0, "no_call": 0}
        if not totals["episodes"]:
            return {}
        return {"program/calls_per_episode": totals["calls"] / totals["episodes"],
                "program/failed_share": totals["failed"] / totals["episodes"],
                "program/no_call_share": totals["no_call"] / totals["episodes"]}


def program_rewards(batch: ProgramBatch, columns: dict, weights: dict[str, float]) -> tuple[torch.Tensor, dict[str, list[float]]]:
    """Each episode's reward: the program's own, or its answer scored by the task's rewards (0 for a failed episode);
    with the components (``program``: the programs' own rewards, 0 where they answered)."""
    from palaestra.rewards import combine_rewards

    scored, components = combine_rewards(batch.answers, columns, weights)
    rewards = [float(given) if given is not None else float(score) for given, score in zip(batch.rewards, scored)]
    if any(given is not None for given in batch.rewards):
        components["program"] = [float(given or 0.0) for given in batch.rewards]
    return torch.tensor(rewards, dtype=torch.float32), components


def evaluate_program(agent: ProgramAgent, task, examples: list, *, reward_weights: dict[str, float],
                     sampling: SamplingParams, batch_size: int = 64, seed: int = 1234):
    """The program on each held-out example once: accuracy is the share of correct answers (the task's verifier) or,
    for a program that returns its reward, of full-credit episodes (reward >= 1); mean reward as in training; format
    accuracy: the share of episodes that called the endpoint."""
    from palaestra.evaluation.evaluate import EvalResult

    correct_total, rewards_total, samples = 0, 0.0, []
    with torch.random.fork_rng(devices=[]), agent.reusing_weights():
        torch.manual_seed(seed)
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            batch = agent.run_episodes(chunk, 1, sampling)
            rewards, _ = program_rewards(batch, task.columns(chunk), reward_weights)
            for example, episode, answer, given, reward in zip(chunk, batch.episodes, batch.answers, batch.rewards, rewards.tolist()):
                correct = reward >= 1.0 if given is not None else task.is_correct(answer, example)
                correct_total += int(correct)
                rewards_total += reward
                samples.append({"question": example.question, "answer": example.answer, "completion": answer,
                                "correct": bool(correct), "reward": reward, "calls": len(episode.calls),
                                "failure": episode.failure or ""})
    total = max(1, len(examples))
    return EvalResult(accuracy=correct_total / total, format_accuracy=sum(bool(s["calls"]) for s in samples) / total,
                      mean_reward=rewards_total / total, pass_at_k={1: correct_total / total}, num_examples=len(examples),
                      samples=samples)
