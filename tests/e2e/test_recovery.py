"""Recovery that does not slow down: five TaskManager SIGKILLs in a row on the standalone
cluster, which runs one TaskManager more than the job needs (a standby, as
``slotmanager.redundant-taskmanager-num`` keeps on Kubernetes or YARN); each kill is followed
by a replacement TaskManager (``start_taskmanager``), the next standby.

Asserted: the job (the same job id) restarts by itself and scores again after every kill,
and nothing a killed TaskManager started (its Python workers with their runner shell and
``tee``, the pypmml JVM of the worker serving the PMML model) outlives the next
``start_taskmanager``. Measured, never asserted: seconds from the kill to the job RUNNING
again (every subtask) and to the first probe scored after the kill, printed and written to
``artifacts/recovery/taskmanager-kills.json``. The restart strategy and heartbeat interval
that bound them are chosen in flink-conf/config.yaml."""
from __future__ import annotations

import json
import time
import uuid

import psutil
import pytest

import faults
from jobrunner import Deployment, settings_with_own_topics
from modelserving.local import processes
from modelserving.local.flink_cluster import TM_MARK
from modelserving.paths import PROJECT_ROOT
from protos import ModelType

pytestmark = pytest.mark.e2e

KILLS = 5
REPORT = PROJECT_ROOT / "artifacts" / "recovery" / "taskmanager-kills.json"


def left_behind_by(tm_pid: int) -> dict[int, str]:
    """What the TaskManager started and a SIGKILL of it would orphan: pid -> command."""
    found = {}
    for pid in processes.descendants(tm_pid):
        try:
            process = psutil.Process(pid)
            if processes.environ_get(process, TM_MARK):
                found[pid] = " ".join(process.cmdline())[:120]
        except psutil.Error:
            continue
    return found


def test_five_taskmanager_kills_in_a_row_recover_each_time_and_leave_no_orphans(
        flink, kafka_broker, trained_models):
    suffix = f"recovery-{uuid.uuid4().hex[:6]}"
    model = trained_models[ModelType.PMML]  # scored in a pypmml JVM beside the Python worker
    model_dir = next(m.path for m in trained_models.values() if not m.inline).parent
    settings = settings_with_own_topics(
        kafka_broker.bootstrap, suffix, compact_models=True, model_dirs=(str(model_dir),))
    deployment = Deployment(flink, settings, model, "jobs.keyed_job")
    kills: list[dict] = []
    orphaned: dict[int, str] = {}
    faults.start_taskmanager(flink, timeout=90)  # the standby: a restart never waits for a JVM boot
    try:
        deployment.ensure_serving()
        job_id = deployment.job_id
        for n in range(1, KILLS + 1):
            # a TaskManager serving the job now; its workers (and the pypmml JVM) are what it
            # leaves behind
            serving_tm = sorted(faults.job_taskmanagers(flink, job_id))[0]
            tm = faults.taskmanager_pid(flink, serving_tm)
            workers = left_behind_by(tm)
            assert any("pyflink" in cmd for cmd in workers.values()), workers
            killed_at, killed = time.time(), time.monotonic()
            faults.kill_taskmanager(flink, tm)
            flink.wait_restarted(job_id, since=killed_at, timeout=120)  # by itself, same job id
            running = time.monotonic() - killed
            deployment.wait_until_scored_by(model.name, timeout_s=120)
            scoring = time.monotonic() - killed
            # then a replacement, the next standby: on this 2-core machine a JVM booting
            # beside the restart would take the CPU the restarting tasks need; a real
            # cluster boots it on other hardware
            replacement = faults.start_taskmanager(flink, timeout=90)
            replaced = time.monotonic() - killed
            alive = {pid: cmd for pid, cmd in workers.items() if processes.is_alive(pid)}
            orphaned.update(alive)
            kills.append({"kill": n, "killed_pid": tm, "killed": serving_tm,
                          "replacement": replacement,
                          "workers_of_killed": len(workers), "left_alive": len(alive),
                          "replacement_registered_s": round(replaced, 1),
                          "running_again_s": round(running, 1),
                          "scoring_again_s": round(scoring, 1)})
            print(f"\n[timing] kill {n}: job RUNNING again {running:.1f} s, scoring again "
                  f"{scoring:.1f} s after the SIGKILL; replacement registered after "
                  f"{replaced:.1f} s ({len(workers)} processes of the killed "
                  f"TaskManager, {len(alive)} left alive)")
    finally:
        if kills:
            REPORT.parent.mkdir(parents=True, exist_ok=True)
            REPORT.write_text(json.dumps({
                "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "restart_strategy": {k: v for k, v in flink.written_configuration().items()
                                     if k.startswith(("restart-strategy", "heartbeat"))},
                "taskmanagers": "one serving, one standby; each kill is followed by a "
                                "replacement that becomes the next standby",
                "kills": kills}, indent=2) + "\n")
            worst = max(k["running_again_s"] for k in kills)
            print(f"\n[timing] {len(kills)} TaskManager kills -> job RUNNING again: "
                  f"{', '.join(str(k['running_again_s']) for k in kills)} s (worst {worst} s); "
                  f"written to {REPORT}")
        deployment.close()
        # leave the session's cluster as it was: one TaskManager
        for pid in sorted(flink.taskmanager_pids(), key=processes.started_at)[1:]:
            faults.kill_taskmanager(flink, pid)
        flink.reap_orphans()

    assert len(kills) == KILLS
    assert not orphaned, f"processes of killed TaskManagers still alive: {orphaned}"
    assert flink.orphans() == {}
