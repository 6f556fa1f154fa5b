"""Failure injection on a local Flink cluster, for the recovery tests only: the product has
no command that kills TaskManagers."""
from __future__ import annotations

import contextlib
import signal

from modelserving.errors import FlinkClusterError
from modelserving.local import processes
from modelserving.local.flink_cluster import LocalFlinkCluster


def kill_taskmanager(cluster: LocalFlinkCluster, pid: int | None = None) -> int:
    """SIGKILL one TaskManager JVM (the given one, else the newest) and wait until it is
    gone; returns its pid. Nobody restarts it: ``start_taskmanager`` brings a new one."""
    pids = cluster.taskmanager_pids()
    if not pids:
        raise FlinkClusterError("no TaskManager of this cluster is running")
    if pid is None:
        pid = max(pids, key=processes.started_at)
    elif pid not in pids:
        raise FlinkClusterError(f"pid {pid} is not a TaskManager of this cluster")
    processes.signal_pid(pid, signal.SIGKILL)
    if processes.wait_gone([pid], 10):
        raise FlinkClusterError(f"TaskManager {pid} survived SIGKILL")
    forget_pid(cluster, "taskexecutor", pid)
    return pid


def forget_pid(cluster: LocalFlinkCluster, daemon: str, pid: int) -> None:
    """Drop a killed daemon from its pid file, so stop-cluster.sh stops the live ones and
    taskmanager.sh does not count the dead one."""
    pid_file = cluster.pid_file(daemon)
    with contextlib.suppress(OSError):
        kept = [line for line in pid_file.read_text().splitlines()
                if line.strip() and line.strip() != str(pid)]
        if kept:
            pid_file.write_text("\n".join(kept) + "\n")
        else:
            pid_file.unlink()


def start_taskmanager(cluster: LocalFlinkCluster, timeout: float = 60) -> str:
    """A replacement TaskManager (``LocalFlinkCluster.start_taskmanager``, which first ends
    what the killed one left behind); returns its resource id once registered."""
    return cluster.start_taskmanager(timeout)
