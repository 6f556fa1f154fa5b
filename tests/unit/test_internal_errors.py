"""No record and no model can restart a job: failures of the project's own code become
INTERNAL_ERROR dead letters, are counted, and are logged with a stack trace at most once a
minute per kind of failure."""
from __future__ import annotations

import logging

import pytest

from jobs.settings import Settings
from modelserving.demo.training import DEMO_DATA_TYPE, demo_dataset
from modelserving.kafka.clients import Row, encode_record
from protos import DeadLetter, ModelDescriptor, ModelType, ServingResult
from udfs.errors import RecordError
from udfs.failures import FailureLog
from udfs.flink.joins import DEAD_LETTERS, KeyedServing
from udfs.flink.metrics import ServingMetrics
from udfs.models import ModelInfo
from udfs.runtimes.base import Prediction
from udfs.serving import BAD_RECORD, INTERNAL_ERROR, SCORED, LoadedModel, ModelServer, Outcome


@pytest.fixture(scope="module")
def rows():
    names, X, y, labels = demo_dataset()
    return [Row(DEMO_DATA_TYPE, tuple(names), tuple(map(float, X[i])), f"r{i}") for i in range(6)]


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


class FailsOn:
    """A runtime that raises ``error`` for any batch holding the record whose first feature
    is ``marker``, and scores every other record 1.0."""

    def __init__(self, names, marker: float, error: Exception):
        self.input_names, self.marker, self.error = tuple(names), marker, error
        self.calls = []

    def score(self, batch):
        self.calls.append(len(batch))
        if (batch.values[:, 0] == self.marker).any():
            raise self.error
        return [Prediction(1.0) for _ in range(len(batch))]

    def close(self):
        pass


def model_of(runtime) -> LoadedModel:
    info = ModelInfo(data_type=DEMO_DATA_TYPE, name="m", version="1", description="",
                     model_type=ModelType.ONNX, model_id="id")
    return LoadedModel(info=info, raw=b"", runtime=runtime, since_ms=0)


def marked(rows, at: int, marker: float = -12345.0):
    row = rows[at]
    return rows[:at] + [Row(row.data_type, row.names, (marker,) + row.values[1:], "marked")] + rows[at + 1:]


def server_with(log_records):
    clock = Clock()
    logger = logging.getLogger("test-internal-errors")
    logger.handlers[:] = [ListHandler(log_records)]
    logger.propagate = False
    return ModelServer(max_model_bytes=1000, data_topic="mdata", models_topic="models",
                       failures=FailureLog(logger, clock=clock)), clock


class ListHandler(logging.Handler):
    def __init__(self, records):
        super().__init__(logging.DEBUG)
        self.records = records

    def emit(self, record):
        self.records.append(record)


def test_a_record_the_runtime_fails_on_is_an_internal_error_and_the_batch_is_still_scored(rows):
    logged = []
    server, _ = server_with(logged)
    runtime = FailsOn(rows[0].names, -12345.0, RuntimeError("boom"))
    records = marked(rows, 2)
    raws = [encode_record(r) for r in records]
    outcomes = server.serve(raws, model_of(runtime))
    assert [o.kind for o in outcomes] == [SCORED, SCORED, INTERNAL_ERROR, SCORED, SCORED, SCORED]
    assert runtime.calls[0] == len(records)       # the batch first, then record by record
    assert [ServingResult.FromString(o.payload).recordId for o in outcomes if o.kind == SCORED] == \
        [r.record_id for r in records if r.record_id != "marked"]
    letter = DeadLetter.FromString(outcomes[2].payload)
    assert letter.kind == DeadLetter.INTERNAL_ERROR and letter.exceptionType == "RuntimeError"
    assert "RuntimeError: boom" in letter.reason and letter.raw == raws[2]
    assert letter.dataType == DEMO_DATA_TYPE and letter.modelName == "m"
    assert outcomes[2].is_dead_letter
    [error] = logged
    assert error.levelno == logging.ERROR and error.exc_info and "boom" in error.getMessage()


def test_a_record_error_raised_by_the_runtime_stays_a_bad_record(rows):
    server, _ = server_with([])
    runtime = FailsOn(rows[0].names, -12345.0, RecordError("the model refuses it"))
    outcomes = server.serve([encode_record(r) for r in marked(rows, 0)], model_of(runtime))
    assert [o.kind for o in outcomes] == [BAD_RECORD] + [SCORED] * 5
    assert DeadLetter.FromString(outcomes[0].payload).kind == DeadLetter.BAD_RECORD


def test_a_parser_bug_is_an_internal_error_of_that_record_only(rows, monkeypatch):
    import udfs.serving
    real = udfs.serving.parse_record

    def parse(raw):
        record = real(raw)
        if record.record_id == "marked":
            raise KeyError("bug")
        return record
    monkeypatch.setattr(udfs.serving, "parse_record", parse)
    server, _ = server_with([])
    runtime = FailsOn(rows[0].names, -999.0, RuntimeError("never"))
    outcomes = server.serve([encode_record(r) for r in marked(rows, 4, 1.0)], model_of(runtime))
    assert [o.kind for o in outcomes] == [SCORED] * 4 + [INTERNAL_ERROR, SCORED]
    assert "internal error parsing a record: KeyError" in DeadLetter.FromString(outcomes[4].payload).reason


def test_stack_traces_are_logged_once_per_window_per_kind_with_a_count_of_the_rest(rows):
    logged = []
    server, clock = server_with(logged)
    runtime = FailsOn(rows[0].names, -12345.0, RuntimeError("boom"))
    model = model_of(runtime)
    raw = encode_record(marked(rows, 0)[0])
    for _ in range(5):
        assert server.serve([raw], model)[0].kind == INTERNAL_ERROR
    assert len(logged) == 1
    server.failures.failed("elsewhere", RuntimeError("other place"))   # another kind: logged
    server.failures.failed("scoring with " + str(model.info), ValueError("other type"))
    assert len(logged) == 3
    clock.now += 61
    server.serve([raw], model)
    assert len(logged) == 4
    assert "4 more like it in the last 61 s were not logged" in logged[-1].getMessage()
    assert all(r.exc_info for r in logged)


class Group:
    """A metric group of the fake runtime context: gauges by full name."""

    def __init__(self, gauges, prefix=""):
        self.gauges, self.prefix = gauges, prefix

    def add_group(self, name, value=None):
        return Group(self.gauges, f"{self.prefix}{name}." + (f"{value}." if value is not None else ""))

    def gauge(self, name, read):
        self.gauges[self.prefix + name] = read


class State:
    def __init__(self):
        self.v = None

    def value(self):
        return self.v

    def update(self, v):
        self.v = v

    def clear(self):
        self.v = None


class MapState(dict):
    def put(self, k, v):
        self[k] = v

    def contains(self, k):
        return k in self


class Context:
    """Runtime context, timer service and element context of the keyed join, in memory."""

    def __init__(self):
        self.gauges = {}
        self.key = DEMO_DATA_TYPE
        self.timers = []

    def get_metrics_group(self):
        return Group(self.gauges)

    def get_index_of_this_subtask(self):
        return 0

    def get_map_state(self, descriptor):
        return MapState()

    def get_state(self, descriptor):
        return State()

    def get_current_key(self):
        return self.key

    def timer_service(self):
        return self

    def current_processing_time(self):
        return 0

    def register_processing_time_timer(self, t):
        self.timers.append(t)

    def metric(self, name):
        return self.gauges["modelserving." + name]()


@pytest.fixture()
def join():
    settings = Settings(state_topic="", batch_max_size=1)
    function = KeyedServing(settings, {})
    context = Context()
    function.open(context)
    yield function, context
    function.close()


def test_the_join_dead_letters_a_model_it_fails_to_build_and_counts_it(join, monkeypatch):
    function, context = join
    monkeypatch.setattr(function.server, "build", lambda raw: 1 / 0)
    raw = ModelDescriptor(name="m", dataType=DEMO_DATA_TYPE, modeltype=ModelType.ONNX,
                          data=b"x").SerializeToString()
    [(tag, payload)] = list(function.process_element2(raw, context))
    letter = DeadLetter.FromString(payload)
    assert tag is DEAD_LETTERS and letter.kind == DeadLetter.INTERNAL_ERROR
    assert "ZeroDivisionError" in letter.reason and letter.sourceTopic == "models"
    assert context.metric("internal_errors") == 1


def test_the_join_survives_failing_lookup_statistics_and_metrics(join, rows, monkeypatch):
    function, context = join
    monkeypatch.setattr(function, "model_lookup", lambda ctx, data_type: {}["missing"])
    monkeypatch.setattr(function.stats, "get", lambda key: 1 / 0)            # statistics
    monkeypatch.setattr(function.publisher, "publish", lambda key, value: 1 / 0)
    raw = encode_record(rows[0])
    [(tag, payload)] = list(function.process_element1(raw, context))
    letter = DeadLetter.FromString(payload)
    assert tag is DEAD_LETTERS and letter.kind == DeadLetter.INTERNAL_ERROR
    assert "internal error serving a batch: KeyError" in letter.reason
    assert context.metric("internal_errors") == 1
    assert context.metric(f"datatype.{DEMO_DATA_TYPE}.internal_errors") == 1
    function.publish(function.stats.__class__())  # never raises
    function.metrics.count([object()])              # a broken outcome: logged, not raised


def test_metrics_count_internal_errors_apart_from_bad_records():
    context = Context()
    metrics = ServingMetrics(context)
    metrics.count([Outcome(INTERNAL_ERROR, b"", "t"), Outcome(BAD_RECORD, b"", "t"),
                   Outcome(SCORED, b"", "t", 3.0)])
    assert context.metric("internal_errors") == 1 and context.metric("dead_letters_records") == 1
    assert context.metric("records_scored") == 1
    metrics.internal_error("t")
    assert context.metric("internal_errors") == 2 and context.metric("datatype.t.internal_errors") == 2
