"""Every component through a SASL_PLAINTEXT listener with SCRAM-SHA-256, credentials given
only as settings: topic admin, the clients, the benchmark's load generator, the CLI, the state
service and a real job (results and statistics). A wrong password is one clear line, soon.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from jobs.settings import Settings
from modelserving.demo.training import DEMO_DATA_TYPE, demo_rows, descriptor_for
from modelserving.errors import KafkaToolError
from modelserving.kafka import clients
from modelserving.kafka.admin import create_topics, ensure_topics
from modelserving.local.http import get_json
from modelserving.local.kafka_broker import SCRAM_MECHANISM, LocalKafka
from modelserving.local.processes import free_ports
from modelserving.local.waiting import wait_until
from modelserving.paths import PROJECT_ROOT
from protos import DeadLetter, ModelStats, ModelType, ServingResult

pytestmark = pytest.mark.e2e

USERS = {"alice": "alice-secret", "bob": "bob-secret"}
SCRAM_MODULE = "org.apache.kafka.common.security.scram.ScramLoginModule"


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    """A broker of its own whose only client listener wants SCRAM-SHA-256 logins."""
    if shutil.which("java") is None:
        pytest.skip("java (17+) is not on PATH: the secured broker needs it")
    port, controller_port = free_ports(2)
    broker = LocalKafka(tmp_path_factory.mktemp("secured-kafka"), port=port,
                        controller_port=controller_port, heap="384m", die_with_parent=True,
                        scram_users=USERS)
    broker.start(timeout=180)
    try:
        yield broker
    finally:
        broker.stop()


def security_environ(broker: LocalKafka, user: str = "alice", password: str | None = None) -> dict:
    """The variables a user sets to reach the secured broker."""
    return {"MODELSERVING_BOOTSTRAP_SERVERS": broker.bootstrap,
            "MODELSERVING_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
            "MODELSERVING_SASL_MECHANISM": SCRAM_MECHANISM,
            "MODELSERVING_SASL_USERNAME": user,
            "MODELSERVING_SASL_PASSWORD": USERS[user] if password is None else password}


def env_settings(broker: LocalKafka, topics: str, password: str | None = None, **values) -> Settings:
    """Settings from variables only, with topics of their own (``topics`` names them)."""
    return Settings.from_sources([], environ={**security_environ(broker, password=password),
                                              **topic_environ(topics)}, **values)


def file_settings(broker: LocalKafka, tmp_path: Path, topics: str, **values) -> Settings:
    """Settings whose credentials (bob's) are in a Java properties file, as Kafka's tools take it."""
    properties = tmp_path / f"{topics}.properties"
    properties.write_text(
        "security.protocol=SASL_PLAINTEXT\n"
        f"sasl.mechanism={SCRAM_MECHANISM}\n"
        f"sasl.jaas.config={SCRAM_MODULE} required \\\n"
        f'    username="bob" \\\n    password="{USERS["bob"]}";\n')
    return Settings.from_sources(["--bootstrap-servers", broker.bootstrap,
                                  "--kafka-properties-file", str(properties)],
                                 environ=topic_environ(topics), **values)


def topic_environ(topics: str) -> dict:
    return {"MODELSERVING_DATA_TOPIC": f"{topics}-data", "MODELSERVING_MODELS_TOPIC": f"{topics}-models",
            "MODELSERVING_RESULTS_TOPIC": f"{topics}-results",
            "MODELSERVING_DEAD_LETTER_TOPIC": f"{topics}-dead",
            "MODELSERVING_STATE_TOPIC": f"{topics}-state"}


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def read(settings: Settings, topic: str, expected: int, timeout_s: float = 30) -> list:
    """At least ``expected`` records of ``topic`` from the beginning."""
    consumer = clients.consumer(settings, [topic])
    records: list = []
    try:
        def enough():
            for batch in consumer.poll(timeout_ms=500).values():
                records.extend(batch)
            return len(records) >= expected
        wait_until(enough, timeout_s, f"{expected} records on {topic}")
    finally:
        consumer.close()
    return records


class Outputs(clients.OutputFollower):
    """Results and dead letters as they come."""

    def __init__(self, settings: Settings):
        super().__init__(settings)
        self.results: list[ServingResult] = []
        self.dead_letters: list[DeadLetter] = []

    def handle(self, message) -> None:
        (self.dead_letters if isinstance(message, DeadLetter) else self.results).append(message)


def scored(record_id: str, model_name: str = "m") -> bytes:
    return ServingResult(status=ServingResult.SCORED, dataType="secured", recordId=record_id,
                         modelName=model_name, modelType=ModelType.ONNX, score=1.0,
                         servedMs=int(time.time() * 1000)).SerializeToString()


# -- clients -----------------------------------------------------------------------------------

@pytest.mark.parametrize("credentials", ["variables", "properties file"])
def test_topic_admin_producer_consumer_and_follower(secured, tmp_path, credentials):
    topics = unique("clients")
    settings = (env_settings(secured, topics) if credentials == "variables"
                else file_settings(secured, tmp_path, topics))
    create_topics(settings)
    create_topics(settings)  # existing topics are fine

    producer = clients.producer(settings)
    outputs = Outputs(settings)
    outputs.start()
    try:
        sent = clients.publish_records(producer, settings.data_topic, demo_rows()[:5])
        assert sent == 5
        producer.send(settings.results_topic, scored("r-1")).get(30)
        producer.send(settings.dead_letter_topic, DeadLetter(reason="bad").SerializeToString()).get(30)
        records = read(settings, settings.data_topic, expected=5)
        assert len(records) == 5
        wait_until(lambda: outputs.results and outputs.dead_letters, 30, "the follower's messages")
        assert [r.recordId for r in outputs.results] == ["r-1"]
        assert outputs.error is None
    finally:
        outputs.stop()
        producer.close()


def test_bench_load_generator_and_collector(secured):
    from modelserving.bench.workload import RecordTemplate, ResultCollector, new_producer, produce

    settings = env_settings(secured, unique("bench"))
    ensure_topics(settings, [settings.data_topic, settings.results_topic])
    collector = ResultCollector(settings, settings.results_topic)
    collector.start()
    producer = new_producer(settings)
    try:
        assert collector.ready.wait(60), "the collector got no partitions"
        template = RecordTemplate("secured", [{"a": 1.0}])
        sent = produce(producer, settings.data_topic, template, "t1", count=20)
        assert sent.count == 20
        assert len(read(settings, settings.data_topic, expected=20)) == 20

        # the collector reads from the end: send until what it reads shows up
        taken: list = []

        def collected():
            producer.produce(settings.results_topic, scored("c-1"))
            producer.flush(10)
            taken.extend(collector.take())
            return taken
        wait_until(collected, 60, "results read by the collector", interval_s=1)
        assert ServingResult.FromString(taken[0][1]).recordId == "c-1"
    finally:
        producer.flush(10)
        collector.stop()


# -- the CLI -----------------------------------------------------------------------------------

def modelserving(*args: str, environ: dict, timeout_s: float = 120) -> subprocess.CompletedProcess:
    """The installed ``modelserving`` command with only these MODELSERVING_* variables."""
    script = Path(sys.executable).parent / "modelserving"
    command = [str(script)] if script.exists() else [
        sys.executable, "-c", "import sys; from modelserving.cli import main; sys.exit(main())"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELSERVING_")}
    return subprocess.run(command + list(args), cwd=PROJECT_ROOT, env={**env, **environ},
                          capture_output=True, text=True, timeout=timeout_s)


def test_cli_creates_topics_publishes_and_follows(secured):
    topics = unique("cli")
    environ = {**security_environ(secured), **topic_environ(topics)}
    settings = env_settings(secured, topics)

    created = modelserving("topics", "create", environ=environ)
    assert created.returncode == 0, created.stderr
    assert f"topics ready on {secured.bootstrap}: {topics}-data" in created.stdout

    published = modelserving("publish", "records", "--count", "5", "--rate", "0", environ=environ)
    assert published.returncode == 0, published.stderr
    assert f"published 5 records to {topics}-data" in published.stdout
    assert len(read(settings, settings.data_topic, expected=5)) == 5

    producer = clients.producer(settings)
    try:
        producer.send(settings.results_topic, scored("cli-1", "secured-model")).get(30)
    finally:
        producer.close()
    followed = modelserving("follow", "--from-beginning", "--timeout", "5", environ=environ)
    assert followed.returncode == 0, followed.stderr
    assert "record cli-1" in followed.stdout and "secured-model" in followed.stdout


# -- a wrong password ------------------------------------------------------------------------

def test_cli_with_a_wrong_password_fails_in_one_line(secured):
    environ = {**security_environ(secured, password="not-the-password"),
               **topic_environ(unique("wrong"))}
    started = time.monotonic()
    failed = modelserving("topics", "create", environ=environ, timeout_s=60)
    took = time.monotonic() - started
    assert failed.returncode != 0
    assert took < 30, f"took {took:.0f} s"
    lines = failed.stderr.strip().splitlines()
    assert len(lines) == 1, failed.stderr
    assert "authentication failed for user 'alice'" in lines[0]
    assert "not-the-password" not in failed.stderr + failed.stdout


def test_client_functions_with_a_wrong_password_raise_kafka_tool_errors(secured):
    settings = env_settings(secured, unique("wrong"), password="not-the-password")
    attempts = {
        "create_topics": lambda: create_topics(settings),
        "producer": lambda: clients.producer(settings),
        "consumer": lambda: clients.consumer(settings, [settings.results_topic]),
        "OutputFollower": lambda: Outputs(settings).start(),
    }
    for name, attempt in attempts.items():
        started = time.monotonic()
        with pytest.raises(KafkaToolError) as caught:
            attempt()
        message = str(caught.value)
        assert "authentication failed for user 'alice' (SCRAM-SHA-256)" in message, name
        assert "\n" not in message and "not-the-password" not in message, name
        assert time.monotonic() - started < 15, name


# -- a job and the state service -------------------------------------------------------------

def test_job_serves_and_publishes_statistics_read_by_the_state_service(secured, trained_models,
                                                                       tmp_path):
    from modelserving.local.job_process import JobProcess
    from modelserving.state.service import StateService

    model = trained_models[ModelType.ONNX]
    topics = unique("job")
    # the job logs in as bob (properties file), everyone else as alice (variables)
    job_settings = file_settings(
        secured, tmp_path, topics, parallelism=1, checkpoint_interval_ms=2000,
        stats_interval_ms=1000, data_starting_offsets="earliest",
        model_dirs=(str(Path(model.path).parent),)).for_job(topics)
    settings = env_settings(secured, topics)
    create_topics(settings)

    job = JobProcess("jobs.keyed_job", job_settings, tmp_path / "job.log")
    outputs = Outputs(settings)
    producer = clients.producer(settings)
    service = None
    try:
        job.start()
        outputs.start()
        clients.publish_model(producer, settings.models_topic, descriptor_for(model))
        rows = demo_rows()
        sent = iter(range(10_000))

        def scored_by_model():
            """Probe with a record at a time until one comes back scored by the model."""
            if any(r.modelName == model.name for r in outputs.results):
                return True
            row = rows[next(sent) % len(rows)]
            clients.publish_records(producer, settings.data_topic, [row])
            return False
        wait_until(scored_by_model, 180, f"a record scored by {model.name}", interval_s=1,
                   details=lambda: f"{len(outputs.results)} results, {len(outputs.dead_letters)} "
                                   f"dead letters; job log:\n{job.log_tail()}")
        batch = [clients.Row(DEMO_DATA_TYPE, r.names, r.values, f"batch-{i}")
                 for i, r in enumerate(rows[:10])]
        clients.publish_records(producer, settings.data_topic, batch)
        wait_until(lambda: {r.recordId for r in outputs.results} >= {r.record_id for r in batch},
                   60, "the batch's results")
        results = {r.recordId: r for r in outputs.results}
        assert all(results[r.record_id].status == ServingResult.SCORED and
                   results[r.record_id].modelName == model.name for r in batch)

        # the statistics are on the state topic...
        def statistics():
            stats = [ModelStats.FromString(r.value) for r in read(settings, settings.state_topic, 1)]
            return [s for s in stats if s.job == job_settings.job_name and s.modelName == model.name
                    and s.usage > 0]
        assert wait_until(statistics, 60, "the job's statistics on the state topic", interval_s=1)

        # ...and the state service reads them through the secured listener too
        service = StateService(settings, port=0).start()
        assert service.wait_ready(60)

        def served_state():
            try:
                entry = get_json(f"{service.url}/state/{DEMO_DATA_TYPE}", timeout_s=5)["jobs"]
            except (OSError, KeyError):
                return None
            entry = entry.get(job_settings.job_name)
            return entry if entry and entry["model"]["name"] == model.name and \
                entry["stats"]["usage"] > 0 else None
        entry = wait_until(served_state, 60, "the job's state in the state service")
        assert entry["model"]["type"] == "ONNX"
    finally:
        if service is not None:
            service.stop()
        outputs.stop()
        producer.close()
        job.stop()
