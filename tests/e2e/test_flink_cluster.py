"""Both jobs on a real standalone Flink cluster (JobManager + TaskManager JVMs started
from the pyflink distribution) against the real Kafka broker: submission with `flink run`,
stop with a savepoint and resume from it, and recovery after a TaskManager is SIGKILLed.

The three tests are one scenario, in order: (a) submits the job and publishes the model,
(b) and (c) rely on the model being in the job's state from then on and never publish it
again. The broadcast job is resumed with another parallelism (2 -> 1)."""
from __future__ import annotations

import itertools
import threading
import time
import uuid

import pytest

from jobs.settings import Settings
from modelserving.kafka import clients as client
from modelserving.kafka.admin import ensure_topics
from modelserving.demo.training import descriptor_for
from protos import ModelType

from jobrunner import Collector, Deployment, assert_scored_by

pytestmark = pytest.mark.e2e

JOB_MODULES = ["jobs.keyed_job", "jobs.broadcast_job"]


@pytest.fixture(scope="module", params=JOB_MODULES)
def deployment(request, flink, kafka_broker, trained_models):
    suffix = f"cluster-{request.param.split('.')[-1]}-{uuid.uuid4().hex[:6]}"
    model = trained_models[ModelType.ONNX]
    model_dir = next(m.path for m in trained_models.values() if not m.inline).parent
    settings = Settings.from_sources(
        [], environ={}, bootstrap_servers=kafka_broker.bootstrap, data_topic=f"mdata-{suffix}",
        models_topic=f"models-{suffix}", results_topic=f"results-{suffix}",
        dead_letter_topic=f"dead-{suffix}", state_topic=f"state-{suffix}",
        model_dirs=(str(model_dir),)).for_job(suffix)
    ensure_topics(settings.bootstrap_servers,
                  [settings.data_topic, settings.results_topic, settings.dead_letter_topic],
                  compacted=[settings.models_topic, settings.state_topic], partitions=2)
    deployment = Deployment(flink, settings, model, request.param)
    try:
        yield deployment
    finally:
        deployment.close()


def test_submitted_job_scores_with_the_published_model(deployment):
    flink = deployment.cluster
    took = deployment.submit()
    print(f"\n[timing] flink run to all tasks RUNNING: {took:.1f} s")
    job = flink.job(deployment.job_id)
    assert job["name"] == deployment.settings.job_name
    assert {v["parallelism"] for v in job["vertices"]} == {2}
    assert any(j["jid"] == deployment.job_id and j["state"] == "RUNNING" for j in flink.list_jobs())

    client.publish_model(deployment.producer, deployment.settings.models_topic,
                         descriptor_for(deployment.model))
    deployment.model_published = True
    deployment.wait_until_scored_by(deployment.model.name)
    rows = deployment.rows("a", 30)
    deployment.send(rows)
    assert_scored_by(deployment.results(rows), deployment.model, rows)
    assert not deployment.collector.dead_letters
    # the Prometheus reporter of flink-conf/ exposes the jobs' own metrics
    deployment.collector.wait_for(lambda c: "modelserving_records_scored" in prometheus_metrics(),
                                  60, "the serving metrics on a Prometheus endpoint")


def prometheus_metrics() -> str:
    """Everything the cluster's Prometheus endpoints (ports 9249-9260) serve."""
    import urllib.request
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    text = []
    for port in range(9249, 9261):
        try:
            with opener.open(f"http://127.0.0.1:{port}/metrics", timeout=2) as answer:
                text.append(answer.read().decode())
        except OSError:
            pass
    return "".join(text)


def test_stop_with_savepoint_and_resume_keeps_the_model(deployment):
    assert deployment.model_published, "needs the job and model of the first test"
    flink = deployment.cluster
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


def test_killed_taskmanager_job_recovers_from_its_checkpoint(deployment):
    assert deployment.model_published, "needs the job and model of the first test"
    flink = deployment.cluster
    job_id = deployment.job_id
    checkpoint = flink.wait_checkpoint(job_id, timeout=60)  # the model is in a checkpoint now

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
        pid = flink.kill_taskmanager()
        assert pid in old_tms and pid not in flink.taskmanager_pids()
        flink.start_taskmanager(timeout=90)
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
