"""Failure injection on the local Flink cluster and broker, for the fault tests only: the
product has no command that kills TaskManagers or stops a broker in the middle of a stream."""
from __future__ import annotations

import contextlib
import signal
import time

import psutil

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


def broker_outage(broker, seconds: float) -> tuple[float, float]:
    """Stop the broker, wait ``seconds``, start it again on the same data directory and
    ports; returns the ``time.time()`` of the stop and of its return (serving again)."""
    stopped_at = time.time()
    broker.stop()
    time.sleep(seconds)
    broker.start(timeout=120)
    return stopped_at, time.time()


def job_taskmanagers(cluster: LocalFlinkCluster, job_id: str) -> set[str]:
    """Resource ids of the TaskManagers running a subtask of the job."""
    found = set()
    for vertex in (cluster.job(job_id).get("vertices") or []):
        hosts = cluster.rest(f"/jobs/{job_id}/vertices/{vertex['id']}/taskmanagers") or {}
        found.update(tm["taskmanager-id"] for tm in hosts.get("taskmanagers", [])
                     if tm.get("status") in ("RUNNING", "INITIALIZING", "DEPLOYING"))
    return found


def taskmanager_pid(cluster: LocalFlinkCluster, resource_id: str) -> int:
    """The pid of the TaskManager JVM with ``resource_id``: named on its command line when
    ``start_taskmanager`` started it, else found by the RPC port the JobManager knows it by
    (the ones ``start-cluster.sh`` started)."""
    wanted = f"taskmanager.resource-id={resource_id}"
    pids = cluster.taskmanager_pids()
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            if wanted in processes.cmdline(psutil.Process(pid)):
                return pid
    info = cluster.rest(f"/taskmanagers/{resource_id}") or {}
    port = int(info.get("path", ":0/").rsplit(":", 1)[1].split("/", 1)[0])
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            if any(c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN
                   for c in psutil.Process(pid).net_connections("tcp")):
                return pid
    raise FlinkClusterError(f"no TaskManager JVM of this cluster has resource id {resource_id}")
