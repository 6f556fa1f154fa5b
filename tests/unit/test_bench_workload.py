"""The benchmark's arithmetic: what counts as throughput, latency, keeping up; profile summaries."""
from __future__ import annotations

import pytest

from modelserving.bench.profiling import summarize
from modelserving.bench.workload import RecordTemplate, Sent, Trial
from protos import DataRecord


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
