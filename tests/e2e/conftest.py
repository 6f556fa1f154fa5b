"""Fixtures of the end-to-end tier: a real local Kafka broker (KRaft) for the session."""
from __future__ import annotations

import shutil
import sys
import time
import uuid
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from jobrunner import (MAX_MODEL_BYTES, Collector, JobProcess, Scenario,  # noqa: E402
                       settings_with_own_topics)

import jobs  # noqa: E402
from modelserving.kafka import clients as client  # noqa: E402
from modelserving.local.processes import free_port, free_port_range, free_ports  # noqa: E402

JOB_MODULES = list(jobs.JOB_MODULES.values())


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory):
    """A real single-node Kafka broker on free 127.0.0.1 ports, started once per session."""
    if shutil.which("java") is None:
        pytest.skip("java (17+) is not on PATH: the e2e tests need it to run the Kafka broker "
                    "(apt-get install openjdk-17-jre-headless)")
    from modelserving.local.kafka_broker import LocalKafka

    port, controller_port = free_ports(2)
    broker = LocalKafka(tmp_path_factory.mktemp("kafka"), port=port, controller_port=controller_port,
                        heap="384m", die_with_parent=True)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


def pytest_generate_tests(metafunc):
    """Run every test that uses ``serving`` once per job, or per job in the test module's
    own ``JOB_MODULES``."""
    if "serving" in metafunc.fixturenames:
        modules = getattr(metafunc.module, "JOB_MODULES", JOB_MODULES)
        metafunc.parametrize("serving", modules, indirect=True, scope="module")


@pytest.fixture(scope="module")
def serving(request, kafka_broker, trained_models, tmp_path_factory):
    """A running job with its own topics, a producer and a collector of its outputs; the
    test module's ``JOB_SETTINGS`` (if any) override the job's settings."""
    job = request.param.rsplit(".", 1)[-1]
    suffix = f"{job}-{uuid.uuid4().hex[:6]}"
    model_dir = next(m.path for m in trained_models.values() if not m.inline).parent
    settings = settings_with_own_topics(
        kafka_broker.bootstrap, suffix, stats_interval_ms=1000, parallelism=2,
        checkpoint_interval_ms=2000, rest_port=0, model_dirs=(str(model_dir),),
        max_model_bytes=MAX_MODEL_BYTES, **getattr(request.module, "JOB_SETTINGS", {}))
    process = JobProcess(request.param, settings, tmp_path_factory.mktemp(job) / "job.log").start()
    producer = client.producer(settings)
    collector = Collector(settings)
    # the broadcast join holds a copy of the model on every instance: all must have switched
    instances = settings.parallelism if job == "broadcast_job" else 1
    yield Scenario(settings, producer, collector, process, trained_models, instances)
    collector.stop()
    producer.close()
    process.stop()


@pytest.fixture(scope="session")
def flink(tmp_path_factory):
    """A standalone cluster on free ports in a temporary directory, for the session. Its
    Prometheus reporter gets a free port range of its own (the JobManager, a TaskManager and
    room for a replacement TaskManager), so no other Flink on the host answers for it."""
    if shutil.which("java") is None:
        pytest.skip("java (17+) is not on PATH: the standalone Flink cluster needs it")
    from modelserving.local.flink_cluster import LocalFlinkCluster

    cluster = LocalFlinkCluster(tmp_path_factory.mktemp("flink"), rest_port=free_port(), slots=2,
                                prometheus_ports=free_port_range(4))
    started = time.monotonic()
    cluster.start(timeout=180)
    print(f"\n[timing] cluster start (1 JobManager, 1 TaskManager registered): "
          f"{time.monotonic() - started:.1f} s")
    try:
        yield cluster
    finally:
        cluster.stop()
        assert not cluster.jobmanager_pids() and not cluster.taskmanager_pids()
