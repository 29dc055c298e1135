"""The sandbox: each limit is shown to hold, first with every layer on, then (where this machine has
namespaces) with the audit hook off, to show that the kernel holds on its own."""

from __future__ import annotations

import os
import socket
import tempfile
import time
import tracemalloc

import pytest

from palaestra import sandbox
from palaestra.sandbox import SandboxLimits, SandboxResult, run_many, run_python

@pytest.fixture(scope="module")
def namespaced() -> bool:
    """True where the kernel layer is on: the program is init (pid 1) of its own PID namespace."""
    return run_python("import os; print(os.getpid())").stdout == "1\n"


@pytest.fixture
def kernel_only(namespaced, monkeypatch):
    """Turn the audit hook off; skip where there is no kernel layer to test."""
    if not namespaced:
        pytest.skip("no namespaces here: the audit hook is the only guard")
    monkeypatch.setattr(sandbox, "_AUDIT_HOOK", False)


def _leftovers(work: str) -> list[int]:
    """Pids whose command line names this sandbox's working directory (every process it spawned)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                if work.encode() in handle.read():
                    pids.append(int(entry))
        except OSError:  # it ended while we looked
            pass
    return pids


def test_program_reads_stdin_and_writes_stdout():
    result = run_python("n = int(input())\nprint(sum(range(n)))\nprint('ü', end='')", stdin="5\n")
    assert result == SandboxResult("10\nü", "", 0, False, False, result.duration_s)  # 0+1+2+3+4 = 10
    assert result.ok and result.duration_s < 5


def test_exception_goes_to_stderr_with_nonzero_exit():
    result = run_python("def f():\n    return 1 / 0\nf()")
    assert result.exit_code == 1 and not result.ok
    assert 'File "main.py", line 2, in f' in result.stderr
    assert result.stderr.rstrip().endswith("ZeroDivisionError: division by zero")
    assert "<string>" not in result.stderr  # the sandbox's own frames are not shown
    assert run_python("exit(3)").exit_code == 3
    syntax = run_python("def (:")
    assert syntax.exit_code == 1 and "SyntaxError" in syntax.stderr


def test_program_looks_like_a_script_in_a_fresh_directory(monkeypatch):
    monkeypatch.setenv("PALAESTRA_TEST_SECRET", "hunter2")
    code = ("import os, sys, tempfile\n"
            "print(__name__, sys.argv, os.listdir('.'))\n"
            "print(os.environ.get('PALAESTRA_TEST_SECRET'), os.environ['HOME'] == os.getcwd())\n"
            "open('notes.txt', 'w').write('kept')\n"
            "tempfile.NamedTemporaryFile().write(b'x')\n"
            "print(open('notes.txt').read())")
    result = run_python(code)
    assert result.stdout.splitlines() == ["__main__ ['main.py'] ['main.py']", "None True", "kept"], result.stderr
    assert run_python("import os; print(os.listdir('.'))").stdout == "['main.py']\n"  # nothing carried over


def test_standard_library_is_usable():
    # Modules imported only after the sandbox dropped privileges: the stdlib must stay readable.
    code = ("import asyncio, decimal, json, sqlite3\n"
            "asyncio.run(asyncio.sleep(0))  # needs a socketpair\n"
            "print(decimal.Decimal(1) / 8, json.dumps(sqlite3.connect('db').execute('select 2').fetchone()))")
    result = run_python(code)
    assert result.ok and result.stdout == "0.125 [2]\n", result.stderr


def test_infinite_loop_is_killed_at_the_wall_clock_limit():
    limits = SandboxLimits(wall_seconds=1.0, cpu_seconds=30)
    result = run_python("while True:\n    pass", limits=limits)
    assert result.timed_out and result.exit_code is None and not result.ok
    assert 1.0 <= result.duration_s < 2.0


def test_sleeping_program_is_killed_at_the_wall_clock_limit():
    code = "import time\nprint('start', flush=True)\ntime.sleep(60)"
    result = run_python(code, limits=SandboxLimits(wall_seconds=1.0))
    assert result.timed_out and result.stdout == "start\n" and result.duration_s < 2.0


def test_program_that_closes_its_output_and_keeps_running_is_killed():
    code = "import os\nos.close(1)\nos.close(2)\nwhile True:\n    pass"
    result = run_python(code, limits=SandboxLimits(wall_seconds=1.0))
    assert result.timed_out and result.duration_s < 2.0


def test_cpu_burn_is_killed_by_rlimit_cpu():
    limits = SandboxLimits(wall_seconds=10.0, cpu_seconds=1)
    result = run_python("x = 0\nwhile True:\n    x += 1", limits=limits)
    assert not result.timed_out and result.exit_code is not None and result.exit_code < 0  # killed by a signal
    assert result.duration_s < 9.0  # well before the wall clock, even on a busy machine


def test_fork_bomb_is_refused():
    result = run_python("import os\nwhile True:\n    os.fork()", limits=SandboxLimits(wall_seconds=3.0))
    assert result.exit_code == 1 and result.duration_s < 2.0
    assert result.stderr.splitlines()[-3:] == ["  File \"main.py\", line 3, in <module>", "    os.fork()",
                                               "PermissionError: sandbox: os.fork is not allowed here"]


def test_fork_bomb_is_contained_by_the_kernel(kernel_only):
    code = "import os\nprint(os.getcwd(), flush=True)\nwhile True:\n    os.fork()"
    result = run_python(code, limits=SandboxLimits(wall_seconds=5.0, max_processes=16))
    assert not result.ok and not result.timed_out and result.duration_s < 4.0
    assert "BlockingIOError" in result.stderr  # fork() failed at RLIMIT_NPROC
    assert _leftovers(result.stdout.split()[0]) == []


def test_fork_bomb_does_not_starve_its_neighbour(kernel_only):
    inside = run_python("import os\nprint(os.readlink('/proc/self/ns/user'))").stdout.strip()
    if inside == os.readlink("/proc/self/ns/user"):
        pytest.skip("no user namespace per sandbox here: RLIMIT_NPROC is shared by all sandboxes")
    bomb = "import os, time\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        time.sleep(0.01)"
    neighbour = ("import os, time\ntime.sleep(0.3)\nfor _ in range(10):\n"
                 "    if os.fork() == 0:\n        time.sleep(0.2)\n        os._exit(0)\nprint('forked 10')")
    limits = SandboxLimits(wall_seconds=1.5, max_processes=16)
    bombed, neighboured = run_many([(bomb, ""), (neighbour, "")], limits=limits, max_workers=2)
    assert bombed.timed_out and neighboured.ok and neighboured.stdout == "forked 10\n"


@pytest.mark.parametrize("main_hangs", [False, True])
def test_escaped_processes_die_with_the_program(kernel_only, main_hangs):
    # A child in its own session is out of the process group that a timeout kills; the PID namespace
    # still ends it when the program ends, and the program itself dies with the sandbox's waiter.
    code = ("import os, time\nprint(os.getcwd(), flush=True)\n"
            "if os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\n"
            + ("os.setsid()\nwhile True:\n    pass\n" if main_hangs else ""))
    result = run_python(code, limits=SandboxLimits(wall_seconds=1.0))
    assert result.timed_out == main_hangs and result.duration_s < 2.0
    deadline = time.monotonic() + 2.0
    while _leftovers(result.stdout.split()[0]) and time.monotonic() < deadline:
        time.sleep(0.05)  # SIGKILL is delivered at once, but reaping takes a moment
    assert _leftovers(result.stdout.split()[0]) == []


def test_host_processes_are_hidden(kernel_only):
    result = run_python("import os\nprint([p for p in os.listdir('/proc') if p.isdigit()])")
    assert result.stdout == "['1']\n"


def test_threads_work_within_the_limits():
    code = ("from concurrent.futures import ThreadPoolExecutor\n"
            "with ThreadPoolExecutor(8) as pool:\n    print(sum(pool.map(lambda x: x * x, range(10))))")
    result = run_python(code)
    assert result.ok and result.stdout == "285\n", result.stderr  # 0 + 1 + 4 + ... + 81 = 285


def test_huge_output_is_cut_and_the_program_killed():
    limits = SandboxLimits(wall_seconds=10.0, max_output_bytes=10_000)
    result = run_python("while True:\n    print('x' * 1000)", limits=limits)
    assert result.output_truncated and not result.timed_out and not result.ok
    assert result.stdout == ("x" * 1000 + "\n") * 9 + "x" * 991  # 9 * 1001 + 991 = 10_000 bytes
    assert result.duration_s < 2.0  # killed at the cap, not at the timeout


def test_huge_single_write_does_not_reach_the_callers_memory():
    tracemalloc.start()
    try:
        result = run_python("import sys\nsys.stdout.write('x' * 10**8)")  # 100 MB in one write
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert result.output_truncated and len(result.stdout) == 64_000
    assert peak < 2_000_000  # what the caller held: the 64 kB caps and a 64 kB read buffer, not 100 MB


def test_huge_allocation_fails_with_memory_error():
    result = run_python("x = bytearray(10**10)\nprint('allocated')")
    assert result.exit_code == 1 and "MemoryError" in result.stderr and "allocated" not in result.stdout
    small = run_python("x = bytearray(50 * 2**20)\nprint(len(x))")  # 50 MiB is fine under 512 MiB
    assert small.ok and small.stdout == f"{50 * 2**20}\n"


def test_file_size_limit():
    limits = SandboxLimits(max_file_bytes=1000)
    result = run_python("with open('big', 'wb') as f:\n    f.write(b'x' * 5000)", limits=limits)
    assert result.exit_code == 1 and "File too large" in result.stderr


def test_writes_outside_the_sandbox_are_refused(tmp_path):
    target, victim = tmp_path / "escape.txt", tmp_path / "victim.txt"
    victim.write_text("keep me")
    for code in (f"open({str(target)!r}, 'w').write('x')", f"open({str(victim)!r}, 'a').write('x')",
                 f"import os; os.remove({str(victim)!r})", f"import shutil; shutil.rmtree({str(tmp_path)!r})",
                 f"import os; os.symlink('/etc/passwd', 'link'); os.rename('link', {str(target)!r})"):
        result = run_python(code)
        assert result.exit_code == 1 and "Error" in result.stderr, code
    assert not target.exists() and victim.read_text() == "keep me"


def test_writes_outside_are_stopped_by_the_kernel(kernel_only):
    # A world-writable directory: file permissions would let anyone in; the read-only mounts do not.
    outside = tempfile.mkdtemp()
    try:
        os.chmod(outside, 0o777)
        result = run_python(f"open({outside + '/escape.txt'!r}, 'w').write('x')")
        assert result.exit_code == 1 and "Read-only file system" in result.stderr
        assert os.listdir(outside) == []
    finally:
        os.rmdir(outside)


@pytest.mark.parametrize("hook", ["on", "off"])
def test_network_is_unreachable(hook, request):
    if hook == "off":
        request.getfixturevalue("kernel_only")
    with socket.socket() as server:  # a real listener: outside the sandbox this connect would work
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        result = run_python(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\nprint('in')")
    assert result.exit_code == 1 and "in" not in result.stdout
    assert ("not allowed" if hook == "on" else "Network is unreachable") in result.stderr


def test_unread_stdin_does_not_hang():
    result = run_python("print('done')", stdin="x" * 2_000_000)
    assert result.ok and result.stdout == "done\n"


def test_run_many_preserves_order():
    pairs = [(f"import time\ntime.sleep({0.1 * (3 - i)})\nprint(input() * {i})", f"{i}\n") for i in range(4)]
    started = time.monotonic()
    results = run_many(pairs, max_workers=2)
    assert [r.stdout for r in results] == ["\n", "1\n", "22\n", "333\n"]
    assert all(r.ok for r in results) and time.monotonic() - started < 5.0
