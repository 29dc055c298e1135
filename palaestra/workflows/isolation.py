"""A policy-written workflow in a process of its own, under a memory limit and a wall-clock limit.

``task.workflow.isolation=process`` (the default): each workflow's code runs in its own process (started
from a ``forkserver`` that has the workflow modules loaded, so a start costs a fork). The process can take
at most ``task.workflow.memory_mb`` more address space than it starts with (``RLIMIT_AS``, virtual memory: the
stacks of the threads its sandboxed programs start count too; past it an allocation fails inside the workflow,
a ``MemoryError``, its runtime error) and is killed at ``task.workflow.timeout_s``;
whatever its code does, the trainer's process is untouched and the rest of the step goes on.

The operators run in the workflow's process too (sandboxed programs start from there), except the executor:
every ``chat`` call is sent over a pipe to the trainer's process, where the :class:`~palaestra.workflows.
executor.Executor` batches it with every other workflow's calls, as in-process workflows' are, and its
budget is kept; the reply (and the run's usage so far) is sent back. The executor waits for isolated
workflows that are still computing before it answers a batch (:attr:`Executor.computing`), so batching is
what it is in process.

Messages, all small tuples: workflow -> trainer ``("chat", id, messages, max_tokens, temperature)`` and at
the end ``("done", answer, cost, error)``; trainer -> workflow ``("reply", id, text, calls, tokens)`` or
``("refused", id, kind, message)`` (the budget, or a backend error).
"""

from __future__ import annotations

import asyncio
import itertools
import multiprocessing
import resource
import sys

from palaestra.workflows.execution import execute, traced_workflow_lines
from palaestra.workflows.executor import BudgetExceeded, ExecutorClient
from palaestra.workflows.operators import Problem

__all__ = ["MAX_ANSWER_CHARS", "run_isolated"]

MAX_ANSWER_CHARS = 1_000_000
"""The longest answer a workflow may return (a longer one is its runtime error, and never crosses the pipe)."""

_context = None


def _forkserver():
    """The multiprocessing context workflow processes start from (its server preloads the workflow modules)."""
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(["palaestra.workflows.isolation"])
    return _context


async def run_isolated(code: str, problem: Problem, client: ExecutorClient, *, timeout_s: float, memory_mb: int,
                       max_lines: int, sandbox_seconds: float) -> tuple[str, float | None, str]:
    """Run validated workflow ``code`` on ``problem`` in its own process; (answer, reported cost, runtime error)
    as :func:`palaestra.workflows.execution.execute` gives them. The executor calls go through ``client``."""
    context = _forkserver()
    ours, theirs = context.Pipe()
    settings = {"timeout_s": timeout_s, "memory_mb": memory_mb, "max_lines": max_lines, "sandbox_seconds": sandbox_seconds,
                "cost_per_million_tokens": client.executor.cost_per_million_tokens}
    process = context.Process(target=_workflow_process, args=(theirs, code, problem, settings), daemon=True)
    executor = client.executor
    loop = asyncio.get_running_loop()
    inbox: asyncio.Queue = asyncio.Queue()
    serving: set[asyncio.Task] = set()
    executor.computing += 1  # until it asks for something or ends
    computing, outstanding = True, 0  # calls it waits on: it computes only while there are none

    def readable() -> None:
        try:
            while ours.poll():
                inbox.put_nowait(ours.recv())
        except (EOFError, OSError):  # the process ended (or died) and its end of the pipe closed
            loop.remove_reader(ours.fileno())
            inbox.put_nowait(("gone",))

    def set_computing(flag: bool) -> None:
        nonlocal computing
        if flag != computing:
            executor.computing += 1 if flag else -1
            computing = flag

    def waits(change: int) -> None:
        nonlocal outstanding
        outstanding += change
        set_computing(outstanding == 0)

    async def serve(call_id: int, messages: list[dict], max_tokens, temperature) -> None:
        waits(+1)  # in the step that puts the call in the executor's batch: a flush sees it computing or its call
        try:
            text = await client.chat(messages, max_tokens=max_tokens, temperature=temperature)
            reply = ("reply", call_id, text, client.calls, client.tokens)
        except BudgetExceeded as refused:
            reply = ("refused", call_id, "budget", str(refused))
        except Exception as error:  # noqa: BLE001 - a failed backend call is the workflow's error to see
            reply = ("refused", call_id, "error", f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")
        waits(-1)
        try:
            ours.send(reply)
        except (BrokenPipeError, OSError):
            pass  # it is gone; the inbox says so

    deadline = loop.time() + timeout_s
    try:
        try:
            process.start()
        except OSError as error:  # no process to be had (too many open files, no memory): this workflow's error
            return "", None, f"could not start the workflow's process ({error.strerror or error})"
        finally:
            theirs.close()
        loop.add_reader(ours.fileno(), readable)
        while True:
            left = deadline - loop.time()
            if left <= 0:
                return "", None, f"timed out after {timeout_s:g} s"
            try:
                message = await asyncio.wait_for(inbox.get(), left)
            except asyncio.TimeoutError:
                return "", None, f"timed out after {timeout_s:g} s"
            if message[0] == "chat":
                task = asyncio.ensure_future(serve(*message[1:]))
                serving.add(task)
                task.add_done_callback(serving.discard)
            elif message[0] == "done":
                return message[1], message[2], message[3]
            else:  # the process ended without an answer: killed by the system, or a crash below Python
                process.join(timeout=1)
                return "", None, f"the workflow's process died (exit code {process.exitcode})"
    finally:
        set_computing(False)
        try:
            loop.remove_reader(ours.fileno())
        except (ValueError, OSError):
            pass
        for task in serving:
            task.cancel()
        if process.is_alive():
            process.kill()
        if process.pid is not None:
            process.join(timeout=5)
        ours.close()


class _PipeClient:
    """The workflow process's executor client: ``chat`` asks the trainer's process over the pipe."""

    def __init__(self, conn, cost_per_million_tokens: float):
        self.conn, self.price = conn, cost_per_million_tokens
        self.calls = self.tokens = 0
        self._ids = itertools.count()
        self._waiting: dict[int, asyncio.Future] = {}

    def listen(self) -> None:
        asyncio.get_running_loop().add_reader(self.conn.fileno(), self._readable)

    def _readable(self) -> None:
        while self.conn.poll():
            kind, call_id, *rest = self.conn.recv()
            future = self._waiting.pop(call_id, None)
            if future is None or future.done():
                continue
            if kind == "reply":
                text, self.calls, self.tokens = rest
                future.set_result(text)
            elif rest[0] == "budget":
                future.set_exception(BudgetExceeded(rest[1]))
            else:
                future.set_exception(RuntimeError(rest[1]))

    async def chat(self, messages: list[dict], *, max_tokens: int | None = None, temperature: float | None = None) -> str:
        call_id = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._waiting[call_id] = future
        self.conn.send(("chat", call_id, [dict(m) for m in messages], max_tokens, temperature))
        return await future

    def usage(self) -> dict:
        """As :meth:`ExecutorClient.usage`: this run's usage so far (the trainer's count, as of the last reply)."""
        return {"total_cost": self.tokens * self.price / 1e6, "total_tokens": self.tokens, "calls": self.calls}


def _limit_memory(extra_mb: int) -> None:
    """At most ``extra_mb`` MB of address space beyond what the process holds now."""
    with open("/proc/self/status") as status:
        size_kb = next(int(line.split()[1]) for line in status if line.startswith("VmSize:"))
    limit = size_kb * 1024 + extra_mb * 2**20
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard))


def _workflow_process(conn, code: str, problem: Problem, settings: dict) -> None:
    """The workflow process: limits, the workflow run with tracing, its outcome sent back."""
    _limit_memory(settings["memory_mb"])
    client = _PipeClient(conn, settings["cost_per_million_tokens"])

    async def main():
        client.listen()
        return await execute(code, problem, client, timeout_s=settings["timeout_s"], max_lines=settings["max_lines"],
                             sandbox_seconds=settings["sandbox_seconds"])

    try:
        with traced_workflow_lines():
            answer, cost, error = asyncio.run(main())
        if len(answer) > MAX_ANSWER_CHARS:
            answer, error = "", f"the answer has {len(answer)} characters; at most {MAX_ANSWER_CHARS} are read"
    except MemoryError:
        answer, cost, error = "", None, f"MemoryError: more than task.workflow.memory_mb={settings['memory_mb']} MB"
    conn.send(("done", answer, cost, error))
    conn.close()
    sys.exit(0)
