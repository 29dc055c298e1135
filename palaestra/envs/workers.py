"""Environments stepped in parallel, in worker processes, where a crash or a hang costs one episode.

A rollout hands every answer of a (turn, agent) to :func:`step_in_process` or an :class:`EnvWorkerPool` at
once, as ``(environment, agent, answer)`` items; each comes back as ``(environment after the step, its
StepResult)``.

* ``env.workers=0``: in the trainer's process, one after the other (an environment that raises costs its
  episode; one that hangs cannot be stopped there);
* ``env.workers=N``: in a pool of N worker processes (pebble's ``ProcessPool``): the environment is sent to a
  worker, stepped there, and sent back with its new state, so the answers of a turn step side by side. A step
  that takes longer than ``env.step_timeout_s`` has its worker killed (and replaced), a worker that dies (a
  segfault, ``os._exit``, the memory killer) is replaced, and an environment that raises is reported: each
  costs its episode only (:class:`LostEpisode`: over, unsolved, zero rewards for that answer, which AT-GRPO does
  not train on), never the run.

* ``env.backend=ray``: Ray tasks instead of local processes (``pip install -e ".[ray]"``), on the Ray cluster
  that ``RAY_ADDRESS`` names, or a local Ray when none does; at most ``env.workers`` steps run at once, and the
  same failures cost the same episodes (a step past its timeout, counted from when it was sent, its worker's
  start included, is cancelled and its worker killed).

Workers start by ``forkserver`` (not a fork of the trainer, whose threads and model they need not inherit), so
an environment class must be importable by its module name, as ``env.name=package.module:Class`` is (on every
node, with Ray).
"""

from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Callable
from concurrent.futures import TimeoutError as FutureTimeout

from palaestra.envs.base import MultiAgentEnv, StepResult

__all__ = ["ENV_BACKENDS", "EnvWorkerPool", "LostEpisode", "RayEnvWorkers", "StepFn", "env_workers", "step_in_process"]

ENV_BACKENDS = ("processes", "ray")

# [(environment, agent, answer)] -> [(environment after the step, StepResult)], in order
StepFn = Callable[[list[tuple[MultiAgentEnv, str, str]]], list[tuple[MultiAgentEnv, StepResult]]]


class LostEpisode(MultiAgentEnv):
    """What is left of an episode whose environment crashed, raised or hung: over and unsolved."""

    def __init__(self, env: MultiAgentEnv, reason: str):
        self.turn_order, self.max_turns, self.reason = env.turn_order, env.max_turns, reason

    def reset(self, seed: int) -> None:
        raise RuntimeError(f"a lost episode cannot be reset ({self.reason})")

    def observation(self, agent: str) -> list[dict]:
        return []

    def step(self, agent: str, action: str) -> StepResult:
        return _lost_result(self.reason)

    @property
    def success(self) -> bool:
        return False

    @property
    def done(self) -> bool:
        return True


def _lost_result(reason: str) -> StepResult:
    return StepResult(local_reward=0.0, team_reward=0.0, done=True, info={"error": reason, "lost": True})


def lost(env: MultiAgentEnv, reason: str) -> tuple[MultiAgentEnv, StepResult]:
    """The item an environment that failed on this step comes back as."""
    return LostEpisode(env, reason), _lost_result(reason)


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def _step(env: MultiAgentEnv, agent: str, action: str) -> tuple[MultiAgentEnv, StepResult]:
    """One step, returning the environment with it (run in a worker: the caller gets the new state back)."""
    return env, env.step(agent, action)


def step_in_process(items: list[tuple[MultiAgentEnv, str, str]]) -> list[tuple[MultiAgentEnv, StepResult]]:
    """Every item stepped here, in order; an environment that raises loses its episode."""
    out = []
    for env, agent, action in items:
        try:
            out.append(_step(env, agent, action))
        except Exception as error:  # noqa: BLE001 - a broken environment costs its episode, not the run
            out.append(lost(env, f"the environment raised {_one_line(error)}"))
    return out


class EnvWorkerPool:
    """``workers`` processes that step environments side by side, each step within ``step_timeout_s``.

    Call it like :func:`step_in_process`. ``lost`` counts the steps that cost their episode so far.
    """

    def __init__(self, workers: int, step_timeout_s: float = 60.0):
        from pebble import ProcessPool

        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.step_timeout_s = step_timeout_s
        self.pool = ProcessPool(max_workers=workers, context=multiprocessing.get_context("forkserver"))
        self.lost = 0

    def __call__(self, items: list[tuple[MultiAgentEnv, str, str]]) -> list[tuple[MultiAgentEnv, StepResult]]:
        from pebble import ProcessExpired

        futures = [self.pool.schedule(_step, args=item, timeout=self.step_timeout_s) for item in items]
        out = []
        for (env, _, _), future in zip(items, futures):
            try:
                out.append(future.result())
                continue
            except FutureTimeout:
                reason = f"the step took more than env.step_timeout_s={self.step_timeout_s:g} s"
            except ProcessExpired as error:
                reason = f"the environment's process died (exit code {error.exitcode})"
            except Exception as error:  # noqa: BLE001 - raised by the environment (or unpicklable): its episode
                reason = f"the environment raised {_one_line(error)}"
            self.lost += 1
            out.append(lost(env, reason))
        return out

    def close(self) -> None:
        self.pool.stop()
        self.pool.join(timeout=10)

    def __enter__(self) -> "EnvWorkerPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class RayEnvWorkers:
    """Ray tasks that step environments, at most ``workers`` at once, each within ``step_timeout_s``: on the cluster
    ``RAY_ADDRESS`` names, else a local Ray. Called like :func:`step_in_process`; ``lost`` as :class:`EnvWorkerPool`'s."""

    def __init__(self, workers: int, step_timeout_s: float = 60.0):
        import ray

        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if not ray.is_initialized():
            ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False, log_to_driver=False,
                     configure_logging=False)
        self.ray, self.workers, self.step_timeout_s = ray, workers, step_timeout_s
        self._step = ray.remote(num_cpus=1, max_retries=0)(_step)
        self.lost = 0

    def __call__(self, items: list[tuple[MultiAgentEnv, str, str]]) -> list[tuple[MultiAgentEnv, StepResult]]:
        ray = self.ray
        out: list = [None] * len(items)
        waiting = list(range(len(items)))
        running: dict = {}  # object ref -> (item index, when it was sent)
        while waiting or running:
            while waiting and len(running) < self.workers:
                index = waiting.pop(0)
                running[self._step.remote(*items[index])] = (index, time.monotonic())
            done, _ = ray.wait(list(running), num_returns=1, timeout=0.2)
            for ref in done:
                index, _ = running.pop(ref)
                try:
                    out[index] = ray.get(ref)
                except ray.exceptions.WorkerCrashedError:
                    out[index] = self._lost(items[index][0], "the environment's process died")
                except ray.exceptions.RayTaskError as error:  # raised inside the environment
                    cause = error.cause if getattr(error, "cause", None) is not None else error
                    out[index] = self._lost(items[index][0], f"the environment raised {_one_line(cause)}")
                except ray.exceptions.RayError as error:
                    out[index] = self._lost(items[index][0], f"the environment's task failed ({_one_line(error)})")
            now = time.monotonic()
            for ref, (index, sent) in list(running.items()):
                if now - sent > self.step_timeout_s:
                    ray.cancel(ref, force=True)  # kills the worker stuck in the step
                    del running[ref]
                    out[index] = self._lost(items[index][0], f"the step took more than env.step_timeout_s={self.step_timeout_s:g} s")
        return out

    def _lost(self, env: MultiAgentEnv, reason: str) -> tuple[MultiAgentEnv, StepResult]:
        self.lost += 1
        return lost(env, reason)

    def close(self) -> None:
        pass  # the Ray runtime is the process's (or the cluster's): left to it

    def __enter__(self) -> "RayEnvWorkers":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def env_workers(backend: str, workers: int, step_timeout_s: float):
    """The stepper of ``env.backend`` / ``env.workers``: :func:`step_in_process` for 0 workers, else a pool."""
    if not workers:
        return step_in_process
    if backend == "ray":
        return RayEnvWorkers(workers, step_timeout_s)
    return EnvWorkerPool(workers, step_timeout_s)
