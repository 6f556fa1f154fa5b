"""Both jobs on the local Flink environment, with in-memory sources (parallelism 2)."""
from __future__ import annotations

import base64
import math
import os
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from jobs.settings import Settings
from modelserving.demo.training import demo_rows
from modelserving.kafka.clients import Row, encode_record
from modelserving.demo.training import DEMO_DATA_TYPE, descriptor_for
from protos import DeadLetter, ModelDescriptor, ModelType, ServingResult
from udfs.models import load_request, parse_descriptor
from udfs.records import to_batch
from udfs.runtimes import load_model

pytestmark = pytest.mark.job


class Decode:
    """from_collection cannot carry bytes: the test sends base64 text and decodes it here.
    With a ``gate``, the first record waits until the gate opens."""

    def __init__(self, gate: "ModelsHandled | None" = None):
        self.gate = gate

    def open(self, runtime_context):
        self.waiting = self.gate is not None

    def map(self, value):
        if self.waiting:
            self.gate.wait()
            self.waiting = False
        return base64.b64decode(value)


class ModelsHandled:
    """Orders records after models: the join leaves one file in ``marks`` per model element it
    has handled (accepted or not), and records wait for all of them. A directory works across
    threads and Python worker processes alike; a run has a directory of its own."""

    def __init__(self, marks: str, expected: int, timeout_s: float = 120.0):
        self.marks = marks
        self.expected = expected
        self.timeout_s = timeout_s

    def mark(self, subtask: int) -> None:
        Path(self.marks, f"{subtask}-{uuid.uuid4().hex}").touch()

    def wait(self) -> None:
        deadline = time.monotonic() + self.timeout_s
        while len(os.listdir(self.marks)) < self.expected:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the join handled {len(os.listdir(self.marks))} of "
                                   f"{self.expected} model elements in {self.timeout_s} s")
            time.sleep(0.02)


def fail_scoring_on(server, marker: float) -> None:
    """Make every model ``server`` builds raise RuntimeError for a batch holding a feature
    equal to ``marker``: a failure injected into the scoring path."""
    from udfs.serving import LoadedModel

    build = server.build

    def failing_build(raw):
        model = build(raw)
        if isinstance(model, LoadedModel):
            score = model.runtime.score

            def failing_score(batch):
                if (batch.values == marker).any():
                    raise RuntimeError("injected scoring failure")
                return score(batch)
            model.runtime.score = failing_score
        return model
    server.build = failing_build


def reporting_join(job: str, settings: Settings, gate: ModelsHandled, fail_on: float | None = None):
    """The job's own join function, marking ``gate`` after each model element (and, with
    ``fail_on``, failing to score records holding that feature value)."""
    from udfs.flink.joins import BroadcastServing, KeyedServing

    if job == "keyed":
        class ReportingKeyed(KeyedServing):
            def open(self, runtime_context):
                super().open(runtime_context)
                if fail_on is not None:
                    fail_scoring_on(self.server, fail_on)

            def process_element2(self, raw, ctx):
                yield from super().process_element2(raw, ctx)
                gate.mark(self.subtask)

        return ReportingKeyed(settings, {})

    class ReportingBroadcast(BroadcastServing):
        def open(self, runtime_context):
            super().open(runtime_context)
            if fail_on is not None:
                fail_scoring_on(self.server, fail_on)

        def process_broadcast_element(self, raw, ctx):
            yield from super().process_broadcast_element(raw, ctx)
            gate.mark(self.subtask)

    return ReportingBroadcast(settings, {})


JOBS = ["keyed", "broadcast"]


def run_job(job: str, records: list[bytes], models: list[bytes], settings: Settings,
            fail_on: float | None = None):
    """Run ``job`` on the local environment: every model reaches the join before any record."""
    from pyflink.common import Types
    from pyflink.datastream import MapFunction

    import importlib

    build_pipeline = importlib.import_module(f"jobs.{job}_job").build_pipeline
    from jobs.pipeline import create_environment
    from udfs.flink.joins import BYTES

    class DecodeMap(Decode, MapFunction):
        pass

    def collection(items):
        return env.from_collection([base64.b64encode(i).decode() for i in items], type_info=Types.STRING())

    with tempfile.TemporaryDirectory(prefix="models-handled-") as marks:
        # the keyed join handles a model on one instance, the broadcast join on every one
        copies = 1 if job == "keyed" else settings.parallelism
        gate = ModelsHandled(marks, expected=len(models) * copies)
        env = create_environment(settings, with_connector=False)
        data = collection(records).map(DecodeMap(gate), output_type=BYTES)
        model_stream = collection(models).map(DecodeMap(), output_type=BYTES)
        results, dead_letters = build_pipeline(data, model_stream, settings,
                                               serving=reporting_join(job, settings, gate, fail_on))
        tagged = Types.TUPLE([Types.STRING(), Types.STRING()])
        both = results.map(lambda b: ("result", base64.b64encode(b).decode()), output_type=tagged).union(
            dead_letters.map(lambda b: ("dead", base64.b64encode(b).decode()), output_type=tagged))
        with both.execute_and_collect() as collected:
            out = list(collected)
    return ([ServingResult.FromString(base64.b64decode(b)) for kind, b in out if kind == "result"],
            [DeadLetter.FromString(base64.b64decode(b)) for kind, b in out if kind == "dead"])


def expected_predictions(descriptor_bytes: bytes, rows: list[Row], model_dirs):
    request = load_request(parse_descriptor(descriptor_bytes), model_dirs, 10**9)
    runtime = load_model(request)
    by_name = [dict(zip(r.names, r.values)) for r in rows]
    batch = to_batch([[d[n] for n in runtime.input_names] for d in by_name], runtime.input_names)
    return {row.record_id: p for row, p in zip(rows, runtime.score(batch))}


@pytest.fixture(scope="module")
def settings(trained_models):
    model_dir = next(m.path for m in trained_models.values() if not m.inline).parent
    return Settings.from_sources([], environ={}, parallelism=2, checkpoint_interval_ms=0,
                                 model_dirs=(str(model_dir),), max_model_bytes=5_000_000,
                                 rest_port=0, state_topic="",
                                 # the test's own functions (Decode) live in this process
                                 local_python_workers="loopback").for_job("keyed-test")


@pytest.mark.parametrize("job", JOBS)
def test_job_scores_every_record_and_dead_letters_bad_input(job, trained_models, settings):
    rows = demo_rows()[:60]
    onnx = descriptor_for(trained_models[ModelType.ONNX]).SerializeToString()
    bad_model = ModelDescriptor(name="broken", dataType=DEMO_DATA_TYPE, modeltype=ModelType.ONNX,
                                data=b"not onnx").SerializeToString()
    nan_row = Row(DEMO_DATA_TYPE, rows[0].names, (math.nan,) + rows[0].values[1:], "nan-row")
    other_type = Row("no-model-type", ("a",), (1.0,), "orphan")
    records = [encode_record(r) for r in rows] + [b"", b"\xff\xfe garbage", encode_record(nan_row),
                                                    encode_record(other_type)]
    results, dead = run_job(job, records, [onnx, bad_model], settings)

    expected = expected_predictions(onnx, rows, settings.resolved_model_dirs())
    scored = {r.recordId: r for r in results if r.status == ServingResult.SCORED}
    assert set(scored) == set(expected)
    for record_id, prediction in expected.items():
        result = scored[record_id]
        assert result.modelName == trained_models[ModelType.ONNX].name
        assert result.label == prediction.label
        assert list(result.probabilities) == pytest.approx(list(prediction.probabilities), abs=1e-6)
    no_model = [r for r in results if r.status == ServingResult.NO_MODEL]
    assert [r.recordId for r in no_model] == ["orphan"]
    assert len(results) == len(rows) + 1

    reasons = sorted(d.reason for d in dead)
    assert len(dead) == 4
    assert any("empty message" in r for r in reasons)
    assert any("not a WineRecord or DataRecord protobuf" in r for r in reasons)
    assert any(f"feature '{rows[0].names[0]}' is nan" in r for r in reasons)
    [model_letter] = [d for d in dead if d.kind == DeadLetter.BAD_MODEL]
    assert model_letter.raw == bad_model and "model 'broken'" in model_letter.reason


@pytest.mark.parametrize("job", JOBS)
def test_a_failure_in_the_scoring_path_dead_letters_one_record_and_the_job_goes_on(
        job, trained_models, settings):
    """A runtime raising RuntimeError on one record (inside micro-batches of up to 16) makes
    one INTERNAL_ERROR dead letter; the job keeps running and scores every other record."""
    marker = -12345.0
    rows = demo_rows()[:50]
    bad = Row(DEMO_DATA_TYPE, rows[0].names, (marker,) + rows[0].values[1:], "injected")
    records = [encode_record(r) for r in rows[:25]] + [encode_record(bad)] + \
        [encode_record(r) for r in rows[25:]]
    onnx = descriptor_for(trained_models[ModelType.ONNX]).SerializeToString()
    batching = settings.replace(batch_max_size=16, batch_max_wait_ms=2000)
    results, dead = run_job(job, records, [onnx], batching, fail_on=marker)

    expected = expected_predictions(onnx, rows, settings.resolved_model_dirs())
    scored = {r.recordId: r for r in results if r.status == ServingResult.SCORED}
    assert set(scored) == set(expected) and len(results) == len(rows)
    for record_id, prediction in expected.items():
        assert scored[record_id].label == prediction.label
    [letter] = dead
    assert letter.kind == DeadLetter.INTERNAL_ERROR and letter.raw == records[25]
    assert letter.exceptionType == "RuntimeError"
    assert "RuntimeError: injected scoring failure" in letter.reason
    assert letter.rawSize == len(records[25]) and not letter.rawTruncated


@pytest.mark.parametrize("job", JOBS)
def test_each_data_type_is_scored_by_its_own_model(job, trained_models, settings):
    rows = demo_rows()[:30]
    other = [Row("cultivar-pmml", r.names, r.values, "p" + r.record_id) for r in rows]
    onnx = descriptor_for(trained_models[ModelType.ONNX]).SerializeToString()
    pmml = descriptor_for(trained_models[ModelType.PMML], data_type="cultivar-pmml").SerializeToString()
    results, dead = run_job(job, [encode_record(r) for pair in zip(rows, other) for r in pair],
                            [onnx, pmml], settings)
    assert dead == []
    by_id = {r.recordId: r for r in results}
    assert len(by_id) == 60
    expected_pmml = expected_predictions(pmml, other, settings.resolved_model_dirs())
    for row in other:
        assert by_id[row.record_id].modelType == ModelType.PMML
        assert by_id[row.record_id].label == expected_pmml[row.record_id].label
    assert {by_id[r.record_id].modelType for r in rows} == {ModelType.ONNX}


def test_broadcast_job_scores_one_data_type_on_every_instance(trained_models, settings):
    rows = demo_rows()[:80]
    onnx = descriptor_for(trained_models[ModelType.ONNX]).SerializeToString()
    results, dead = run_job("broadcast", [encode_record(r) for r in rows], [onnx], settings)
    assert dead == [] and len(results) == len(rows)
    assert {r.status for r in results} == {ServingResult.SCORED}
    by_subtask = {s: sum(r.subtask == s for r in results) for s in (0, 1)}
    assert by_subtask[0] > 0 and by_subtask[1] > 0, by_subtask


def comparable(result: ServingResult) -> bytes:
    """A result without the fields that say when and where it was scored."""
    copy = ServingResult()
    copy.CopyFrom(result)
    for name in ("servedMs", "scoringMicros", "subtask"):
        copy.ClearField(name)
    return copy.SerializeToString(deterministic=True)


@pytest.mark.parametrize("job", JOBS)
def test_micro_batched_results_equal_one_at_a_time_results(job, trained_models, settings):
    """Batches of up to 16 (and a wait long enough to fill them) give byte-identical results to
    scoring each record alone, for a vector model (ONNX) and a PMML model, bad records included."""
    rows = demo_rows()[:70]
    other = [Row("cultivar-pmml", r.names, r.values, "p" + r.record_id) for r in rows[:40]]
    bad = Row(DEMO_DATA_TYPE, rows[1].names, (math.nan,) + rows[1].values[1:], "nan-row")
    records = [encode_record(r) for r in rows + other + [bad]] + [b"\xff\xfe garbage"]
    models = [descriptor_for(trained_models[ModelType.ONNX]).SerializeToString(),
              descriptor_for(trained_models[ModelType.PMML], data_type="cultivar-pmml").SerializeToString()]
    outputs = {}
    for size in (1, 16):
        batching = settings.replace(batch_max_size=size, batch_max_wait_ms=2000)
        results, dead = run_job(job, records, models, batching)
        outputs[size] = (sorted(comparable(r) for r in results),
                         sorted((d.raw, d.reason) for d in dead))
    single, batched = outputs[1], outputs[16]
    assert len(single[0]) == len(rows) + len(other)
    assert {ServingResult.FromString(r).status for r in single[0]} == {ServingResult.SCORED}
    assert len(single[1]) == 2
    assert batched == single


def test_spreading_keys_reach_every_instance_evenly(settings):
    """The broadcast job's spreading keys are chosen by Flink's key-group arithmetic
    (reimplemented in udfs.flink.keys); Flink itself must route them the way it says."""
    from pyflink.common import Types
    from pyflink.datastream import KeyedProcessFunction

    from jobs.pipeline import create_environment
    from udfs.flink.keys import balanced_spread_keys, key_group_of

    class WhereAmI(KeyedProcessFunction):
        def open(self, runtime_context):
            self.subtask = runtime_context.get_index_of_this_subtask()

        def process_element(self, value, ctx):
            yield value, self.subtask

    keys = list(range(64))
    env = create_environment(settings, with_connector=False)
    routed = env.from_collection(keys, type_info=Types.INT()) \
        .key_by(lambda k: k, key_type=Types.INT()) \
        .process(WhereAmI(), output_type=Types.TUPLE([Types.INT(), Types.INT()]))
    with routed.execute_and_collect() as collected:
        where = dict(collected)
    assert where == {k: key_group_of(k, 128) * 2 // 128 for k in keys}
    assert set(where.values()) == {0, 1}
    spread = balanced_spread_keys(2, 2)
    assert len(spread) == 4 and sorted(where[k] for k in spread if k in where) == [0, 0, 1, 1]
