"""Process control for the local services (broker, Flink daemons, jobs), through psutil."""
from __future__ import annotations

import contextlib
import os
import signal
import socket
from pathlib import Path
from typing import Callable, Iterable

import psutil

HOST = "127.0.0.1"
#: Put in this process's environment by PyFlink's loopback Python worker
#: (``local_python_workers=loopback`` runs the workers inside the launching process): a child
#: that inherits it cannot start a Flink client of its own ("launching the
#: PythonGatewayServer during Python UDF execution").
LOOPBACK_WORKER_VARIABLES = ("PYFLINK_GATEWAY_DISABLED",)


def child_environ(without: Iterable[str] = ()) -> dict[str, str]:
    """This process's environment for a child process that runs Flink clients or jobs."""
    dropped = set(LOOPBACK_WORKER_VARIABLES) | set(without)
    return {k: v for k, v in os.environ.items() if k not in dropped}


def is_alive(pid: int | None) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    if not pid:
        return False
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def find(matches: Callable[[psutil.Process], bool]) -> list[int]:
    """Pids of the live processes for which ``matches(process)`` holds (errors mean no)."""
    found = []
    for process in psutil.process_iter():
        try:
            if process.status() != psutil.STATUS_ZOMBIE and matches(process):
                found.append(process.pid)
        except psutil.Error:
            continue
    return found


def cmdline(process: psutil.Process) -> list[str]:
    try:
        return process.cmdline()
    except psutil.Error:
        return []


def environ_has(process: psutil.Process, name: str, value: str) -> bool:
    try:
        return process.environ().get(name) == value
    except psutil.Error:
        return False


def environ_get(process: psutil.Process, name: str) -> str | None:
    """The value of ``name`` in the process's environment (None when unset or unreadable)."""
    try:
        return process.environ().get(name)
    except psutil.Error:
        return None


def ancestors(process: psutil.Process) -> list[psutil.Process]:
    """The process's parent, grandparent ... up to init ([] when it is gone)."""
    try:
        return process.parents()
    except psutil.Error:
        return []


def wait_gone(pids: Iterable[int], timeout_s: float) -> list[int]:
    """Wait until none of ``pids`` is alive; returns those still alive at the timeout."""
    processes = []
    for pid in pids:
        try:
            processes.append(psutil.Process(pid))
        except psutil.Error:
            continue
    _, alive = psutil.wait_procs(processes, timeout=timeout_s)
    return [p.pid for p in alive if is_alive(p.pid)]


def terminate(pids: Iterable[int], grace_s: float = 10.0) -> list[int]:
    """SIGTERM, then SIGKILL whatever is still alive after ``grace_s``; returns the pids
    that survived even that (normally none)."""
    pids = [pid for pid in pids if is_alive(pid)]
    for pid in pids:
        signal_pid(pid, signal.SIGTERM)
    left = wait_gone(pids, grace_s)
    for pid in left:
        signal_pid(pid, signal.SIGKILL)
    return wait_gone(left, 5.0)


def terminate_group(pid: int, grace_s: float = 30.0) -> None:
    """End a process started in its own session together with its children."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        if not wait_gone([pid], wait_s):
            return


def signal_pid(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def started_at(pid: int) -> float:
    """When the process started (seconds since the epoch); 0.0 when it is gone."""
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return 0.0


def descendants(pid: int) -> list[int]:
    try:
        return [child.pid for child in psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return []


def read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """``n`` distinct free ports on 127.0.0.1 (all bound at once, so never equal)."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(n)]
    try:
        for s in sockets:
            s.bind((HOST, 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def free_port_range(n: int, attempts: int = 50) -> list[int]:
    """``n`` consecutive free ports on 127.0.0.1, for settings that take a range (a
    metrics reporter's ``first-last``); all were bound at once a moment ago."""
    for _ in range(attempts):
        base = free_port()
        if base + n > 65536:
            continue
        with contextlib.ExitStack() as stack:
            try:
                for port in range(base, base + n):
                    s = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
                    s.bind((HOST, port))
            except OSError:
                continue
        return list(range(base, base + n))
    raise OSError(f"no {n} consecutive free ports found on {HOST}")


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            return False
        return True


def port_accepts(port: int, host: str = HOST) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def log_tail(path: Path, lines: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
