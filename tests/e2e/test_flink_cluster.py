"""Both jobs on a real standalone Flink cluster (JobManager + TaskManager JVMs started
from the pyflink distribution) against the real Kafka broker: submission with `flink run`,
stop with a savepoint and resume from it, and recovery after a TaskManager is SIGKILLed.

Each test runs alone or in any order: ``serving_deployment`` first brings the module's
deployment to a job running and scoring with the model (submitting it, publishing the model
once), which every test leaves behind. The model is published once per deployment, so a job resumed from
a savepoint or recovered from a checkpoint must serve it from its state. The broadcast job
is resumed with another parallelism (2 -> 1)."""
from __future__ import annotations

import itertools
import threading
import time
import uuid

import pytest

import faults
from jobrunner import Collector, Deployment, assert_scored_by, settings_with_own_topics
import jobs
from modelserving.local import http
from protos import ModelType

pytestmark = pytest.mark.e2e

JOB_MODULES = list(jobs.JOB_MODULES.values())


@pytest.fixture(scope="module", params=JOB_MODULES)
def deployment(request, flink, kafka_broker, trained_models):
    """Topics, a producer and a collector for one job module; no job yet."""
    suffix = f"cluster-{request.param.split('.')[-1]}-{uuid.uuid4().hex[:6]}"
    model = trained_models[ModelType.ONNX]
    model_dir = next(m.path for m in trained_models.values() if not m.inline).parent
    settings = settings_with_own_topics(
        kafka_broker.bootstrap, suffix, compact_models=True, model_dirs=(str(model_dir),))
    deployment = Deployment(flink, settings, model, request.param)
    try:
        yield deployment
    finally:
        deployment.close()


@pytest.fixture
def serving_deployment(deployment) -> Deployment:
    """The deployment with a job fully running and scoring with the model."""
    deployment.ensure_serving()
    return deployment


def test_submitted_job_scores_with_the_published_model(serving_deployment):
    deployment, flink = serving_deployment, serving_deployment.cluster
    job = flink.job(deployment.job_id)
    assert job["name"] == deployment.settings.job_name
    assert {v["parallelism"] for v in job["vertices"]} == {deployment.parallelism}
    assert any(j["jid"] == deployment.job_id and j["state"] == "RUNNING" for j in flink.list_jobs())

    rows = deployment.rows("a", 30)
    deployment.send(rows)
    assert_scored_by(deployment.results(rows), deployment.model, rows)
    assert not deployment.collector.dead_letters
    # the cluster's own Prometheus reporter ports (no other Flink's) expose the jobs' metrics
    ports = flink.prometheus_ports()
    assert ports and not set(ports) & set(range(9249, 9261)), ports  # not the shared default
    deployment.collector.wait_for(lambda c: "modelserving_records_scored" in prometheus_metrics(ports),
                                  60, f"the serving metrics on the Prometheus ports {ports}")


def prometheus_metrics(ports: list[int]) -> str:
    """Everything the Prometheus endpoints on ``ports`` serve."""
    text = []
    for port in ports:
        try:
            text.append(http.get_text(f"http://127.0.0.1:{port}/metrics", timeout_s=2))
        except OSError:
            pass
    return "".join(text)


def test_stop_with_savepoint_and_resume_keeps_the_model(serving_deployment):
    deployment, flink = serving_deployment, serving_deployment.cluster
    old_job = deployment.job_id
    started = time.monotonic()
    savepoint = flink.stop_with_savepoint(old_job)
    stopped = time.monotonic() - started
    assert flink.job_state(old_job) == "FINISHED"
    assert savepoint.startswith("file:") and "savepoint-" in savepoint
    if deployment.broadcast:
        deployment.parallelism = 1  # broadcast state is restored on every instance, whatever their number
    resumed = deployment.submit(savepoint=savepoint)
    print(f"\n[timing] stop with savepoint: {stopped:.1f} s; resume from it to all tasks "
          f"RUNNING: {resumed:.1f} s")
    assert deployment.job_id != old_job
    restored = (flink.checkpoints(deployment.job_id).get("latest") or {}).get("restored") or {}
    assert restored.get("is_savepoint") and restored.get("external_path") == savepoint
    job = flink.job(deployment.job_id)
    assert {v["parallelism"] for v in job["vertices"]} == {deployment.parallelism}

    # only data: the model must come from the restored state
    rows = deployment.rows("b", 30)
    deployment.send(rows)
    assert_scored_by(deployment.results(rows), deployment.model, rows)


def test_killed_taskmanager_job_recovers_from_its_checkpoint(serving_deployment):
    deployment, flink = serving_deployment, serving_deployment.cluster
    job_id = deployment.job_id
    # the model serves now: a checkpoint triggered from now on holds it (an id past the one
    # that may be under way)
    latest = (flink.latest_checkpoint(job_id) or {}).get("id", 0)
    checkpoint = flink.wait_checkpoint(job_id, after=latest + 1, timeout=60)

    sent_at: dict[str, float] = {}
    stop = threading.Event()
    failures: list[BaseException] = []

    def keep_sending() -> None:  # ~20 records/s until told to stop
        try:
            for i in itertools.count():
                if stop.is_set():
                    return
                row = deployment.row("c", i)
                sent_at[row.record_id] = time.time()
                deployment.send([row])
                time.sleep(0.05)
        except BaseException as exc:  # noqa: BLE001 - reported by the test below
            failures.append(exc)

    sender = threading.Thread(target=keep_sending, daemon=True)
    sender.start()
    try:
        deployment.collector.wait_for(
            lambda c: sum(r.recordId.startswith("c-") for r in c.results) >= 10, 60,
            "records flowing before the kill")
        old_tms = flink.taskmanager_pids()
        killed_at = time.time()
        killed_mono = time.monotonic()
        pid = faults.kill_taskmanager(flink)
        assert pid in old_tms and pid not in flink.taskmanager_pids()
        faults.start_taskmanager(flink, timeout=90)
        assert flink.taskmanager_pids() and pid not in flink.taskmanager_pids()

        flink.wait_restarted(job_id, since=killed_at, timeout=180)  # by itself, same job id
        running_again = time.monotonic() - killed_mono

        def first_new(c: Collector):
            return any(r.recordId in sent_at and sent_at[r.recordId] > killed_at for r in c.results)
        deployment.collector.wait_for(first_new, 120, "a result for a record sent after the kill")
        first_result = time.monotonic() - killed_mono
        print(f"\n[timing] TaskManager SIGKILL -> job RUNNING again: {running_again:.1f} s; "
              f"-> first result of a record sent after the kill: {first_result:.1f} s "
              f"(restarted from checkpoint {checkpoint['id']} or later)")
    finally:
        stop.set()
        sender.join(10)
    assert not failures, failures

    # Every record sent (before, during and after the failure) is answered, at least once,
    # by the model of before the failure, which nobody published again.
    rows = deployment.rows("c", len(sent_at))
    assert_scored_by(deployment.results(rows, timeout_s=120), deployment.model, rows)
    assert flink.job_state(job_id) == "RUNNING"
    restored = (flink.checkpoints(job_id).get("latest") or {}).get("restored") or {}
    assert restored and not restored.get("is_savepoint") and restored["id"] >= checkpoint["id"]
