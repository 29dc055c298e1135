"""Run model-written Python in a throwaway, resource-limited child process.

Environments call ``run_python(code, stdin=...)`` for tool calls and coder/tester programs, often
thousands of times per run, so one call costs one fresh ``python -I -S`` (tens of milliseconds) and it
never raises or hangs on bad code: errors, timeouts and cut output are fields of the result.

What is guarded, strongest layer first:

Kernel-enforced everywhere (rlimits set in the child before user code, hard = soft so the code cannot
raise them): CPU seconds, address space, file size, open files, no core dumps. From the parent: the
wall-clock timeout kills the process group, and output past ``max_output_bytes`` is dropped as it
arrives and the program killed.

Kernel-enforced on Linux where namespaces can be made (as root, or with unprivileged user namespaces):
  - network: a fresh network namespace with no interface up, so every connect fails;
  - processes: a PID namespace whose init is the program, so all it spawns dies with it, and
    RLIMIT_NPROC = ``max_processes`` counted per sandbox (in its own user namespace);
  - files: a mount namespace in which every mount is read-only and nosuid, with a private tmpfs of
    ``4 * max_file_bytes + 1 MiB`` as the working directory (gone with the program);
  - privileges: a root caller drops to ``nobody`` (root ignores RLIMIT_NPROC and file permissions),
    then no_new_privs and no capabilities. A stdlib that ``nobody`` cannot reach (say under ``/root``)
    is bind-mounted read-only at the same path over an empty tmpfs, which also hides the rest.

Best-effort everywhere (a ``sys.addaudithook`` hook installed before user code, so the program behaves
the same on every machine): refuses to spawn processes, open non-Unix sockets, call into ctypes,
signal other processes, and write, delete, rename or chmod paths outside the working directory.
Audit hooks can be bypassed by determined code. Without namespaces they are the only guard for network
and files; RLIMIT_NPROC is then set above the caller's current task count, or not at all for a root
caller whose stdlib ``nobody`` cannot read (it stays root).

Only the standard library is importable (``-S``: no site-packages). Not guarded: reading what the sandbox user may read, CPU and memory contention with the host (no
cgroups), kernel exploits. The program is ``pid 1`` of its namespace, so signals it sends itself
without a handler are ignored. This stops buggy and reward-hacking programs, not a targeted attack.
"""

from __future__ import annotations

import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

# Tests switch this off to show that the kernel layer holds on its own.
_AUDIT_HOOK = True

# Runs in the child as ``python -I -S -c _CHILD work cpu mem nproc fsize audit``; kept free of slow
# imports (json, re) because every call pays for them.
_CHILD = r'''
import os, resource, sys, _signal as signal  # not `signal`: its enums cost ms per call
WORK = sys.argv[1]
CPU, MEM, NPROC, FSIZE, AUDIT = map(int, sys.argv[2:7])
ROOT = os.geteuid() == 0
UID, GID = (65534, 65534) if ROOT else (os.getuid(), os.getgid())

try:
    import ctypes
    LIBC = ctypes.CDLL(None, use_errno=True)
except (ImportError, OSError):
    LIBC = None

def call(name, *args):  # a libc call, OSError when it fails
    if getattr(LIBC, name)(*args) != 0:
        raise OSError(ctypes.get_errno(), f"sandbox: {name} failed")

def mount(src, dst, fstype, flags, data=None):
    encode = lambda text: text and text.encode()
    call("mount", encode(src), encode(dst), encode(fstype), flags, encode(data))

def readonly(path):  # mount_setattr(AT_FDCWD, path, AT_RECURSIVE, {RDONLY | NOSUID}), Linux 5.12+
    call("syscall", 442, -100, path.encode(), 0x8000, (ctypes.c_uint64 * 4)(3, 0, 0, 0), 32)

def limit(res, value):
    hard = resource.getrlimit(res)[1]
    value = value if hard == resource.RLIM_INFINITY else min(value, hard)
    resource.setrlimit(res, (value, value))

def blocked_ancestor(path):  # the topmost directory on `path` that `nobody` cannot enter
    parts = path.split("/")
    for i in range(2, len(parts) + 1):
        prefix = "/".join(parts[:i])
        if os.stat(prefix).st_mode & 0o005 != 0o005:
            return prefix

def namespaces():
    flags = 0x40000000 | 0x20000000 | 0x20000  # CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWNS
    if ROOT:
        call("unshare", flags)
    else:
        call("unshare", flags | 0x10000000)  # CLONE_NEWUSER, mapping only ourselves
        for name, text in (("uid_map", f"{UID} {UID} 1"), ("setgroups", "deny"), ("gid_map", f"{GID} {GID} 1")):
            with open(f"/proc/self/{name}", "w") as handle:
                handle.write(text)
    mount(None, "/", None, 0x4000 | 0x40000)  # MS_REC | MS_PRIVATE: nothing leaks to the host
    readonly("/")
    mount("tmpfs", WORK, "tmpfs", 6, f"size={4 * FSIZE + 2**20},mode=0700,uid={UID},gid={GID}")  # nosuid, nodev
    os.chdir(WORK)
    paths = [p for p in sys.path if os.path.isdir(p)]
    moves = [(p, blocked_ancestor(p)) for p in paths if not any(p.startswith(q + "/") for q in paths)]
    moves = [(p, top, f"{WORK}/.stage{i}") for i, (p, top) in enumerate(moves) if ROOT and top and top != p]
    for path, _, stage in moves:
        os.mkdir(stage)
        mount(path, stage, None, 0x1000 | 0x4000)  # MS_BIND | MS_REC, read-only like its source
    for top in {top for _, top, _ in moves}:
        mount("tmpfs", top, "tmpfs", 6, "size=64k,mode=0755")
    for path, top, stage in moves:
        os.makedirs(path, exist_ok=True)
        mount(stage, path, None, 0x2000)  # MS_MOVE
        os.rmdir(stage)
    for top in {top for _, top, _ in moves}:
        readonly(top)

def setup():
    with open("main.py", encoding="utf-8") as handle:
        code = handle.read()
    isolated = drop = False
    if LIBC is not None:
        try:
            namespaces()
            isolated = True
            with open("main.py", "w", encoding="utf-8") as handle:  # into the fresh tmpfs
                handle.write(code)
        except OSError:
            pass
    for res, value in ((resource.RLIMIT_CPU, CPU), (resource.RLIMIT_AS, MEM), (resource.RLIMIT_FSIZE, FSIZE),
                       (resource.RLIMIT_CORE, 0), (resource.RLIMIT_NOFILE, 64)):
        limit(res, value)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an oversized write raises instead of killing
    if isolated:  # the program becomes init of the new PID namespace; this process mirrors its status
        pid = os.fork()
        if pid:
            LIBC.prctl(1, 9, 0, 0, 0)  # PR_SET_PDEATHSIG = SIGKILL: a dead caller takes the sandbox along
            status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
            if status < 0:  # killed by a signal: die of the same one
                if -status != signal.SIGKILL:
                    signal.signal(-status, signal.SIG_DFL)
                os.kill(os.getpid(), -status)
            os._exit(status if status >= 0 else 128 - status)
        try:  # a /proc that shows only this namespace's processes
            mount("proc", "/proc", "proc", 15)  # read-only, nosuid, nodev, noexec
        except OSError:
            pass
    if ROOT and (isolated or not any(blocked_ancestor(p) for p in sys.path if os.path.isdir(p))):
        if not isolated:
            os.chown(WORK, UID, GID)
        os.setgroups([])
        os.setgid(GID)
        os.setuid(UID)
        drop = True
    own_userns = not ROOT and isolated
    if LIBC is not None:
        if drop:
            try:  # a user namespace of our own, so RLIMIT_NPROC counts this sandbox only
                call("unshare", 0x10000000)
                own_userns = True
            except OSError:
                pass
        if own_userns:  # capset(v3 header, all-zero sets): no capabilities inside it either
            call("capset", (ctypes.c_uint32 * 2)(0x20080522, 0), (ctypes.c_uint32 * 6)())
        LIBC.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS: setuid binaries gain nothing
        LIBC.prctl(1, 9, 0, 0, 0)  # PR_SET_PDEATHSIG = SIGKILL: die with our parent (a uid change clears it)
    if drop or own_userns:
        limit(resource.RLIMIT_NPROC, NPROC)
    elif not ROOT:  # RLIMIT_NPROC counts all our tasks system-wide: allow NPROC more than now
        tasks = 0
        for entry in os.listdir("/proc"):
            try:
                if entry.isdigit() and os.stat(f"/proc/{entry}").st_uid == UID:
                    tasks += len(os.listdir(f"/proc/{entry}/task"))
            except OSError:
                pass
        limit(resource.RLIMIT_NPROC, tasks + NPROC)
    return code

def guard():
    spawn = {"os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "subprocess.Popen",
             "pty.spawn", "os.unshare", "os.setns", "ctypes.dlopen", "ctypes.dlsym", "ctypes.dlsym/handle",
             "ctypes.call_function", "ctypes.cdata", "socket.connect", "socket.bind", "socket.sendto",
             "socket.sendmsg"}
    paths = {"os.remove": (0,), "os.rmdir": (0,), "os.rename": (0, 1), "os.link": (0, 1), "os.symlink": (1,),
             "os.truncate": (0,), "os.chmod": (0,), "os.chown": (0,), "os.mkdir": (0,), "os.utime": (0,),
             "shutil.rmtree": (0,)}  # event -> which arguments are paths it changes
    write = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
    realpath, fspath, fsdecode, self = os.path.realpath, os.fspath, os.fsdecode, os.getpid()
    def outside(path):
        if isinstance(path, int) or fsdecode(fspath(path)) in ("/dev/null", "/dev/stdout", "/dev/stderr"):
            return False
        path = realpath(fsdecode(fspath(path)))
        return path != WORK and not path.startswith(WORK + "/")
    def hook(event, args):
        if event == "open":
            path, mode, flags = args
            writes = (isinstance(flags, int) and flags & write) or (isinstance(mode, str) and set(mode) & set("wax+"))
            bad = writes and outside(path)
        elif event in paths:
            bad = any(outside(args[i]) for i in paths[event])
        elif event == "socket.__new__":
            bad = args[1] != 1  # only AF_UNIX, for socketpair (asyncio needs one)
        elif event in ("os.kill", "os.killpg"):
            bad = args[0] not in (0, self)
        else:
            bad = event in spawn
        if bad:
            raise PermissionError(f"sandbox: {event} is not allowed here")
    sys.addaudithook(hook)

_code = setup()
import builtins
_main = type(sys)("__main__")
_main.__file__, _main.__builtins__ = "main.py", builtins
sys.modules["__main__"], sys.argv = _main, ["main.py"]
sys.path.insert(0, WORK)
builtins.exit = builtins.quit = sys.exit  # -S skips site, which defines them
if AUDIT:
    guard()
try:
    exec(compile(_code, "main.py", "exec"), _main.__dict__)
except SystemExit:
    raise
except BaseException as exc:  # print it as `python main.py` would: without this prelude's frames
    import traceback
    frames, tb = [], exc.__traceback__.tb_next
    while tb is not None:
        if (tb.tb_frame.f_code.co_filename, tb.tb_frame.f_code.co_name) != ("<string>", "hook"):
            frames.append(tb)
        tb = tb.tb_next
    for frame, after in zip(frames, frames[1:] + [None]):
        frame.tb_next = after
    traceback.print_exception(type(exc), exc, frames[0] if frames else None)
    sys.exit(1)
'''


@dataclass(frozen=True)
class SandboxLimits:
    """What one program may use."""

    wall_seconds: float = 5.0
    """Wall-clock timeout; the program and everything it started are killed after it."""
    cpu_seconds: int = 5
    """CPU time (RLIMIT_CPU); the kernel kills the program past it."""
    memory_mb: int = 512
    """Address space (RLIMIT_AS); allocations past it raise MemoryError."""
    max_output_bytes: int = 64_000
    """Stdout and stderr are each cut at this size, and the program killed when either overflows."""
    max_processes: int = 32
    """Processes and threads the program may have (RLIMIT_NPROC); stops fork bombs."""
    max_file_bytes: int = 16_000_000
    """Largest file the program may write (RLIMIT_FSIZE); the working directory holds 4x this + 1 MiB."""


@dataclass
class SandboxResult:
    """What came back from one program."""

    stdout: str
    stderr: str
    exit_code: int | None
    """The exit status (negative: killed by that signal); None when the sandbox killed it."""
    timed_out: bool
    output_truncated: bool
    duration_s: float

    @property
    def ok(self) -> bool:
        """The program ran to the end and exited 0."""
        return self.exit_code == 0 and not self.timed_out


def run_python(code: str, *, stdin: str = "", limits: SandboxLimits = SandboxLimits()) -> SandboxResult:
    """Run ``code`` as a script with ``stdin`` as its input, in a fresh sandboxed interpreter.

    Never raises for anything the code does and never outlives ``limits.wall_seconds`` by much: crashes,
    timeouts and overflowing output are fields of the result.
    """
    start = time.monotonic()
    work = os.path.realpath(tempfile.mkdtemp(prefix="palaestra-sandbox-"))
    try:
        with open(os.path.join(work, "main.py"), "w", encoding="utf-8") as handle:
            handle.write(code)
        args = [work, limits.cpu_seconds, limits.memory_mb * 2**20, limits.max_processes, limits.max_file_bytes,
                int(_AUDIT_HOOK)]
        env = {"PATH": "/usr/bin:/bin", "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8",
               "MALLOC_ARENA_MAX": "2"}  # glibc's per-thread arenas would eat RLIMIT_AS in threaded code
        # The child sets its own limits before user code, rather than a preexec_fn here: preexec_fn is
        # unsafe with threads (run_many) and forces a full fork() of a possibly huge trainer process.
        try:
            proc = subprocess.Popen([sys.executable, "-I", "-S", "-B", "-X", "utf8", "-c", _CHILD, *map(str, args)],
                                    cwd=work, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, start_new_session=True)
        except OSError as exc:
            return SandboxResult("", f"sandbox: could not start: {exc}", None, False, False, time.monotonic() - start)
        out, err, timed_out, truncated = _communicate(proc, stdin.encode("utf-8", "replace"), limits, start)
        killed = timed_out or truncated
        if not killed:
            try:
                proc.wait(max(0.0, start + limits.wall_seconds - time.monotonic()))
            except subprocess.TimeoutExpired:  # closed its output but kept running
                killed = timed_out = True
        _kill_group(proc)
        proc.wait()
        return SandboxResult(out.decode("utf-8", "replace"), err.decode("utf-8", "replace"),
                             None if killed else proc.returncode, timed_out, truncated, time.monotonic() - start)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run_many(codes_and_inputs: list[tuple[str, str]], *, limits: SandboxLimits = SandboxLimits(),
             max_workers: int = 2) -> list[SandboxResult]:
    """``run_python`` over ``(code, stdin)`` pairs on a thread pool; results in input order."""
    with ThreadPoolExecutor(max_workers=max(1, max_workers)) as pool:
        return list(pool.map(lambda pair: run_python(pair[0], stdin=pair[1], limits=limits), codes_and_inputs))


def _communicate(proc: subprocess.Popen, data: bytes, limits: SandboxLimits, start: float):
    """Feed stdin and read both outputs until EOF, the deadline, or an output past the cap."""
    cap, deadline = limits.max_output_bytes, start + limits.wall_seconds
    buffers = {proc.stdout: bytearray(), proc.stderr: bytearray()}
    timed_out = truncated = False
    pending = memoryview(data)
    with selectors.DefaultSelector() as selector:
        for stream in buffers:
            selector.register(stream, selectors.EVENT_READ)
        if pending:
            os.set_blocking(proc.stdin.fileno(), False)
            selector.register(proc.stdin, selectors.EVENT_WRITE)
        else:
            proc.stdin.close()
        while selector.get_map() and not truncated:
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = True
                break
            for key, _ in selector.select(left):
                stream = key.fileobj
                if stream is proc.stdin:
                    try:
                        pending = pending[os.write(stream.fileno(), pending[:65536]):]
                    except BlockingIOError:
                        continue
                    except OSError:  # the program closed its stdin
                        pending = pending[:0]
                    if not pending:
                        selector.unregister(stream)
                        stream.close()
                    continue
                chunk = os.read(stream.fileno(), 65536)
                if not chunk:
                    selector.unregister(stream)
                    continue
                buffer = buffers[stream]
                buffer += chunk[: cap + 1 - len(buffer)]
                if len(buffer) > cap:
                    del buffer[cap:]
                    truncated = True
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        stream.close()
    return bytes(buffers[proc.stdout]), bytes(buffers[proc.stderr]), timed_out, truncated


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the program's process group (its session, made by ``start_new_session``)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
