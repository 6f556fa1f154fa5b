"""Fixtures of the end-to-end tier: a real local Kafka broker (KRaft) for the session."""
from __future__ import annotations

import shutil

import pytest


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory):
    """A real single-node Kafka broker on free 127.0.0.1 ports, started once per session."""
    if shutil.which("java") is None:
        pytest.skip("java (17+) is not on PATH: the e2e tests need it to run the Kafka broker "
                    "(apt-get install openjdk-17-jre-headless)")
    from modelserving.kafka_local import LocalKafka, free_ports

    port, controller_port = free_ports(2)
    broker = LocalKafka(tmp_path_factory.mktemp("kafka"), port=port, controller_port=controller_port,
                        heap="384m", die_with_parent=True)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()
