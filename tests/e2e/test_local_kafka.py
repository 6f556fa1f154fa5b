"""The local KRaft broker is a real Kafka: messages, compaction config, transactions, restarts."""
from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from kafka import KafkaConsumer, KafkaProducer
from kafka.admin import ConfigResource, ConfigResourceType

from jobs.kafka_config import kafka_python
from modelserving.local.kafka_broker import LocalKafka
from modelserving.local.processes import free_ports

pytestmark = pytest.mark.e2e

PROJECT_ROOT = Path(__file__).resolve().parents[2]
BIG = 5 * 1024 * 1024  # above Kafka's 1 MB default, below the broker's 20 MB limit


def _topic(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _read_all(broker: LocalKafka, topic: str, expected: int, timeout: float = 20, **configs) -> list:
    """Every record of ``topic`` from the beginning, once ``expected`` were seen (or timeout)."""
    consumer = KafkaConsumer(**kafka_python(
        broker.client_settings(), group_id=None, auto_offset_reset="earliest",
        enable_auto_commit=False, max_partition_fetch_bytes=8 * 1024 * 1024, **configs))
    try:
        consumer.subscribe([topic])
        records, deadline = [], time.monotonic() + timeout
        while time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=500).values():
                records.extend(batch)
            if len(records) >= expected:
                # one more poll: anything beyond `expected` would be a bug we want to see
                for batch in consumer.poll(timeout_ms=300).values():
                    records.extend(batch)
                break
        return records
    finally:
        consumer.close()


def _producer(broker: LocalKafka, **configs) -> KafkaProducer:
    return KafkaProducer(**kafka_python(broker.client_settings(), acks="all",
                                        max_request_size=8 * 1024 * 1024, **configs))


def test_produce_and_consume(kafka_broker):
    topic = _topic("plain")
    kafka_broker.create_topics([topic])
    kafka_broker.create_topics([topic])  # idempotent
    producer = _producer(kafka_broker)
    sent = {f"key-{i}".encode(): f"value-{i}".encode() for i in range(20)}
    for key, value in sent.items():
        producer.send(topic, key=key, value=value)
    big = os.urandom(BIG)
    producer.send(topic, key=b"big", value=big).get(timeout=30)
    producer.flush()
    producer.close()

    records = _read_all(kafka_broker, topic, expected=len(sent) + 1)
    got = {r.key: r.value for r in records}
    assert len(records) == len(sent) + 1
    assert got.pop(b"big") == big
    assert got == sent
    assert {r.partition for r in records} == {0, 1}


def test_auto_created_topics_have_two_partitions(kafka_broker):
    topic = _topic("auto")
    producer = _producer(kafka_broker)
    producer.send(topic, value=b"hello").get(timeout=30)
    assert producer.partitions_for(topic) == {0, 1}
    producer.close()
    assert [r.value for r in _read_all(kafka_broker, topic, expected=1)] == [b"hello"]


def test_compacted_topic_config(kafka_broker):
    models, data = _topic("models"), _topic("data")
    kafka_broker.create_topics([models, data], compacted=[models])
    kafka_broker.create_topics([models, data], compacted=[models])  # existing topics are fine
    from kafka.admin import KafkaAdminClient

    admin = KafkaAdminClient(**kafka_python(kafka_broker.client_settings()))
    try:
        configs = admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, name, ["cleanup.policy"]) for name in (models, data)],
            config_filter="all")["topic"]
        described = {t["name"]: t for t in admin.describe_topics([models, data])}
    finally:
        admin.close()
    assert configs[models]["cleanup.policy"]["value"] == "compact"
    assert configs[data]["cleanup.policy"]["value"] == "delete"
    assert all(len(t["partitions"]) == 2 for t in described.values())


def test_transactions_read_committed(kafka_broker):
    topic = _topic("txn")
    kafka_broker.create_topics([topic])
    # Flink's exactly-once sink uses 1 h transaction timeouts: the broker must accept them.
    producer = _producer(kafka_broker, transactional_id=_topic("tx-id"),
                         transaction_timeout_ms=3_600_000)
    producer.init_transactions()

    producer.begin_transaction()
    producer.send(topic, key=b"k", value=b"committed-1")
    producer.send(topic, key=b"k", value=b"committed-2")
    producer.commit_transaction()

    producer.begin_transaction()
    producer.send(topic, key=b"k", value=b"aborted")
    producer.flush()  # the aborted record really reaches the log
    producer.abort_transaction()

    producer.begin_transaction()
    producer.send(topic, key=b"k", value=b"committed-3")
    producer.commit_transaction()
    producer.close()

    committed = _read_all(kafka_broker, topic, expected=3, isolation_level="read_committed")
    assert [r.value for r in committed] == [b"committed-1", b"committed-2", b"committed-3"]
    everything = _read_all(kafka_broker, topic, expected=4, isolation_level="read_uncommitted")
    assert sorted(r.value for r in everything) == [b"aborted", b"committed-1", b"committed-2", b"committed-3"]


def test_background_start_stop_and_restart_keeps_data(tmp_path):
    """As the CLI uses it: start from a process that exits, stop from a fresh instance
    through the pid file, then a new broker on the same workdir still has the messages."""
    workdir = tmp_path / "kafka"
    port, controller_port = free_ports(2)
    starter = ("import sys; from pathlib import Path; from modelserving.local.kafka_broker import LocalKafka; "
               "LocalKafka(Path(sys.argv[1]), port=int(sys.argv[2]), controller_port=int(sys.argv[3]), "
               "heap='256m').start()")
    subprocess.run([sys.executable, "-c", starter, str(workdir), str(port), str(controller_port)],
                   cwd=PROJECT_ROOT, check=True, timeout=120)
    first = LocalKafka(workdir, port=port, controller_port=controller_port)
    try:
        assert first.is_running(), first.log_tail()
        pid = first.pid()
        assert (workdir / "broker.pid").read_text().strip() == str(pid)
        topic = _topic("durable")
        first.create_topics([topic], compacted=[])
        producer = _producer(first)
        for i in range(10):
            producer.send(topic, key=str(i).encode(), value=f"before-restart-{i}".encode())
        producer.flush()
        producer.close()
    finally:
        assert LocalKafka(workdir).stop() is True  # any instance with the same workdir can stop it
    assert not first.is_running()
    assert not (workdir / "broker.pid").exists()
    assert LocalKafka(workdir).stop() is False  # stopping a stopped broker is a no-op

    port2, controller_port2 = free_ports(2)
    with LocalKafka(workdir, port=port2, controller_port=controller_port2, heap="256m",
                    die_with_parent=True) as second:
        records = _read_all(second, topic, expected=10)
        assert sorted(r.value for r in records) == sorted(f"before-restart-{i}".encode() for i in range(10))
    assert not second.is_running()
