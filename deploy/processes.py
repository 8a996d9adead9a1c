"""Detached processes that outlive `make up`, their pid files, ports, and liveness.

Shared by the Postgres and broker starters; liveness checks match the command line so a
stale pid reused by some other process never reads as "ours".
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Coroutine, Mapping, Sequence
from pathlib import Path
from typing import Any, Final, TypeVar

REPO_ROOT = Path(__file__).resolve().parents[1]
CACHE_DIR = REPO_ROOT / ".cache"

T = TypeVar("T")

# --------------------------------------------------------------------------------------
# Processes and ports
# --------------------------------------------------------------------------------------

#: Popen objects of children started by *this* Python process. Kept so that a child that
#: exits is reaped (otherwise it lingers as a zombie and looks alive to ``kill(pid, 0)``),
#: and so Python does not warn about a still-running subprocess being garbage-collected.
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


_HANDED_OUT: set[int] = set()
# Under pytest-xdist each worker picks ports from its own block, below the OS's ephemeral
# range (32768 and up on Linux), so two workers never pick the same port between a probe
# and the bind of the service that gets it.
WORKER_PORTS_FROM: Final = 20000
WORKER_BLOCK: Final = 1000
_worker_cursor = 0


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that is free right now (the OS picks it; racy but fine locally).

    Never the same port twice in one process: the OS may offer a port again as soon as
    the probe socket closes, and a caller picking several ports before starting anything
    on them (a stack's API and metrics ports) once got one port for two services. In a
    pytest-xdist worker, a port of the worker's own block (`WORKER_PORTS_FROM`).
    """
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if worker.startswith("gw") and worker[2:].isdigit():
        return _free_in_block(host, WORKER_PORTS_FROM + WORKER_BLOCK * (int(worker[2:]) % 12))
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = int(s.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def _free_in_block(host: str, start: int) -> int:
    global _worker_cursor
    for _ in range(WORKER_BLOCK):
        port = start + _worker_cursor % WORKER_BLOCK
        _worker_cursor += 1
        if port in _HANDED_OUT:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue  # taken by something else on the machine
        _HANDED_OUT.add(port)
        return port
    raise RuntimeError(f"no free port left in {start}..{start + WORKER_BLOCK - 1}")


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    """True when something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def start_process(
    cmd: Sequence[str],
    log_path: Path,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> int:
    """Start ``cmd`` detached (own session, no stdin), appending stdout+stderr to log_path.

    A new session means Ctrl-C in the terminal that ran ``make up`` does not kill the
    stack, and ``stop_pid`` can signal the whole process group. ``env`` replaces the
    environment entirely when given (pass ``{**os.environ, ...}`` to extend it).
    """
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            list(cmd),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(env) if env is not None else None,
            cwd=str(cwd) if cwd else None,
            start_new_session=True,
            close_fds=True,
        )
    _CHILDREN[proc.pid] = proc
    # Popen returns once exec began; the kernel shows the new command line a moment later,
    # and until then the process would not read as the stack's (see `process_args`).
    deadline = time.monotonic() + 1.0
    while not process_args(proc.pid) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    return proc.pid


def pid_alive(pid: int | None, expect: str | None = None) -> bool:
    """True when process ``pid`` exists and is not a zombie.

    ``expect``, when given, must occur in the process's command line: pid files outlive
    reboots and pids get reused, so a bare ``kill(pid, 0)`` could report some unrelated
    process as our broker.
    """
    if not pid or pid <= 0:
        return False
    child = _CHILDREN.get(pid)
    if child is not None and child.poll() is not None:
        _CHILDREN.pop(pid, None)
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    proc = Path(f"/proc/{pid}")
    if proc.exists():
        try:
            # state is the field after the parenthesised command name
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
            # A main thread that left before the others reads as a zombie while they
            # finish, the ports still bound: gone only with the last of them.
            if state in ("Z", "X") and len(list((proc / "task").iterdir())) < 2:
                return False
            if expect is not None:
                cmdline = (
                    (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                )
                return expect in cmdline
        except (OSError, IndexError):
            return False
    return True


def process_args(pid: int | None) -> list[str]:
    """The command line of live process ``pid``, argument by argument ([] when it is gone
    or unreadable): whole arguments, so that one path or port is not taken for a longer
    one that starts with it."""
    if not pid_alive(pid):
        return []
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [arg.decode(errors="replace") for arg in raw.split(b"\0")[:-1]]


def process_cwd(pid: int | None) -> Path | None:
    """The working directory of process ``pid`` (None when unknown)."""
    try:
        return Path(os.readlink(f"/proc/{pid}/cwd")) if pid else None
    except OSError:
        return None


def stop_pid(pid: int | None, timeout: float = 15.0) -> bool:
    """Stop a process: SIGTERM (to its process group if it leads one), then SIGKILL.

    Returns True if the process is gone afterwards. Safe on pids that are already dead.
    """
    if not pid_alive(pid):
        return True
    assert pid is not None

    def _signal(sig: int) -> None:
        try:
            if os.getpgid(pid) == pid:
                os.killpg(pid, sig)
            else:
                os.kill(pid, sig)
        except ProcessLookupError:
            pass

    _signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(0.1)
    _signal(signal.SIGKILL)
    for _ in range(50):
        if not pid_alive(pid):
            return True
        time.sleep(0.1)
    return not pid_alive(pid)


def read_pid(path: Path) -> int | None:
    """The pid stored in a pid file, or None when the file is missing or garbage."""
    try:
        return int(Path(path).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def write_pid(path: Path, pid: int) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(f"{pid}\n")


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _run_coro(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine from sync code, even when the caller already has a running loop
    (then it runs on a private loop in a worker thread)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    box: dict[str, Any] = {}

    def _worker() -> None:
        try:
            box["result"] = asyncio.run(coro)
        except BaseException as exc:
            box["error"] = exc

    t = threading.Thread(target=_worker, daemon=True)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["result"]  # type: ignore[no-any-return]
