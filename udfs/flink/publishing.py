"""Publishing serving statistics (and the model repository's records) to their compacted
topics from inside the job.

The producer configuration is computed by the job on the client side
(``jobs.kafka_config.kafka_python``) and handed in as a plain dict, so the Python workers
need no settings translation of their own and get every Kafka security setting.
"""
from __future__ import annotations

import logging

from udfs.serving import now_ms

log = logging.getLogger("modelserving")


class StatsPublisher:
    """Sends ModelStats snapshots to the compacted state topic from the Python worker, and
    through the same producer the model repository's entries to theirs (``topic``).

    Both are snapshots (the last one per key wins), so at-least-once delivery is enough;
    they go through a plain Kafka producer because PyFlink's Kafka sink cannot set a record
    key from a Python element without a Java serializer. A failure to publish is logged and
    never fails serving; after a failure nothing is sent for ``RETRY_AFTER_MS``, whatever the
    topic."""

    RETRY_AFTER_MS = 30_000
    #: While the broker stays unreachable, one warning per this many ms, not one per snapshot.
    WARN_EVERY_MS = 60_000

    def __init__(self, topic: str, producer_config: dict):
        """``topic``: where to publish, "" for nowhere; ``producer_config``: keyword
        arguments of kafka-python's ``KafkaProducer``. A configuration without
        ``bootstrap_servers`` (a unit test's ``{}``) publishes nowhere: kafka-python would
        otherwise send to whatever broker listens on localhost:9092."""
        self.topic = topic
        self.producer_config = dict(producer_config)
        self.configured = bool(self.producer_config.get("bootstrap_servers"))
        self._producer = None
        self._failed_at = 0
        self._undelivered = 0          # snapshots lost since the last one delivered
        self._warned_at = -self.WARN_EVERY_MS

    def publish(self, key: str, value: bytes, topic: str | None = None) -> None:
        """Send ``value`` under ``key`` to ``topic`` (None: the statistics' topic; "":
        nowhere)."""
        topic = self.topic if topic is None else topic
        if not topic or not self.configured:
            return
        try:
            if self._producer is None:
                if now_ms() - self._failed_at < self.RETRY_AFTER_MS:
                    return
                self._producer = self._connect()
            future = self._producer.send(topic, key=key.encode(), value=value)
            future.add_callback(self._delivered).add_errback(self._lost)
        except Exception as exc:  # statistics must never stop serving
            log.warning("publishing to %s failed: %s", topic, exc)
            self._failed_at, self._producer = now_ms(), None

    def _delivered(self, _metadata) -> None:
        """In the producer's thread, for each snapshot the broker acknowledged."""
        if self._undelivered:
            log.warning("statistics reach %s again (%d snapshot(s) were lost before)",
                        self.topic, self._undelivered)
            self._undelivered = 0

    def _lost(self, exc) -> None:
        """In the producer's thread: a snapshot the broker never took (it was down for longer
        than the delivery timeout). Said once a minute while it lasts; the next snapshot
        carries the same counters, so nothing but freshness is lost."""
        self._undelivered += 1
        if now_ms() - self._warned_at >= self.WARN_EVERY_MS:
            self._warned_at = now_ms()
            log.warning("statistics not delivered to %s: %s (%d snapshot(s) so far; the "
                        "producer keeps reconnecting)", self.topic, exc, self._undelivered)

    def _connect(self):
        from kafka import KafkaProducer

        # kafka-python logs every failed connection attempt at ERROR; in a job's log that is
        # a line per second per worker while a broker is down. This class says what matters.
        logging.getLogger("kafka").setLevel(logging.CRITICAL)
        return KafkaProducer(**self.producer_config)

    def close(self) -> None:
        if self._producer is not None:
            try:
                self._producer.close(timeout=5)
            except Exception as exc:
                log.warning("closing the statistics producer failed: %s", exc)
