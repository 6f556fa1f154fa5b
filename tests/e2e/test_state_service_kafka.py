"""The state service against the real broker: it reads the compacted state topic from the
beginning, follows updates and tombstones, shows only committed transactions, and a new
instance rebuilds the same answer from the topic; on a SASL (SCRAM) broker it logs in with
the settings' credentials, and a refused login is said in /health."""
from __future__ import annotations

import json
import shutil
import urllib.error
import urllib.request
import uuid

import pytest
from kafka import KafkaProducer

from jobs.kafka_config import kafka_python
from jobs.settings import Settings
from modelserving.kafka import clients
from modelserving.kafka.admin import ensure_topics
from modelserving.local.processes import free_ports
from modelserving.local.waiting import wait_until
from modelserving.state.service import StateService
from protos import ModelStats, ModelType

pytestmark = pytest.mark.e2e

T0 = 1_700_000_000_000
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def get(url: str):
    try:
        with OPENER.open(url, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def eventually(probe, timeout_s: float = 20.0, what: str = "condition"):
    return wait_until(probe, timeout_s, what, interval_s=0.1)


def stats(job, data_type, part=-1, subtask=0, model="lr", version="1", since=T0, usage=0,
          total_us=0.0, min_us=0.0, max_us=0.0, model_type=ModelType.PMML) -> bytes:
    return ModelStats(job=job, dataType=data_type, part=part, subtask=subtask, hasModel=True,
                      modelName=model, modelVersion=version, modelType=model_type,
                      modelId=f"{model}-{version}", sinceMs=since, usage=usage, totalMicros=total_us,
                      minMicros=min_us, maxMicros=max_us, publishedMs=since + 500).SerializeToString()


def send(producer: KafkaProducer, topic: str, key: str, value: bytes | None) -> None:
    producer.send(topic, key=key.encode(), value=value).get(30)


def models(service: StateService) -> dict:
    status, answer = get(service.url + "/models")
    assert status == 200
    answer.pop("as_of_ms")
    answer.pop("history_complete_since_ms")
    return answer


def settings_for(broker, topic: str = "model-state") -> Settings:
    """The settings of a test's clients: the broker (with its security) and the test's topic."""
    return broker.client_settings().replace(state_topic=topic)


@pytest.fixture
def topic(kafka_broker):
    name = f"model-state-{uuid.uuid4().hex[:8]}"
    ensure_topics(settings_for(kafka_broker, name), [], compacted=[name])
    return name


@pytest.fixture
def producer(kafka_broker):
    kafka = clients.producer(settings_for(kafka_broker), linger_ms=2)
    yield kafka
    kafka.close()


def test_serves_the_topic_and_rebuilds_after_restart(kafka_broker, topic, producer):
    send(producer, topic, "keyed/wine", stats("keyed", "wine", usage=10, total_us=20_000.0,
                                              min_us=1000.0, max_us=3000.0))
    send(producer, topic, "keyed/wine", stats("keyed", "wine", usage=100, total_us=150_000.0,
                                              min_us=900.0, max_us=3000.0))
    send(producer, topic, "broadcast/wine/0", stats("broadcast", "wine", part=0, subtask=0, usage=4,
                                                    total_us=4000.0, min_us=800.0, max_us=1200.0))
    send(producer, topic, "broadcast/wine/1", stats("broadcast", "wine", part=1, subtask=1, usage=6,
                                                    total_us=9000.0, min_us=1000.0, max_us=2000.0))
    send(producer, topic, "keyed/iris", stats("keyed", "iris", model="tree"))

    first = StateService(settings_for(kafka_broker, topic), port=0).start()
    try:
        assert first.wait_ready(30), get(first.url + "/health")
        status, health = get(first.url + "/health")
        assert status == 200 and health["status"] == "ok" and health["view"]["messages"] == 5

        answer = models(first)
        wine = answer["data_types"]["wine"]["jobs"]
        assert wine["keyed"]["model"]["name"] == "lr" and wine["keyed"]["stats"]["usage"] == 100
        assert wine["keyed"]["stats"]["mean_ms"] == 1.5
        assert wine["broadcast"]["stats"] == {"usage": 10, "mean_ms": 1.3, "min_ms": 0.8, "max_ms": 2.0,
                                              "total_ms": 13.0, "no_model": 0, "dead_letters": 0}
        assert wine["broadcast"]["jitter"] is False
        assert sorted(answer["data_types"]) == ["iris", "wine"]

        # a new model reaches one broadcast part: visible, with jitter
        send(producer, topic, "broadcast/wine/1", stats("broadcast", "wine", part=1, subtask=1, model="mlp",
                                                        version="2", since=T0 + 60_000, usage=2,
                                                        total_us=5000.0, min_us=2000.0, max_us=3000.0,
                                                        model_type=ModelType.ONNX))
        def broadcast_on_mlp():
            broadcast = get(first.url + "/state/wine")[1]["jobs"]["broadcast"]
            return broadcast if broadcast["model"]["name"] == "mlp" else None

        broadcast = eventually(broadcast_on_mlp, what="the new broadcast model")
        assert broadcast["jitter"] is True and broadcast["stats"]["usage"] == 2
        assert [(i["subtask"], i["model"]) for i in broadcast["instances"]] == [(0, "lr v1"), (1, "mlp v2")]

        # the keyed job switches too; the history shows both models, newest first
        send(producer, topic, "keyed/wine", stats("keyed", "wine", model="mlp", version="2", since=T0 + 61_000,
                                                  usage=5, model_type=ModelType.ONNX))
        eventually(lambda: get(first.url + "/state/wine")[1]["jobs"]["keyed"]["stats"]["usage"] == 5,
                   what="the keyed switch")
        status, history = get(first.url + "/history/wine")
        assert status == 200
        keyed = [(h["model"], h["type"], h["usage"]) for h in history["models"] if h["job"] == "keyed"]
        assert keyed == [("mlp v2", "ONNX", 5), ("lr v1", "PMML", 100)]

        # a tombstone removes a data type
        send(producer, topic, "keyed/iris", None)
        eventually(lambda: get(first.url + "/state/iris")[0] == 404, what="the tombstone")
        before_restart = models(first)
    finally:
        first.stop()

    second = StateService(settings_for(kafka_broker, topic), port=0).start()
    try:
        assert second.wait_ready(30), get(second.url + "/health")
        assert models(second) == before_restart
        status, history = get(second.url + "/history/wine")
        assert status == 200 and history["models"][0]["model"] == "mlp v2"  # best effort after a restart
    finally:
        second.stop()


def test_only_committed_transactions_are_shown(kafka_broker, topic, producer):
    send(producer, topic, "keyed/wine", stats("keyed", "wine", usage=1))
    transactional = KafkaProducer(**kafka_python(settings_for(kafka_broker, topic),
                                                 transactional_id=f"state-test-{uuid.uuid4().hex[:6]}"))
    try:
        transactional.init_transactions()
        transactional.begin_transaction()
        transactional.send(topic, key=b"keyed/wine", value=stats("keyed", "wine", usage=666))
        transactional.flush()
        transactional.abort_transaction()
        transactional.begin_transaction()
        transactional.send(topic, key=b"keyed/wine", value=stats("keyed", "wine", usage=7))
        transactional.commit_transaction()
    finally:
        transactional.close()
    with StateService(settings_for(kafka_broker, topic), port=0) as service:
        assert service.wait_ready(30), get(service.url + "/health")
        eventually(lambda: get(service.url + "/state/wine")[1]["jobs"]["keyed"]["stats"]["usage"] == 7,
                   what="the committed update")
        assert service.view.health()["messages"] == 2  # the aborted record never reached the view


def test_waits_for_a_missing_topic(kafka_broker, producer):
    name = f"model-state-{uuid.uuid4().hex[:8]}"
    with StateService(settings_for(kafka_broker, name), port=0) as service:
        status, health = get(service.url + "/health")
        assert status == 503 and health["status"] in ("starting", "connecting", "waiting_for_topic")
        eventually(lambda: get(service.url + "/health")[1]["status"] == "waiting_for_topic",
                   what="waiting_for_topic")
        ensure_topics(settings_for(kafka_broker, name), [], compacted=[name])
        send(producer, name, "keyed/wine", stats("keyed", "wine", usage=3))
        assert service.wait_ready(30), get(service.url + "/health")
        eventually(lambda: get(service.url + "/models")[1]["count"] == 1, what="the first message")
        assert get(service.url + "/health")[0] == 200


# -- a secured broker ------------------------------------------------------------------------

@pytest.fixture
def scram_broker(tmp_path):
    """A broker of this test only whose client listener wants SCRAM-SHA-256 logins."""
    if shutil.which("java") is None:
        pytest.skip("java (17+) is not on PATH: the e2e tests need it to run the Kafka broker")
    from modelserving.local.kafka_broker import LocalKafka

    port, controller_port = free_ports(2)
    broker = LocalKafka(tmp_path / "kafka", port=port, controller_port=controller_port, heap="384m",
                        die_with_parent=True, scram_users={"stats-reader": "stats-reader-secret"})
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


def test_logs_in_with_the_settings_credentials(scram_broker):
    name = f"model-state-{uuid.uuid4().hex[:8]}"
    settings = settings_for(scram_broker, name)
    assert settings.security_protocol == "SASL_PLAINTEXT" and settings.sasl_username == "stats-reader"
    ensure_topics(settings, [], compacted=[name])
    producer = clients.producer(settings)
    try:
        send(producer, name, "keyed/wine", stats("keyed", "wine", usage=12))
    finally:
        producer.close()

    with StateService(settings, port=0) as service:
        assert service.wait_ready(30), get(service.url + "/health")
        eventually(lambda: get(service.url + "/state/wine")[1]["jobs"]["keyed"]["stats"]["usage"] == 12,
                   what="the statistics read over SASL")

    refused = settings.replace(sasl_password="not-the-password")
    with StateService(refused, port=0) as service:
        error = eventually(lambda: get(service.url + "/health")[1]["feed"]["error"], 30,
                           "the refused login in /health")
        assert "authentication failed for user 'stats-reader'" in error, error
        assert "not-the-password" not in json.dumps(get(service.url + "/health")[1])
        status, health = get(service.url + "/health")
        assert status == 503 and not health["ready"] and get(service.url + "/models")[1]["count"] == 0
