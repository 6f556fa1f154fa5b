"""The benchmark's arithmetic: what counts as throughput, latency, keeping up; profile summaries."""
from __future__ import annotations

import pytest

from modelserving.bench.profiling import summarize
from modelserving.bench.workload import RecordTemplate, Sent, Trial, wait_for_trial
from protos import DataRecord, ServingResult


def trial_of(created: list[int], appended: list[int], count: int | None = None) -> Trial:
    sent = Sent("t1", count or len(created), 0.0, 1.0, 0.0)
    trial = Trial(sent, latencies_ms=[float(a - c) for a, c in zip(appended, created)],
                  created_ms=created, appended_ms=appended, received=len(created))
    return trial


def test_warm_up_quarter_is_left_out_of_percentiles_and_rates():
    # 100 records, one per 10 ms; the first 25 answer slowly (warm-up), the rest in 5 ms
    created = [i * 10 for i in range(100)]
    appended = [c + (500 if i < 25 else 5) for i, c in enumerate(created)]
    trial = trial_of(created, appended)
    assert trial.percentile(50) == 5 and trial.percentile(99) == 5
    # 75 records kept; created from 250 ms, last answer at 995 ms
    assert trial.throughput() == pytest.approx(75 / 0.745)
    assert trial.output_rate() == pytest.approx(74 / 0.740)
    assert not trial.latency_grows()


def test_a_backlog_is_latency_that_grows():
    created = [i * 10 for i in range(200)]
    appended = [c + 2 * i for i, c in enumerate(created)]     # 2 ms more behind per record
    trial = trial_of(created, appended)
    assert trial.latency_grows()
    assert trial.percentile(95) > trial.percentile(50)


def test_missing_results_make_a_trial_incomplete():
    trial = trial_of([0, 1, 2], [5, 6, 7], count=10)
    assert not trial.complete
    assert trial.throughput() is None   # too few records to say


def test_records_carry_creation_time_and_trial_id():
    template = RecordTemplate("bench-onnx", [{"a": 1.0, "b": 2.0}, {"a": 3.0, "b": 4.0}])
    first = DataRecord.FromString(template.encode(0, "t7-0", 1234))
    second = DataRecord.FromString(template.encode(3, "t7-3", 1240))
    assert (first.dataType, first.id, first.ts, dict(first.features)) == ("bench-onnx", "t7-0", 1234, {"a": 1.0, "b": 2.0})
    assert (second.id, second.ts, dict(second.features)) == ("t7-3", 1240, {"a": 3.0, "b": 4.0})


def test_profile_summary_attributes_samples_to_functions_and_areas():
    raw = "\n".join([
        "main (bench/plain_loop.py:10);serve (bench/plain_loop.py:40);run (onnxruntime/capi/x.py:3) 30",
        "main (bench/plain_loop.py:10);serve (bench/plain_loop.py:41) 50",
        "main (bench/plain_loop.py:10);poll (kafka/consumer/group.py:7);crc (kafka/record/_crc32c.py:9) 20",
    ])
    summary = summarize(raw)
    assert summary["samples"] == 100
    assert summary["self"][0] == ["serve (bench/plain_loop.py)", 50.0]
    assert dict(map(tuple, summary["inclusive"]))["main (bench/plain_loop.py)"] == 100.0
    assert summary["areas"] == {"project code (parse, state, serialize)": 50.0,
                                "model library (onnxruntime)": 30.0, "kafka-python": 20.0}


class Results:
    """What a results topic gave the collector: (append time, bytes), taken once."""

    def __init__(self, items):
        self.items = items

    def take(self):
        items, self.items = self.items, []
        return items


def test_results_that_are_not_scored_are_counted_apart():
    def result(i, status):
        return ServingResult(status=status, recordId=f"t3-{i}", recordTs=100 + i, modelName="m",
                             modelVersion="1").SerializeToString()
    items = [(110, result(0, ServingResult.SCORED)), (111, result(1, ServingResult.NO_MODEL)),
             (112, result(2, ServingResult.SCORED)), (113, result(0, ServingResult.SCORED)),
             (114, result(9, ServingResult.SCORED).replace(b"t3-", b"t2-"))]   # a duplicate, another trial
    trial = wait_for_trial(Results(items), Sent("t3", 3, 0.0, 1.0, 0.0), timeout_s=0)
    assert (trial.received, trial.unscored, trial.complete) == (3, 1, True)
    assert trial.model_versions == {"m:1": 3} and trial.latencies_ms == [10.0, 10.0, 10.0]


class QueueOfTen:
    """librdkafka's local queue as the load generator meets it: full at ten messages until
    the producer is polled, which delivers them."""

    def __init__(self):
        self.queued, self.delivered, self.full = [], [], 0

    def produce(self, topic, value):
        if len(self.queued) >= 10:
            self.full += 1
            raise BufferError("Local: Queue full")
        self.queued.append(value)

    def poll(self, timeout):
        self.delivered += self.queued
        self.queued = []

    def flush(self, timeout):
        self.poll(timeout)


def test_a_full_producer_queue_delays_the_load_generator_and_loses_nothing():
    from modelserving.bench.workload import produce

    producer = QueueOfTen()
    produce(producer, "data", RecordTemplate("wine", [{"a": 1.0}]), "t", 35)
    ids = [DataRecord.FromString(value).id for value in producer.delivered]
    assert ids == [f"t-{i}" for i in range(35)] and producer.full >= 3
