"""The real ``palaestra`` command for tests, started warm: one process per test worker imports what the
command imports (torch, transformers, peft, MLflow, Hydra, reasoning-gym and every palaestra module) once,
then forks a child per command.

Each child is the command as ``python -m palaestra.cli ARGS`` runs it: a process of its own (whatever it
changes dies with it), in the test's working directory and environment, its stdout and stderr written to
files, its exit status the command's. It ends as the interpreter ends a process (its threads joined, atexit
handlers run, stdout and stderr flushed), less the teardown of every module. Only the imports are shared.
Nothing runs on torch before the fork, so the child starts its thread pools as a fresh process does; the
libraries that start a thread at import (OpenBLAS, jemalloc) restart it in a forked child themselves, as
they do for every forked DataLoader worker.

A command costs its own work instead of its work plus some 10 s of imports: the suite's CLI tests run many
short commands (:func:`tests.conftest.run_cli`). Protocol, one JSON line each way: the test sends
``{"args", "cwd", "env", "stdout", "stderr", "processes", "port", "probe"}``; the warm command answers
``{"pids": [...]}`` when the processes have started and ``{"status": S}`` (``os.waitpid``'s) when they have
ended. Several processes are started as torchrun starts them (its environment: rank, world size, a local
rendezvous on ``port``), their outputs interleaved in the same two files. ``probe``: the command runs under
:mod:`tests.recipes.cli_probe`, which records the models it built.

    python -m tests.warm_command     # reads requests on stdin, answers on stdout
"""

from __future__ import annotations

import atexit
import importlib
import json
import os
import pkgutil
import signal
import sys
import threading
import time


def _preload() -> None:
    """Import every palaestra module and the model classes the tests build (a module that cannot be
    imported here is left to the command, which reports it as it would)."""
    import palaestra

    for module in pkgutil.walk_packages(palaestra.__path__, "palaestra."):
        try:
            importlib.import_module(module.name)
        except Exception:  # noqa: BLE001 - an optional extra that is not installed: the command imports it itself
            pass
    for name in ("transformers.models.llama.modeling_llama", "transformers.models.qwen2.modeling_qwen2",
                 "transformers.models.bert.modeling_bert", "transformers.models.mamba.modeling_mamba"):
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001
            pass


def _child(request: dict, answers: int, rank: int) -> None:
    """Become the command (process ``rank`` of ``processes``): its directory, environment, stdio and argv;
    then run it to the interpreter's exit."""
    os.close(answers)
    os.chdir(request["cwd"])
    os.environ.clear()  # in place: what holds a reference to os.environ sees the command's environment
    os.environ.update(request["env"])
    if request["processes"] > 1:  # what torchrun tells each process it starts
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), GROUP_RANK="0", WORLD_SIZE=str(request["processes"]),
                          LOCAL_WORLD_SIZE=str(request["processes"]), MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(request["port"]))
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():  # OpenMP read the variable when torch loaded, in the warm command
        import torch

        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, request["stdout"], os.O_WRONLY | os.O_APPEND),
                            (2, request["stderr"], os.O_WRONLY | os.O_APPEND)):
        opened = os.open(path, flags)
        os.dup2(opened, fd)
        os.close(opened)
    sys.stdin = open(os.devnull)  # noqa: SIM115 - the process's stdin for its whole life
    if request["probe"]:  # tests.recipes.cli_probe's record of the models built
        from tests.recipes import cli_probe

        cli_probe.watch_models()
        atexit.register(cli_probe.record)
    from palaestra import cli

    sys.argv = [cli.__file__, *request["args"]]
    code = 0
    try:
        cli.main()
    except SystemExit as exit_:
        if exit_.code is None or isinstance(exit_.code, int):
            code = exit_.code or 0
        else:  # the interpreter prints a message given to SystemExit, and exits 1
            print(exit_.code, file=sys.stderr)
            code = 1
    except BaseException:  # noqa: BLE001 - the interpreter's own report of an uncaught exception
        if request["probe"]:
            atexit.unregister(cli_probe.record)  # as the probe does: no record, the traceback says enough
        sys.excepthook(*sys.exc_info())
        code = 1
    _exit(code)


def _exit(code: int) -> None:
    """End as the interpreter does, less the teardown of every module (seconds in a process this size, and
    nothing a command's outputs depend on): wait for the threads that are not daemons, run the atexit
    handlers, flush stdout and stderr."""
    threading._shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def _run(request: dict, answers: int) -> int:
    """Fork the command's processes and wait for them; the wait status of the first that failed (then the
    others are stopped, as torchrun stops them), else 0."""
    for path in (request["stdout"], request["stderr"]):
        open(path, "wb").close()  # every process appends to them
    ranks = set()  # the pids still running
    for rank in range(request["processes"]):
        pid = os.fork()
        if pid == 0:
            _child(request, answers, rank)  # never returns: the child ends in _exit
        ranks.add(pid)
    os.write(answers, (json.dumps({"pids": sorted(ranks)}) + "\n").encode())
    failed, killed_at = 0, None
    while ranks:
        pid, status = os.waitpid(-1, os.WNOHANG) if failed else os.wait()
        if pid == 0:  # stopping the others: SIGTERM first (a step boundary's save), SIGKILL after 10 s
            if time.monotonic() > killed_at:
                for other in ranks:
                    os.kill(other, signal.SIGKILL)
            time.sleep(0.05)
            continue
        if pid not in ranks:
            continue
        ranks.discard(pid)
        if status and not failed:
            failed, killed_at = status, time.monotonic() + 10
            for other in ranks:
                os.kill(other, signal.SIGTERM)
    return failed


def serve() -> None:
    _preload()
    answers = os.dup(1)  # the protocol's channel; fd 1 itself becomes each child's stdout
    sys.stdout.flush()
    sys.stderr.flush()
    while True:
        line = sys.stdin.readline()
        if not line:
            return
        status = _run(json.loads(line), answers)
        os.write(answers, (json.dumps({"status": status}) + "\n").encode())


if __name__ == "__main__":
    serve()
