"""What a killed TaskManager leaves behind is found and ended by the local cluster tooling,
and nothing else is: checked with stand-in processes (no Flink, no Java)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from modelserving.local import processes
from modelserving.local.flink_cluster import TM_CLASS, TM_MARK, LocalFlinkCluster

#: A stand-in TaskManager: its command line names the TaskManager class and the cluster's
#: conf dir; it starts a "Python worker" (carrying the mark), which starts a "pypmml JVM".
FAKE_TM = """
import os, subprocess, sys, time
worker = subprocess.Popen([sys.executable, "-c",
    "import subprocess, sys, time; "
    "g = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
    "print(g.pid, flush=True); time.sleep(120)"], stdout=subprocess.PIPE, text=True)
print(worker.pid, worker.stdout.readline().strip(), flush=True)
time.sleep(120)
"""


def _start(cluster, *args: str, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *args], env={**os.environ, **env},
                            stdout=subprocess.PIPE, text=True, start_new_session=True)


@pytest.fixture
def cluster(tmp_path):
    cluster = LocalFlinkCluster(tmp_path / "flink")
    started: list[int] = []
    yield cluster, started
    processes.terminate(started + list(cluster.orphans()), grace_s=2)


def _fake_taskmanager(cluster: LocalFlinkCluster, started: list[int], mark: str):
    tm = _start(cluster, "-c", FAKE_TM, TM_CLASS, "--configDir", str(cluster.conf_dir),
                env={TM_MARK: mark, "FLINK_CONF_DIR": str(cluster.conf_dir)})
    worker, jvm = map(int, tm.stdout.readline().split())
    started.extend([tm.pid, worker, jvm])
    return tm, worker, jvm


def test_the_workers_of_a_live_taskmanager_are_no_orphans(cluster):
    cluster, started = cluster
    tm, worker, jvm = _fake_taskmanager(cluster, started, "tm-live")
    assert cluster.taskmanager_pids() == [tm.pid]
    assert cluster.orphans() == {}
    assert cluster.reap_orphans() == {}
    assert processes.is_alive(worker) and processes.is_alive(jvm)


def test_the_workers_of_a_killed_taskmanager_are_found_and_ended(cluster):
    cluster, started = cluster
    tm, worker, jvm = _fake_taskmanager(cluster, started, "tm-dead")
    live_tm, live_worker, live_jvm = _fake_taskmanager(cluster, started, "tm-live")
    os.kill(tm.pid, signal.SIGKILL)
    tm.wait(10)
    assert cluster.taskmanager_pids() == [live_tm.pid]

    assert cluster.orphans() == {worker: "tm-dead", jvm: "tm-dead"}
    assert cluster.reap_orphans() == {worker: "tm-dead", jvm: "tm-dead"}
    assert not processes.is_alive(worker) and not processes.is_alive(jvm)
    # the other TaskManager's are untouched
    assert all(processes.is_alive(p) for p in (live_tm.pid, live_worker, live_jvm))
    assert cluster.orphans() == {}


def test_unmarked_processes_of_the_cluster_and_other_clusters_are_left_alone(cluster, tmp_path):
    cluster, started = cluster
    sleep = ["-c", "import time; time.sleep(120)"]
    # a `flink run` client: the cluster's conf, no TaskManager mark, no TaskManager ancestor
    client = _start(cluster, *sleep, env={"FLINK_CONF_DIR": str(cluster.conf_dir)})
    # the worker of another cluster's dead TaskManager
    other = _start(cluster, *sleep, env={TM_MARK: "tm-x", "FLINK_CONF_DIR": str(tmp_path / "other")})
    started.extend([client.pid, other.pid])
    time.sleep(0.2)
    assert cluster.orphans() == {}


def test_dead_taskmanagers_leave_the_pid_file(cluster):
    cluster, started = cluster
    tm, _, _ = _fake_taskmanager(cluster, started, "tm-live")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    pid_file = cluster.pid_file("taskexecutor")
    pid_file.parent.mkdir(parents=True)
    pid_file.write_text(f"{dead.pid}\n{tm.pid}\n")
    cluster.reap_orphans()
    assert pid_file.read_text() == f"{tm.pid}\n"
    os.kill(tm.pid, signal.SIGKILL)
    tm.wait(10)
    cluster.reap_orphans()
    assert not pid_file.exists()
