"""Both jobs on a real standalone Flink cluster (JobManager + TaskManager JVMs started
from the pyflink distribution) against the real Kafka broker: submission with `flink run`,
stop with a savepoint and resume from it, and recovery after a TaskManager is SIGKILLed.

Each test runs alone or in any order: ``serving_deployment`` first brings the module's
deployment to a job running and scoring with the model (submitting it, publishing the model
once), which every test leaves behind. The model is published once per deployment, so a job resumed from
a savepoint or recovered from a checkpoint must serve it from its state; the savepoint test
then publishes a second version of it (``deployment.model`` from then on), which the job
resumed from its state must record as replacing the first in the model repository. The
broadcast job is resumed with another parallelism (2 -> 1)."""
from __future__ import annotations

import dataclasses
import itertools
import threading
import time
import uuid

import pytest

import faults
from jobrunner import Collector, Deployment, assert_scored_by, settings_with_own_topics
import jobs
from modelserving.cli.models import read_repository
from modelserving.demo.training import DEMO_DATA_TYPE, descriptor_for
from modelserving.kafka import clients as client
from modelserving.local import http
from modelserving.local.waiting import wait_until
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


def repository_when(deployment: Deployment, what: str, ready) -> dict:
    """The deployment's data type in the model repository, as ``modelserving models history``
    reads it from the repository topic, once ``ready(history)`` holds (the job publishes its
    entries asynchronously)."""
    def read():
        history = read_repository(deployment.settings, timeout_s=30).history(DEMO_DATA_TYPE)
        return history if history is not None and ready(history) else None
    return wait_until(read, 90, what)


def accepted_on(history: dict, version: str, job: str) -> list[dict]:
    """The ACCEPTED deployments of ``version`` on ``job`` in ``history``, oldest first."""
    return [d for entry in history["versions"] if entry["version"] == version
            for d in entry["deployments"] if d["job"] == job and d["outcome"] == "ACCEPTED"]


def test_stop_with_savepoint_and_resume_keeps_the_model(serving_deployment):
    """The resumed job serves the model from its restored state, and its model repository
    state (the "repository-entries" keyed or broadcast state) is restored with it.

    After the resume a second version is published. The join retires the serving model's
    entry only if it finds it in its repository state (``RepositoryRecorder._retire``
    looks the previous model's descriptor id up in the entries, and records nothing when it
    is not there): a resumed job without the restored entries (all its state lost, or only
    the repository's) records the second version's acceptance but never the first one's
    retirement, so the first version's deployment keeps ``retired_ms`` None and the
    retirement assertion fails (checked: a job whose first switch after the resume forgot
    the entries failed it, for both jobs). A job that came back without its state but
    re-read the first version from the compacted models topic (source offsets lost or
    reset) would score with it just the same, which the first half cannot tell; it would
    record a new ACCEPTED deployment of it (a later ``deployed_ms``, under the same topic
    key), which the assertion on the first version's deployments (the same ones, at the
    same times, as before the savepoint) catches."""
    deployment, flink = serving_deployment, serving_deployment.cluster
    job_name, first = deployment.settings.job_name, deployment.model
    before = repository_when(deployment, f"version {first.version} serving on {job_name} in "
                             f"the repository",
                             lambda h: h["serving"].get(job_name) == first.version)
    deployed_before = accepted_on(before, first.version, job_name)
    assert deployed_before and deployed_before[-1]["retired_ms"] is None, before

    old_job = deployment.job_id
    started = time.monotonic()
    savepoint = flink.stop_with_savepoint(old_job)
    stopped = time.monotonic() - started
    assert flink.job_state(old_job) == "FINISHED"
    assert savepoint.startswith("file:") and "savepoint-" in savepoint
    if deployment.broadcast:
        deployment.parallelism = 1  # broadcast state is restored on every instance, whatever their number
    resumed_ms = int(time.time() * 1000)
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

    # a second version of the same model for the same data type: the resumed job retires
    # the first one's deployment, which only its restored repository state knows of
    second = dataclasses.replace(first, version=f"{first.version}-after-resume")
    deployment.model = second   # what serves from now on, for the tests after this one too
    client.publish_model(deployment.producer, deployment.settings.models_topic,
                         descriptor_for(second))
    # the job publishes the retirement, then the acceptance, through one producer to the
    # one broker: once the acceptance can be read, so can the retirement
    history = repository_when(deployment, f"version {second.version} accepted on {job_name} "
                              f"in the repository",
                              lambda h: accepted_on(h, second.version, job_name))
    [accepted_second] = accepted_on(history, second.version, job_name)
    assert accepted_second["deployed_ms"] >= resumed_ms and accepted_second["retired_ms"] is None
    deployed_after = accepted_on(history, first.version, job_name)
    # the same deployments of the first version as before the savepoint (one in a fresh
    # deployment): none added by the resumed job, none reset
    assert [d["deployed_ms"] for d in deployed_after] == \
        [d["deployed_ms"] for d in deployed_before], history
    assert deployed_after[:-1] == deployed_before[:-1]
    retired = deployed_after[-1]
    assert (retired["retired_by"], retired["retired_ms"]) == \
        (second.version, accepted_second["deployed_ms"]), history
    assert retired["retired_ms"] >= resumed_ms > retired["deployed_ms"]
    assert history["serving"] == {job_name: second.version}

    # the switch was recorded once the resumed job had installed it: records sent now are
    # scored by the second version
    rows = deployment.rows("b2", 30)
    deployment.send(rows)
    assert_scored_by(deployment.results(rows), second, rows)


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
