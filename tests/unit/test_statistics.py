"""Serving statistics as kept in state and published (no Flink)."""
from __future__ import annotations

import logging
from types import SimpleNamespace

from protos import ModelStats, ModelType
from udfs import statistics
from udfs.serving import BAD_RECORD, NO_MODEL, SCORED, Outcome


def model(model_id: str, name: str = "m", since: int = 1000):
    info = SimpleNamespace(model_id=model_id, name=name, description="d", model_type=ModelType.ONNX,
                           version="2")
    return SimpleNamespace(info=info, since_ms=since)


def outcome(kind: str, micros: float = 0.0) -> Outcome:
    return Outcome(kind, b"", "wine", micros)


def test_usage_and_scoring_times_per_model():
    stats = statistics.new_stats("keyed", "wine", statistics.KEYED_PART, 0)
    assert statistics.follow_model(stats, model("a"))
    statistics.count(stats, [outcome(SCORED, 30.0), outcome(SCORED, 10.0), outcome(NO_MODEL),
                             outcome(BAD_RECORD), outcome(SCORED, 20.0)])
    assert (stats.usage, stats.totalMicros, stats.minMicros, stats.maxMicros) == (3, 60.0, 10.0, 30.0)
    assert (stats.noModel, stats.deadLetters) == (1, 1)
    assert (stats.modelName, stats.modelVersion, stats.sinceMs) == ("m", "2", 1000)


def test_a_new_model_resets_its_figures_but_not_the_data_type_counters():
    stats = statistics.new_stats("keyed", "wine", statistics.KEYED_PART, 0)
    statistics.follow_model(stats, model("a"))
    statistics.count(stats, [outcome(SCORED, 5.0), outcome(NO_MODEL)])
    assert not statistics.follow_model(stats, model("a"))  # the same model is no change
    assert statistics.follow_model(stats, model("b", name="n", since=2000))
    assert (stats.modelName, stats.usage, stats.sinceMs, stats.noModel) == ("n", 0, 2000, 1)
    assert statistics.follow_model(stats, None)
    assert not stats.hasModel and stats.modelName == "" and stats.noModel == 1


def test_keys_and_stamps():
    assert statistics.stats_key("keyed", "wine", statistics.KEYED_PART) == "keyed/wine"
    assert statistics.stats_key("flat", "wine", 7) == "flat/wine/7"
    stats = statistics.new_stats("flat", "wine", 7, 0)
    decoded = ModelStats.FromString(statistics.stamped(stats, 1))
    assert decoded.subtask == 1 and decoded.publishedMs > 0 and decoded.part == 7


class Future:
    """kafka-python's send() result, enough to chain callbacks on."""
    def add_callback(self, fn):
        return self

    def add_errback(self, fn):
        return self


def test_undelivered_statistics_are_said_once_a_minute_and_their_return_once(caplog):
    """A broker down for minutes makes every snapshot fail in the producer's thread: one
    warning per minute with the count, and one when snapshots arrive again."""
    from udfs.flink import publishing

    clock = [1_000_000]
    publisher = publishing.StatsPublisher("model-state", {})
    with caplog.at_level(logging.WARNING, logger="modelserving"):
        original = publishing.now_ms
        publishing.now_ms = lambda: clock[0]
        try:
            for _ in range(30):          # one snapshot a second for 30 s
                publisher._lost(TimeoutError("expired after 120000 ms"))
                clock[0] += 1000
            publisher._delivered(None)
            publisher._delivered(None)
        finally:
            publishing.now_ms = original
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines
    assert "not delivered to model-state: expired after 120000 ms (1 snapshot(s) so far" in lines[0]
    assert "reach model-state again (30 snapshot(s) were lost before)" in lines[1]


def test_the_statistics_producer_gets_every_kafka_setting_the_job_computed(monkeypatch):
    """The job computes the producer's arguments on the client; the worker uses them as is."""
    import kafka

    from jobs.kafka_config import kafka_python
    from jobs.settings import Settings
    from udfs.flink.publishing import StatsPublisher

    made = []

    class Producer:
        def __init__(self, **config):
            made.append(config)
            self.sent = []

        def send(self, topic, key, value):
            self.sent.append((topic, key, value))
            return Future()

    monkeypatch.setattr(kafka, "KafkaProducer", Producer)
    settings = Settings.from_sources([], environ={}, bootstrap_servers="broker:9093",
                                     security_protocol="SASL_PLAINTEXT", sasl_mechanism="SCRAM-SHA-512",
                                     sasl_username="serving", sasl_password="s3cret")
    publisher = StatsPublisher("model-state", kafka_python(settings, acks=1, linger_ms=100))
    publisher.publish("keyed/wine", b"stats")
    assert made == [{"bootstrap_servers": "broker:9093", "security_protocol": "SASL_PLAINTEXT",
                     "reconnect_backoff_max_ms": 1000, "sasl_mechanism": "SCRAM-SHA-512", "sasl_plain_username": "serving",
                     "sasl_plain_password": "s3cret", "acks": 1, "linger_ms": 100}]
    assert publisher._producer.sent == [("model-state", b"keyed/wine", b"stats")]
    StatsPublisher("", {"bootstrap_servers": "nowhere:1"}).publish("k", b"v")   # no topic: no producer
    assert len(made) == 1


def test_a_speculative_set_counts_its_models_and_a_new_set_starts_from_zero():
    from protos import SpeculativeModelStats
    from udfs.speculative import SpeculativePlan

    stats = statistics.new_stats("keyed", "wine", statistics.KEYED_PART, 0)
    first = SpeculativePlan("wine", ("a", "b"), 50, 0, b"set-1", "s1")
    assert statistics.follow_set(stats, first) is True
    assert statistics.follow_set(stats, first) is False
    batch = [SpeculativeModelStats(modelId="a", modelName="lr", answered=3, wins=3, totalMillis=6.0,
                                   maxMillis=2.5),
             SpeculativeModelStats(modelId="b", timeouts=2, failures=1)]
    statistics.count_speculative(stats, batch, [])
    statistics.count_speculative(stats, batch, [])
    a, b = stats.speculativeModels
    assert (a.modelName, a.answered, a.wins, a.totalMillis, a.maxMillis) == ("lr", 6, 6, 12.0, 2.5)
    assert (b.timeouts, b.failures, stats.usage) == (4, 2, 0)
    longer = SpeculativePlan("wine", ("a", "b"), 80, 0, b"set-2", "s2")
    assert statistics.follow_set(stats, longer) is True
    assert [m.answered for m in stats.speculativeModels] == [0, 0]
    assert statistics.follow_set(stats, None) is True and not stats.HasField("speculative")
    assert list(stats.speculativeModels) == []


def test_a_publisher_without_a_cluster_publishes_nowhere(monkeypatch):
    """Unit tests build joins with an empty producer configuration: kafka-python would send
    to whatever broker listens on localhost:9092 (a demo's), so nothing is sent at all."""
    import kafka

    from udfs.flink.publishing import StatsPublisher

    made = []
    monkeypatch.setattr(kafka, "KafkaProducer", lambda **config: made.append(config))
    publisher = StatsPublisher("model-state", {})
    publisher.publish("keyed/wine", b"stats")
    publisher.publish("wine//1@keyed", b"entry", topic="model-repository")
    assert made == [] and publisher._producer is None
