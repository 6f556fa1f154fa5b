"""Both jobs on the local Flink environment, with in-memory sources (parallelism 2)."""
from __future__ import annotations

import base64
import hashlib
import logging
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
from protos import DeadLetter, ModelDescriptor, ModelType, ServingResult, Validation
from udfs.models import load_request, parse_descriptor
from udfs.records import to_batch
from udfs.runtimes import load_model

pytestmark = pytest.mark.job


class Decode:
    """from_collection cannot carry bytes: the test sends text (a partition, offsets and
    base64 values, see ``encoded``) and decodes it here into the batch or message the Kafka
    source would give. With a ``gate``, the first element waits until the gate opens."""

    def __init__(self, gate: "ModelsHandled | None" = None, model: bool = False):
        self.gate = gate
        self.model = model

    def open(self, runtime_context):
        self.waiting = self.gate is not None

    def map(self, value):
        from pyflink.common import Row

        if self.waiting:
            self.gate.wait()
            self.waiting = False
        partition, offsets, values = value.split(";")
        offsets = [int(o) for o in offsets.split(",")]
        values = [base64.b64decode(v) for v in values.split(",")]
        if self.model:
            return Row(int(partition), offsets[0], values[0])
        return Row(int(partition), offsets, values)


def encoded(partition: int, offsets: list[int], values: list[bytes]) -> str:
    return f"{partition};{','.join(map(str, offsets))};" + ",".join(
        base64.b64encode(v).decode() for v in values)


def in_batches(records: list[bytes], size: int = 8) -> list[list[bytes]]:
    return [records[start:start + size] for start in range(0, len(records), size)]


def positioned(batches: list[list[bytes]]) -> list[tuple[int, list[int], list[bytes]]]:
    """Batches as the Kafka source gives them: alternately from partition 0 and 1, each
    partition's offsets counting from 0."""
    next_offset = [0, 0]
    out = []
    for index, batch in enumerate(batches):
        partition = index % 2
        offsets = list(range(next_offset[partition], next_offset[partition] + len(batch)))
        next_offset[partition] += len(batch)
        out.append((partition, offsets, batch))
    return out


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


def reporting_join(job: str, settings: Settings, gate: ModelsHandled, inject=None):
    """The job's own join function, marking ``gate`` after each model element (and, with
    ``inject``, calling ``inject(join)`` once it is open, to make its code fail)."""
    from udfs.flink.joins import BroadcastServing, KeyedServing

    if job == "keyed":
        class ReportingKeyed(KeyedServing):
            def open(self, runtime_context):
                super().open(runtime_context)
                if inject is not None:
                    inject(self)

            def process_element2(self, raw, ctx):
                yield from super().process_element2(raw, ctx)
                gate.mark(self.subtask)

        return ReportingKeyed(settings, {})

    class ReportingBroadcast(BroadcastServing):
        def open(self, runtime_context):
            super().open(runtime_context)
            if inject is not None:
                inject(self)

        def process_broadcast_element(self, raw, ctx):
            yield from super().process_broadcast_element(raw, ctx)
            gate.mark(self.subtask)

    return ReportingBroadcast(settings, {})


JOBS = ["keyed", "broadcast"]


def executed(results, dead_letters, shadow: list | None = None
             ) -> tuple[list[ServingResult], list[DeadLetter]]:
    """Run the pipeline whose outputs are ``results`` (result batches) and ``dead_letters``
    to its end, and decode what it put out; with ``shadow`` (a list), the join's shadow
    results are collected into it."""
    from pyflink.common import Types

    from udfs.flink.joins import shadow_results_of

    tagged = Types.TUPLE([Types.STRING(), Types.STRING()])
    both = results.flat_map(lambda batch: [("result", base64.b64encode(b).decode())
                                           for b in batch[0]], output_type=tagged).union(
        dead_letters.map(lambda b: ("dead", base64.b64encode(b).decode()), output_type=tagged))
    if shadow is not None:
        both = both.union(shadow_results_of(results).map(
            lambda b: ("shadow", base64.b64encode(b).decode()), output_type=tagged))
    with both.execute_and_collect() as collected:
        out = list(collected)
    if shadow is not None:
        shadow.extend(ServingResult.FromString(base64.b64decode(b))
                      for kind, b in out if kind == "shadow")
    return ([ServingResult.FromString(base64.b64decode(b)) for kind, b in out if kind == "result"],
            [DeadLetter.FromString(base64.b64decode(b)) for kind, b in out if kind == "dead"])


def run_job(job: str, records: list[bytes], models: list[bytes], settings: Settings,
            inject=None, batches: list[list[bytes]] | None = None, with_positions: bool = False):
    """Run ``job`` on the local environment: every model reaches the join before any record.
    ``records`` arrive in batches of 8 (or as ``batches``); with ``with_positions``, also
    the (partition, offset) of every record and model."""
    from pyflink.common import Types
    from pyflink.datastream import MapFunction

    import importlib

    build_pipeline = importlib.import_module(f"jobs.{job}_job").build_pipeline
    from jobs.pipeline import create_environment
    from udfs.flink.batches import MODEL_MESSAGE, RECORD_BATCH

    class DecodeMap(Decode, MapFunction):
        pass

    record_batches = positioned(batches if batches is not None else in_batches(records))
    model_messages = [(0, [offset], [raw]) for offset, raw in enumerate(models)]
    with tempfile.TemporaryDirectory(prefix="models-handled-") as marks:
        # the keyed join handles a model on one instance, the broadcast join on every one
        copies = 1 if job == "keyed" else settings.parallelism
        gate = ModelsHandled(marks, expected=len(models) * copies)
        env = create_environment(settings, with_connector=False)
        data = env.from_collection([encoded(*b) for b in record_batches], type_info=Types.STRING()) \
            .map(DecodeMap(gate), output_type=RECORD_BATCH)
        # one decoding instance keeps the models in their order, as one Kafka partition does
        model_stream = env.from_collection([encoded(*m) for m in model_messages],
                                           type_info=Types.STRING()) \
            .map(DecodeMap(model=True), output_type=MODEL_MESSAGE).set_parallelism(1)
        results, dead_letters = build_pipeline(data, model_stream, settings,
                                               serving=reporting_join(job, settings, gate, inject))
        outputs = executed(results, dead_letters)
    if not with_positions:
        return outputs
    where = {raw: (partition, offset) for partition, offsets, batch in record_batches
             for offset, raw in zip(offsets, batch)}
    where.update({raw: (partition, offsets[0]) for partition, offsets, (raw,) in model_messages})
    return outputs + (where,)


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
                                 rest_port=0, state_topic="", repository_topic="",
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
    results, dead, where = run_job(job, records, [onnx, bad_model], settings, with_positions=True)

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
    # each dead letter names where its input is in its topic
    for letter in dead:
        assert (letter.sourcePartition, letter.sourceOffset) == where[letter.raw], letter.reason
    assert {d.sourceTopic for d in dead if d.kind == DeadLetter.BAD_RECORD} == {settings.data_topic}


# -- a failure of the project's own code in each path: the job goes on -------------------------

#: First feature of the record whose scoring fails.
SCORE_MARKER = -12345.0
#: (path, what the failing input is): every path a record or a model takes through a job.
INJECTED_PATHS = {
    "batch-key": "splitting and keying a record batch",
    "parse": "record parsing",
    "score": "scoring",
    "serialize": "result serialization",
    "metrics": "metrics update",
    "statistics": "statistics tracking",
    "publish": "statistics publishing",
    "model-key": "model key selection (keyed job: models are keyed too)",
    "model-build": "model parsing",
    "model-install": "model installation",
}
#: The broadcast job keys no models.
INJECTED = [(job, path) for job in JOBS for path in INJECTED_PATHS
            if not (job == "broadcast" and path == "model-key")]


def injected(what: str) -> RuntimeError:
    return RuntimeError(f"injected {what} failure")


def inject_failures(join) -> None:
    """Make the join's own code raise RuntimeError in every path, each on its marker input
    (a record or model named ``inject-<path>``; statistics publishing always): patched on
    this instance inside the Python worker, as a bug there would raise."""
    import udfs.serving
    from udfs.flink.joins import ServingJoin

    server = join.server

    def marked(outcomes, name: str) -> bool:
        return any(name.encode() in outcome.payload for outcome in outcomes)

    # record parsing: a function of the module, which the parallel instances share (one
    # process in loopback mode): wrapped once; the test puts the original back
    parse = udfs.serving.parse_record
    if not getattr(parse, "injected", False):
        def failing_parse(raw):
            record = parse(raw)
            if record.record_id == "inject-parse":
                raise injected("parsing")
            return record
        failing_parse.injected = True
        udfs.serving.parse_record = failing_parse

    fail_scoring_on(server, SCORE_MARKER)                              # scoring

    build = server.build                                               # model parsing

    def failing_build(raw):
        if ModelDescriptor.FromString(raw).name == "inject-model-build":
            raise injected("model parsing")
        return build(raw)
    server.build = failing_build

    install = server.install                                           # model installation

    def failing_install(data_type, model):
        if model is not None and model.info.name == "inject-model-install":
            raise injected("model installation")
        return install(data_type, model)
    server.install = failing_install

    bounded = server._bounded                                          # result serialization

    def failing_serialization(payload, record, model, micros):
        if record.record_id == "inject-serialize":
            raise injected("serialization")
        return bounded(payload, record, model, micros)
    server._bounded = failing_serialization

    count = join.metrics.total.count                                   # metrics update

    def failing_count(kind, outcomes):
        if marked(outcomes, "inject-metrics"):
            raise injected("metrics")
        return count(kind, outcomes)
    join.metrics.total.count = failing_count

    def failing_track(ctx, data_type, part, model, outcomes, *more):   # statistics tracking
        # after the real work, so that statistics are still published (and fail there too)
        ServingJoin._track(join, ctx, data_type, part, model, outcomes, *more)
        if marked(outcomes, "inject-statistics"):
            raise injected("statistics")
    join._track = failing_track

    def failing_publish(key, value):                                   # statistics publishing
        raise injected("publishing")
    join.publisher.publish = failing_publish



def failing_key_selectors(job: str, monkeypatch) -> None:
    """The job's own split and key selectors, raising on the marker inputs (a batch holding
    ``inject-batch-key``, ``inject-model-key``)."""
    from udfs.flink.batches import SplitByDataType
    from udfs.flink.keys import ModelDataType, SpreadKey

    def marked(batch) -> bool:
        return any(b"inject-batch-key" in raw for raw in batch[-1])

    class FailingSplit(SplitByDataType):
        def select(self, batch):
            if marked(batch):
                raise injected("batch key")
            return super().select(batch)

    class FailingModelKey(ModelDataType):
        def select(self, message):
            if b"inject-model-key" in message[2]:
                raise injected("model key")
            return super().select(message)

    class FailingSpreadKey(SpreadKey):
        def select(self, batch):
            if marked(batch):
                raise injected("batch key")
            return super().select(batch)

    if job == "keyed":
        monkeypatch.setattr("jobs.keyed_job.SplitByDataType", FailingSplit)
        monkeypatch.setattr("jobs.keyed_job.ModelDataType", FailingModelKey)
    else:
        monkeypatch.setattr("jobs.broadcast_job.SpreadKey", FailingSpreadKey)


class ErrorLines(logging.Handler):
    """The job's ERROR lines (the local job's Python functions run in this process: the
    settings ask for loopback workers)."""

    def __init__(self):
        super().__init__(logging.ERROR)
        self.lines: list[tuple[str, bool]] = []

    def emit(self, record):
        self.lines.append((record.getMessage(), record.exc_info is not None))

    def logged(self, start: str, failure: str) -> bool:
        """An ERROR line that starts with ``start``, states ``failure`` and has a stack trace."""
        return any(message.startswith(start) and failure in message and trace
                   for message, trace in self.lines)


def run_injected(job: str, trained_models, settings: Settings):
    """Run ``job`` once with a failure injected into every path, each on inputs of its own."""
    import udfs.serving

    rows = demo_rows()
    marker_rows = {path: Row(DEMO_DATA_TYPE, row.names, row.values, f"inject-{path}")
                   for path, row in zip(["batch-key", "parse", "score", "serialize", "metrics",
                                         "statistics"], rows[40:])}
    scored = marker_rows["score"]
    marker_rows["score"] = Row(DEMO_DATA_TYPE, scored.names, (SCORE_MARKER,) + scored.values[1:],
                               scored.record_id)
    records = {row.record_id: encode_record(row) for row in rows[:40] + list(marker_rows.values())}
    onnx = descriptor_for(trained_models[ModelType.ONNX])
    models = {"onnx": onnx.SerializeToString()}
    for path in ("model-key", "model-build", "model-install"):
        if (job, path) in INJECTED:
            marker = ModelDescriptor()
            marker.CopyFrom(onnx)
            marker.name = f"inject-{path}"
            models[path] = marker.SerializeToString()
    # the record that fails the keyed job's split comes in a batch of its own: the whole
    # batch is dead-lettered then
    split_marker = records[marker_rows["batch-key"].record_id]
    batches = in_batches([raw for raw in records.values() if raw != split_marker]) + [[split_marker]]
    errors = ErrorLines()
    logger = logging.getLogger("modelserving")
    logger.addHandler(errors)
    started = time.monotonic()
    try:
        with pytest.MonkeyPatch.context() as monkeypatch:
            monkeypatch.setattr(udfs.serving, "parse_record", udfs.serving.parse_record)
            failing_key_selectors(job, monkeypatch)
            results, dead = run_job(job, list(records.values()), list(models.values()), settings,
                                    inject=inject_failures, batches=batches)
    finally:
        logger.removeHandler(errors)
    answered = [path for path in ("metrics", "statistics", "batch-key")
                if not (job == "keyed" and path == "batch-key")]
    served = rows[:40] + [marker_rows[path] for path in answered]
    return dict(results=results, dead=dead, errors=errors, records=records, models=models,
                onnx=onnx, seconds=time.monotonic() - started,
                expected=expected_predictions(models["onnx"], served, settings.resolved_model_dirs()))


@pytest.fixture(scope="module")
def injected_runs(trained_models, settings):
    """One run of each job with every failure injected (the paths do not disturb each
    other: each fails on inputs of its own), shared by the tests of its paths."""
    runs = {}

    def run(job: str):
        if job not in runs:
            try:
                runs[job] = run_injected(job, trained_models, settings)
            except Exception as exc:   # every path of the job fails with the job's exception
                runs[job] = exc
        if isinstance(runs[job], Exception):
            raise runs[job]
        return runs[job]
    return run


@pytest.mark.parametrize("job,path", INJECTED, ids=[f"{job}-{path}" for job, path in INJECTED])
def test_a_failure_of_our_code_in_any_path_answers_that_input_and_the_job_goes_on(
        job, path, injected_runs, trained_models, settings):
    """A RuntimeError raised by the job's own code, in each path a record or a model takes
    (splitting and keying a batch, parsing, scoring, serialization, metrics, statistics and
    their publishing, keying, building and installing a model): the job finishes
    (no exception from Flink, no restart: every record answered exactly once), every record
    is scored by the model that serves, with the right prediction, and the failing input
    becomes exactly one INTERNAL_ERROR dead letter of that exception; a record that can still
    be served (a failure in metrics, statistics or the broadcast job's spreading key) is
    scored. Either way the failure is logged at ERROR with its stack trace."""
    run = injected_runs(job)
    results, dead, errors, records, models = (run[k] for k in ("results", "dead", "errors",
                                                                "records", "models"))
    onnx_name = trained_models[ModelType.ONNX].name

    # every record that can be served is scored once, by the ONNX model, rightly: the marker
    # models (failing to build or install, or keyed under a failure key) replaced nothing
    by_id = {}
    for result in results:
        assert result.recordId not in by_id, f"{result.recordId} answered twice"
        by_id[result.recordId] = result
    assert set(by_id) == set(run["expected"])
    for record_id, prediction in run["expected"].items():
        result = by_id[record_id]
        assert result.status == ServingResult.SCORED and result.modelName == onnx_name
        assert result.label == prediction.label
        assert list(result.probabilities) == pytest.approx(list(prediction.probabilities), abs=1e-6)
    # every other input is dead-lettered once, as INTERNAL_ERROR of a RuntimeError
    failing_inputs = {path: raw for path, raw in models.items() if path != "onnx"}
    failing_inputs.update({path: records[f"inject-{path}"] for path in ("parse", "score", "serialize")})
    if job == "keyed":
        failing_inputs["batch-key"] = records["inject-batch-key"]
    assert sorted(letter.raw for letter in dead) == sorted(failing_inputs.values())
    assert {(letter.kind, letter.exceptionType) for letter in dead} == \
        {(DeadLetter.INTERNAL_ERROR, "RuntimeError")}

    # this path
    where, failure, model_input = {
        "batch-key": ("splitting a batch by data type" if job == "keyed" else
                      "selecting the spreading key of a batch", "batch key", False),
        "parse": ("parsing a record", "parsing", False),
        "score": ("scoring with ", "scoring", False),
        "serialize": ("serializing a result", "serialization", False),
        "metrics": ("counting outcomes", "metrics", False),
        "statistics": ("keeping statistics", "statistics", False),
        "publish": ("publishing statistics", "publishing", False),
        "model-key": ("selecting the key of a model", "model key", True),
        "model-build": ("building a model", "model parsing", True),
        "model-install": ("installing a model", "model installation", True),
    }[path]
    stated = f"RuntimeError: injected {failure} failure"
    assert errors.logged(f"internal error {where}", stated), errors.lines
    if path in failing_inputs:
        [letter] = [d for d in dead if d.raw == failing_inputs[path]]
        # the join tells a batch it got under a failure key, not the failing operator itself
        relayed = "splitting or keying a batch" if path == "batch-key" else where
        assert letter.reason.startswith(f"internal error {relayed}") and letter.reason.endswith(stated)
        assert letter.sourceTopic == (settings.models_topic if model_input else settings.data_topic)
        assert letter.rawSize == len(failing_inputs[path]) and not letter.rawTruncated
    elif path != "publish":
        assert f"inject-{path}" in by_id            # served, despite the failure


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
    """Model calls of up to 16 records give byte-identical results to scoring each record alone, for a vector model (ONNX) and a PMML model, bad records included."""
    rows = demo_rows()[:70]
    other = [Row("cultivar-pmml", r.names, r.values, "p" + r.record_id) for r in rows[:40]]
    bad = Row(DEMO_DATA_TYPE, rows[1].names, (math.nan,) + rows[1].values[1:], "nan-row")
    records = [encode_record(r) for r in rows + other + [bad]] + [b"\xff\xfe garbage"]
    models = [descriptor_for(trained_models[ModelType.ONNX]).SerializeToString(),
              descriptor_for(trained_models[ModelType.PMML], data_type="cultivar-pmml").SerializeToString()]
    outputs = {}
    for size in (1, 16):
        batching = settings.replace(batch_max_size=size)
        results, dead = run_job(job, records, models, batching, batches=in_batches(records, 40))
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


def named(model, model_id: str, data_type: str) -> bytes:
    descriptor = descriptor_for(model, data_type=data_type)
    descriptor.modelId = model_id
    return descriptor.SerializeToString()


def speculative_set(data_type: str, models: list[str], decider: int = 0, budget_ms: int = 5000,
                    end: bool = False) -> bytes:
    from protos import SpeculativeSet

    descriptor = ModelDescriptor(name="set", dataType=data_type, withdraw=end)
    descriptor.speculative.CopyFrom(SpeculativeSet(models=models, budgetMs=budget_ms,
                                                   decider=decider))
    return descriptor.SerializeToString()


@pytest.mark.parametrize("job", JOBS)
def test_a_speculative_set_scores_with_all_its_models_and_ending_it_restores_one_model(
        job, trained_models, settings):
    """Data type A: a CONFIDENCE set of a PMML and an ONNX model (named models coexist); each
    result is the more confident model's answer and names both as answered. Data type B: the
    same set, then its end: B is served by its latest model alone, without speculation."""
    from protos import SpeculativeSet

    rows = demo_rows()[:40]
    spec = [Row("spec-a", r.names, r.values, "a" + r.record_id) for r in rows]
    single = [Row("spec-b", r.names, r.values, "b" + r.record_id) for r in rows[:20]]
    onnx, pmml = trained_models[ModelType.ONNX], trained_models[ModelType.PMML]
    models = [named(onnx, "onnx", "spec-a"), named(pmml, "pmml", "spec-a"),
              speculative_set("spec-a", ["pmml", "onnx"], SpeculativeSet.CONFIDENCE),
              named(pmml, "pmml", "spec-b"), named(onnx, "onnx", "spec-b"),
              speculative_set("spec-b", ["pmml", "onnx"]),
              speculative_set("spec-b", ["pmml"], end=True)]
    results, dead = run_job(job, [encode_record(r) for r in spec + single], models, settings)
    assert dead == []
    by_id = {r.recordId: r for r in results}
    assert len(by_id) == len(spec) + len(single)
    dirs = settings.resolved_model_dirs()
    alone = {name: expected_predictions(models[index], spec, dirs)
             for index, name in ((0, "onnx"), (1, "pmml"))}
    for row in spec:
        result = by_id[row.record_id]
        confidence = {name: max(alone[name][row.record_id].probabilities) for name in alone}
        winner = "onnx" if confidence["onnx"] > confidence["pmml"] else "pmml"
        assert result.modelId == winner, (row.record_id, confidence)
        assert result.label == alone[winner][row.record_id].label
        assert list(result.speculative.answered) == ["pmml", "onnx"]
        assert result.speculative.decider == SpeculativeSet.CONFIDENCE
    # the ONNX model (listed second) is the more confident on these rows: not the preferred order
    assert {by_id[r.record_id].modelId for r in spec} == {"onnx"}
    for row in single:
        result = by_id[row.record_id]
        assert (result.modelId, result.modelType) == ("onnx", ModelType.ONNX)
        assert not result.HasField("speculative")


def external_descriptor(url: str, data_type: str = DEMO_DATA_TYPE) -> bytes:
    from modelserving.demo.training import demo_dataset
    from protos import ExternalModel

    return ModelDescriptor(
        name="wine-external", version="1", dataType=data_type, modeltype=ModelType.EXTERNAL,
        inputFeatures=list(demo_dataset().feature_names), classLabels=["0", "1", "2"],
        server=ExternalModel(url=url, outputs=["predict", "predict_proba"])).SerializeToString()


@pytest.mark.parametrize("job,in_flight", [("keyed", 4), ("broadcast", 4), ("keyed", 1)])
def test_batches_await_their_model_server_side_by_side(job, in_flight, trained_models, settings):
    """With ``model_server_batches_in_flight`` above 1 a subtask has several batches of an
    EXTERNAL model awaiting the server at once (the server sees concurrent calls; one data
    type, so the keyed job has one key), every record is answered once, with the answer of
    the model the server runs, and the end of the input waits for the last answers. With 1,
    one call at a time per subtask."""
    from model_server_faults import SLOW, FaultyModelServer, sklearn_v2_backend

    onnx = trained_models[ModelType.ONNX]
    rows = demo_rows()[:96]
    expected = expected_predictions(descriptor_for(onnx).SerializeToString(), rows,
                                    settings.resolved_model_dirs())
    with FaultyModelServer(sklearn_v2_backend(onnx.estimator), mode=SLOW, delay_s=0.05) as server:
        overlapping = settings.replace(model_servers=(server.url,), model_server_timeout_ms=20_000,
                                       model_server_batches_in_flight=in_flight)
        results, dead = run_job(job, [encode_record(r) for r in rows],
                                [external_descriptor(server.url)], overlapping)
    assert dead == []
    assert sorted(r.recordId for r in results) == sorted(r.record_id for r in rows)
    for result in results:
        assert (result.status, result.modelName) == (ServingResult.SCORED, "wine-external")
        assert result.label == expected[result.recordId].label
        assert list(result.probabilities) == pytest.approx(
            list(expected[result.recordId].probabilities), abs=1e-5)
    if in_flight > 1:
        assert server.most_in_progress >= 2
    else:   # the keyed job's one key lives on one subtask
        assert server.most_in_progress == 1


# -- the model lifecycle: the validation gate, and which model scored each record --------------

def version_of(model, version: str, **fields) -> bytes:
    """``model``'s descriptor as version ``version`` (``fields`` set more of it)."""
    descriptor = descriptor_for(model)
    descriptor.version = version
    for name, value in fields.items():
        if isinstance(value, Validation):
            descriptor.validation.CopyFrom(value)
        else:
            setattr(descriptor, name, value)
    return descriptor.SerializeToString()


def validation_of(rows: list[Row], labels: dict[str, str], min_accuracy: float) -> Validation:
    from udfs.lifecycle.validation import FileRow, validation_from_rows

    return validation_from_rows([FileRow(r.record_id, dict(zip(r.names, r.values)),
                                         expected_label=labels[r.record_id]) for r in rows],
                                DEMO_DATA_TYPE, min_accuracy=min_accuracy)


@pytest.mark.parametrize("job", JOBS)
def test_a_model_that_misses_its_validation_gate_is_refused_and_the_previous_one_serves_on(
        job, trained_models, settings):
    """The job scores a descriptor's validation rows with the new model before it takes over:
    a PMML model expected to answer labels it does not is dead-lettered with the measured
    figures (once, whatever the parallelism) and the ONNX model before it scores every
    record, its digest on each result."""
    onnx_model, pmml_model = trained_models[ModelType.ONNX], trained_models[ModelType.PMML]
    onnx = version_of(onnx_model, "1")
    gate_rows = demo_rows()[-20:]
    predicted = expected_predictions(descriptor_for(pmml_model).SerializeToString(), gate_rows,
                                     settings.resolved_model_dirs())
    labels = list(pmml_model.class_labels)
    wrong = {r.record_id: labels[(labels.index(predicted[r.record_id].label) + 1) % len(labels)]
             for r in gate_rows}
    refused = version_of(pmml_model, "2", validation=validation_of(gate_rows, wrong, 0.9))
    rows = demo_rows()[:40]
    results, dead = run_job(job, [encode_record(r) for r in rows], [onnx, refused], settings)

    [letter] = dead
    assert (letter.kind, letter.raw, letter.exceptionType) == (DeadLetter.BAD_MODEL, refused,
                                                               "ValidationFailed")
    assert letter.reason == (f"validation failed on 20 rows: accuracy 0.0000 < minimum 0.9 "
                             f"(0/20 labels) (first: row 0 (id '{gate_rows[0].record_id}'): label "
                             f"'{predicted[gate_rows[0].record_id].label}', expected "
                             f"'{wrong[gate_rows[0].record_id]}') (model '{pmml_model.name}' "
                             f"version '2', data type '{DEMO_DATA_TYPE}')")
    assert (letter.modelName, letter.modelVersion) == (pmml_model.name, "2")
    expected = expected_predictions(onnx, rows, settings.resolved_model_dirs())
    digest = hashlib.sha256(onnx_model.path.read_bytes()).hexdigest()
    assert sorted(r.recordId for r in results) == sorted(r.record_id for r in rows)
    for result in results:
        assert (result.status, result.modelName, result.modelVersion, result.modelDigest) == \
            (ServingResult.SCORED, onnx_model.name, "1", digest)
        assert result.label == expected[result.recordId].label


class HandledInOrder:
    """One ordered stream of models and record batches across the join's two inputs: the
    join leaves a file per element it handled, named by its subtask, its own count and the
    element (``m<offset>`` for a model, ``b<partition>.<first offset>`` for a batch), and each
    element waits until the join handled every element before it (a model on every instance
    that holds it). A directory works across threads and Python worker processes alike."""

    def __init__(self, marks: str, timeout_s: float = 120.0):
        self.marks = marks
        self.timeout_s = timeout_s

    def mark(self, subtask: int, count: int, element: str) -> None:
        Path(self.marks, f"{subtask}-{count:06d}-{element}").touch()

    def wait(self, handled: int) -> None:
        deadline = time.monotonic() + self.timeout_s
        while len(os.listdir(self.marks)) < handled:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the join handled {len(os.listdir(self.marks))} of {handled} "
                                   f"elements in {self.timeout_s} s")
            time.sleep(0.01)

    def per_subtask(self) -> dict[int, list[str]]:
        """The elements each subtask's join handled, in its order."""
        handled: dict[int, list[tuple[int, str]]] = {}
        for name in os.listdir(self.marks):
            subtask, count, element = name.split("-", 2)
            handled.setdefault(int(subtask), []).append((int(count), element))
        return {subtask: [element for _, element in sorted(elements)]
                for subtask, elements in handled.items()}


def sequenced_join(job: str, settings: Settings, order: HandledInOrder):
    """The job's own join function, marking ``order`` after each model and each batch."""
    from udfs.flink.joins import BroadcastServing, KeyedServing

    class Sequenced(KeyedServing if job == "keyed" else BroadcastServing):
        def note(self, element: str) -> None:
            self.handled = getattr(self, "handled", 0) + 1
            order.mark(self.subtask, self.handled, element)

        def on_batch(self, ctx, key, partition, offsets, records):
            yield from super().on_batch(ctx, key, partition, offsets, records)
            self.note(f"b{partition}.{offsets[0]}")

        def on_message(self, message, ctx, report=True):
            yield from super().on_message(message, ctx, report)
            self.note(f"m{message[1]}")

    return Sequenced(settings, {})


def run_interleaved(job: str, stream: list[tuple[str, object]], settings: Settings,
                    shadow: list | None = None):
    """Run ``job`` on one ordered stream of ("model", descriptor bytes) and ("batch", record
    bytes) elements: each reaches the join only once the join handled every element before
    it (``HandledInOrder``). Returns the results, the dead letters, per subtask the elements
    its join handled in order, and the stream's elements by name (``m<offset>``,
    ``b<partition>.<first offset>``) in stream order. ``shadow``: see ``executed``."""
    from pyflink.common import Types
    from pyflink.datastream import MapFunction

    import importlib

    build_pipeline = importlib.import_module(f"jobs.{job}_job").build_pipeline
    from jobs.pipeline import create_environment
    from udfs.flink.batches import MODEL_MESSAGE, RECORD_BATCH

    class InOrder(Decode, MapFunction):
        """Decodes an element once the join handled the count written before it ("N|...")."""

        def __init__(self, order: HandledInOrder, model: bool = False):
            super().__init__(None, model)
            self.order = order

        def map(self, value):
            handled, _, element = value.partition("|")
            self.order.wait(int(handled))
            return super().map(element)

    # one element per bundle: an element waiting in the decoder must not hold back the one
    # before it in a bundle the Python worker has not finished
    settings = settings.replace(bundle_size=1)
    copies = 1 if job == "keyed" else settings.parallelism   # instances that handle a model
    batches = positioned([records for kind, records in stream if kind == "batch"])
    handled, models, records, named = 0, [], [], {}
    for kind, element in stream:
        if kind == "model":
            name = f"m{len(models)}"
            models.append(f"{handled}|" + encoded(0, [len(models)], [element]))
            handled += copies
        else:
            partition, offsets, batch = batches[len(records)]
            name = f"b{partition}.{offsets[0]}"
            records.append(f"{handled}|" + encoded(partition, offsets, batch))
            handled += 1
        named[name] = element
    with tempfile.TemporaryDirectory(prefix="handled-in-order-") as marks:
        order = HandledInOrder(marks)
        env = create_environment(settings, with_connector=False)
        data = env.from_collection(records, type_info=Types.STRING()) \
            .map(InOrder(order), output_type=RECORD_BATCH).set_parallelism(1)
        model_stream = env.from_collection(models, type_info=Types.STRING()) \
            .map(InOrder(order, model=True), output_type=MODEL_MESSAGE).set_parallelism(1)
        results, dead_letters = build_pipeline(data, model_stream, settings,
                                               serving=sequenced_join(job, settings, order))
        results, dead = executed(results, dead_letters, shadow)
        per_subtask = order.per_subtask()
    return results, dead, per_subtask, named


@pytest.mark.parametrize("job", JOBS)
def test_every_result_names_the_model_current_at_its_records_position(job, trained_models,
                                                                     settings):
    """Records interleaved with three model switches (ONNX, PMML, the ONNX file again by
    location, PMML again with a validation gate it passes), in one ordered stream: every
    result names the model (name, version, digest) that was current for its data type at
    its record's position, on the instance that scored it (each instance's own order of
    models and batches, as its join handled them), and was scored by that model."""
    onnx_model, pmml_model = trained_models[ModelType.ONNX], trained_models[ModelType.PMML]
    gate_rows = demo_rows()[-10:]
    pmml_labels = expected_predictions(descriptor_for(pmml_model).SerializeToString(), gate_rows,
                                       settings.resolved_model_dirs())
    models = [version_of(onnx_model, "1"), version_of(pmml_model, "2"),
              version_of(onnx_model, "3", location=str(onnx_model.path.resolve())),
              version_of(pmml_model, "4", validation=validation_of(
                  gate_rows, {r: p.label for r, p in pmml_labels.items()}, 1.0))]
    onnx_digest = hashlib.sha256(onnx_model.path.read_bytes()).hexdigest()
    pmml_digest = hashlib.sha256(pmml_model.path.read_bytes()).hexdigest()
    named = {models[0]: (onnx_model.name, "1", onnx_digest),
             models[1]: (pmml_model.name, "2", pmml_digest),
             models[2]: (onnx_model.name, "3", onnx_digest),
             models[3]: (pmml_model.name, "4", pmml_digest)}
    rows = demo_rows()[:56]
    raws = [encode_record(r) for r in rows]
    batches = in_batches(raws)                                      # seven batches of 8
    stream = [("batch", batches[0]), ("model", models[0]), ("batch", batches[1]),
              ("batch", batches[2]), ("model", models[1]), ("batch", batches[3]),
              ("model", models[2]), ("batch", batches[4]), ("batch", batches[5]),
              ("model", models[3]), ("batch", batches[6])]
    results, dead, per_subtask, elements = run_interleaved(job, stream, settings)
    assert dead == []
    assert sorted(r.recordId for r in results) == sorted(r.record_id for r in rows)

    batch_of_record = {record: name for name, element in elements.items()
                       if isinstance(element, list) for record in element}
    record_of_id = {r.record_id: raw for r, raw in zip(rows, raws)}
    in_stream = {}   # the model current at each batch in the stream, None before the first
    current = None
    for name, element in elements.items():
        if name.startswith("m"):
            current = element
        else:
            in_stream[name] = current
    predictions = {raw: expected_predictions(raw, rows, settings.resolved_model_dirs())
                   for raw in models}
    for result in results:
        batch = batch_of_record[record_of_id[result.recordId]]
        handled = per_subtask[result.subtask]
        before = handled[:handled.index(batch)]
        models_before = [m for m in before if m.startswith("m")]
        on_instance = elements[models_before[-1]] if models_before else None
        assert on_instance == in_stream[batch], (result.recordId, result.subtask, handled)
        if on_instance is None:
            assert result.status == ServingResult.NO_MODEL
            assert (result.modelName, result.modelDigest) == ("", "")
            continue
        assert result.status == ServingResult.SCORED
        assert (result.modelName, result.modelVersion, result.modelDigest) == named[on_instance]
        assert result.label == predictions[on_instance][result.recordId].label
    # every instance that scored saw every switch, in the stream's order
    for subtask, handled in per_subtask.items():
        assert [m for m in handled if m.startswith("m")] == ["m0", "m1", "m2", "m3"]
    assert {r.modelVersion for r in results} == {"", "1", "2", "3", "4"}
    if job == "broadcast":
        assert {r.subtask for r in results} == {0, 1}


def rolled_out(model, version: str, action: int = 0, mode: int = 0, share: float = 0.0) -> bytes:
    """``model``'s descriptor as version ``version`` with a rollout (DEPLOY by default)."""
    from protos import Rollout

    descriptor = ModelDescriptor.FromString(version_of(model, version))
    descriptor.rollout.CopyFrom(Rollout(action=action, mode=mode, share=share))
    return descriptor.SerializeToString()


def rollout_control(action: int) -> bytes:
    from protos import Rollout

    return ModelDescriptor(dataType=DEMO_DATA_TYPE, publishedMs=1,
                           rollout=Rollout(action=action)).SerializeToString()


@pytest.mark.parametrize("job", JOBS)
def test_shadow_then_canary_then_promotion(job, trained_models, settings):
    """In one ordered stream: ONNX v1 serves with PMML v2 as its shadow (every result is
    v1's, every record's v2 result is on the shadow output), then PMML v3 replaces the
    shadow as a 50% canary (each record answered by v3 exactly when the routing by its id
    says so, on whichever instance), then v3 is promoted (every result v3's), then an abort
    finds no candidate (one dead letter, whatever the parallelism)."""
    from protos import Rollout
    from udfs.candidates import without_rollout
    from udfs.lifecycle.routing import goes_to_candidate
    from udfs.models import model_id

    onnx_model, pmml_model = trained_models[ModelType.ONNX], trained_models[ModelType.PMML]
    primary = version_of(onnx_model, "1")
    shadowed = rolled_out(pmml_model, "2", mode=Rollout.SHADOW)
    canary = rolled_out(pmml_model, "3", mode=Rollout.CANARY, share=0.5)
    rows = demo_rows()[:64]
    raws = [encode_record(r) for r in rows]
    batches = in_batches(raws)                                      # eight batches of 8
    stream = [("model", primary), ("model", shadowed), ("batch", batches[0]), ("batch", batches[1]),
              ("model", canary), ("batch", batches[2]), ("batch", batches[3]),
              ("batch", batches[4]), ("model", rollout_control(Rollout.PROMOTE)),
              ("batch", batches[5]), ("batch", batches[6]),
              ("model", rollout_control(Rollout.ABORT)), ("batch", batches[7])]
    shadow: list[ServingResult] = []
    results, dead, _, _ = run_interleaved(job, stream, settings, shadow)

    dirs = settings.resolved_model_dirs()
    onnx_labels = {r: p.label for r, p in expected_predictions(primary, rows, dirs).items()}
    pmml_labels = {r: p.label for r, p in expected_predictions(
        version_of(pmml_model, "2"), rows, dirs).items()}
    salt = model_id(without_rollout(ModelDescriptor.FromString(canary)))
    ids = [r.record_id for r in rows]
    phase = {record_id: index // 8 for index, record_id in enumerate(ids)}
    expected = {}
    for record_id in ids:
        if phase[record_id] < 2:
            expected[record_id] = ("1", onnx_labels[record_id])
        elif phase[record_id] < 5 and not goes_to_candidate(record_id, 0.5, salt):
            expected[record_id] = ("1", onnx_labels[record_id])
        else:
            expected[record_id] = ("3", pmml_labels[record_id])
    assert {r.recordId: (r.modelVersion, r.label) for r in results} == expected
    assert len(results) == len(rows)
    canaried = [r for r in ids if 2 <= phase[r] < 5 and expected[r][0] == "3"]
    assert 0 < len(canaried) < 24   # some of the canary's 24 records, not all

    assert {r.recordId: (r.modelVersion, r.label) for r in shadow} == \
        {r: ("2", pmml_labels[r]) for r in ids if phase[r] < 2}
    assert len(shadow) == 16
    [letter] = dead
    assert letter.kind == DeadLetter.BAD_MODEL
    assert "has no candidate model to abort" in letter.reason
