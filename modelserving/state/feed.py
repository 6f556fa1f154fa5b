"""The state topic, read from the beginning into a :class:`ModelStateView` in the background.

The consumer is built with ``jobs.kafka_config.kafka_python(settings)``, like every other
Kafka client of the project, so a secured cluster (SASL, TLS, a properties file) is reached
with the same settings as the jobs use.
"""
from __future__ import annotations

import logging
import threading
import time

import kafka.errors
from kafka import KafkaConsumer, TopicPartition

from jobs.kafka_config import MAX_MESSAGE_BYTES, kafka_python
from jobs.settings import Settings
from modelserving.kafka.failures import CONNECT_TIMEOUT_MS, describe
from modelserving.state.view import ModelStateView

log = logging.getLogger(__name__)

#: Seconds between attempts while Kafka or the topic is unavailable.
RETRY_S = 1.0
#: Seconds between checks for partitions added to the topic.
PARTITION_CHECK_S = 30.0
CLIENT_ID = "modelserving-state-service"


class KafkaStateFeed(threading.Thread):
    """Reads ``settings.state_topic`` (or ``topic``: the repository topic is read the same
    way) from the beginning into a view (anything with ``ingest(key, value)`` and
    ``health()``), in a daemon thread.

    No consumer group (every service instance reads everything), ``read_committed`` (a job
    publishing transactionally shows only committed statistics). ``ready`` is set once every
    partition has been read up to the end offset it had when reading started; ``status`` is
    ``connecting`` (no broker yet), ``waiting_for_topic`` (the topic does not exist; it is not
    auto-created), ``catching_up``, then ``ok``. Failures are retried every second and shown
    in ``error``; the view keeps serving what it has. Partitions added to the topic later are
    picked up within ``PARTITION_CHECK_S``.

    ``consumer_overrides`` are extra kafka-python ``KafkaConsumer`` arguments (tests shorten
    timeouts with them). The client configuration is computed here, not in the thread, so
    settings that cannot work (SASL without a password...) fail at construction with a
    ``KafkaConfigError`` instead of being retried forever.
    """

    def __init__(self, view: ModelStateView, settings: Settings, poll_ms: int = 200,
                 consumer_overrides: dict | None = None, topic: str | None = None):
        self.topic = settings.state_topic if topic is None else topic
        super().__init__(name=f"state-feed-{self.topic}", daemon=True)
        self.view = view
        self.bootstrap_servers = settings.bootstrap_servers
        self.poll_ms = poll_ms
        self.consumer_config = kafka_python(
            settings, group_id=None, auto_offset_reset="earliest", enable_auto_commit=False,
            isolation_level="read_committed", allow_auto_create_topics=False, client_id=CLIENT_ID,
            fetch_max_bytes=MAX_MESSAGE_BYTES, max_partition_fetch_bytes=MAX_MESSAGE_BYTES,
            **{"bootstrap_timeout_ms": CONNECT_TIMEOUT_MS, **(consumer_overrides or {})})
        self.ready = threading.Event()
        self.stopped = threading.Event()
        self.status = "starting"
        self.error: str | None = None
        self.lag: int | None = None
        self._targets: dict = {}
        self._next_partition_check = 0.0

    def _consumer(self) -> KafkaConsumer:
        return KafkaConsumer(**self.consumer_config)

    def run(self) -> None:
        consumer = None
        try:
            while not self.stopped.is_set():
                try:
                    if consumer is None:
                        if not self.ready.is_set():
                            self.status = "connecting"
                        consumer = self._consumer()
                    self._step(consumer)
                    self.error = None
                except Exception as exc:  # noqa: BLE001 - keep serving what we have; say why in health
                    if self.stopped.is_set():
                        break
                    self._failed(exc)
                    self.stopped.wait(RETRY_S)
        finally:
            if consumer is not None:
                consumer.close()

    def _failed(self, exc: Exception) -> None:
        """Record a failure for /health; log it once, not once a second while it lasts.
        Kafka's own failures are said as the other tools say them (where, as whom, what to
        check: a refused login names the user)."""
        if isinstance(exc, kafka.errors.KafkaError):
            error = describe(exc, f"reading {self.topic}", self.consumer_config)
        else:
            text = str(exc)
            text = text if text.startswith(type(exc).__name__) else f"{type(exc).__name__}: {text}"
            error = f"reading {self.topic} from {self.bootstrap_servers}: {text}"
        level = logging.WARNING if error != self.error else logging.DEBUG
        log.log(level, "%s (retrying every %g s)", error, RETRY_S)
        self.error = error

    def _step(self, consumer) -> None:
        assigned = set(consumer.assignment())
        if not assigned or time.monotonic() >= self._next_partition_check:
            self._next_partition_check = time.monotonic() + PARTITION_CHECK_S
            partitions = consumer.partitions_for_topic(self.topic)
            if not partitions:
                self.status = "waiting_for_topic"
                self._next_partition_check = 0.0
                self.stopped.wait(RETRY_S)
                return
            wanted = {TopicPartition(self.topic, p) for p in partitions}
            new = wanted - assigned
            if new:  # the first time, or partitions added to the topic: read them from the beginning
                consumer.assign(sorted(wanted | assigned))
                consumer.seek_to_beginning(*new)
                if not self.ready.is_set():
                    self._targets.update(consumer.end_offsets(sorted(new)))
                    self.status = "catching_up"
                log.info("reading %s from the beginning: %s new partition(s) of %s", self.topic,
                         len(new), len(wanted))
        for records in consumer.poll(timeout_ms=self.poll_ms).values():
            for record in records:
                self.view.ingest(record.key, record.value)
        if not self.ready.is_set():
            remaining = self._remaining(consumer)
            self.lag = remaining
            if remaining == 0:
                self.status = "ok"
                self.ready.set()
                log.info("caught up with %s: %s", self.topic, self.view.health())

    def _remaining(self, consumer) -> int:
        remaining = 0
        for tp, end in self._targets.items():
            position = consumer.position(tp, timeout_ms=5000)
            if position is None:
                remaining += max(end, 1)
            else:
                remaining += max(end - position, 0)
        return remaining

    def stop(self, timeout_s: float = 5.0) -> None:
        self.stopped.set()
        if self.is_alive():
            self.join(timeout_s)

    def health(self) -> dict:
        """The feed's part of /health (never the client configuration: it holds credentials)."""
        return {"status": self.status, "ready": self.ready.is_set(), "topic": self.topic,
                "bootstrap_servers": self.bootstrap_servers, "lag_at_start": self.lag,
                "error": self.error, "alive": self.is_alive()}


__all__ = ["KafkaStateFeed", "PARTITION_CHECK_S", "RETRY_S"]
