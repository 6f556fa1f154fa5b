"""No record and no model can restart a job: failures of the project's own code become
INTERNAL_ERROR dead letters, are counted, and are logged with a stack trace at most once a
minute per kind of failure."""
from __future__ import annotations

import logging

import pytest
from pyflink.datastream import TimeDomain

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
    # the record's dead letter, and the statistics that failed on it (served on without them)
    assert context.metric("internal_errors") == 2
    assert context.metric(f"datatype.{DEMO_DATA_TYPE}.internal_errors") == 2
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


# -- every per-record and per-model path: nothing our code raises reaches Flink -------------------

class ListState:
    """Keyed list state of the one key the tests use."""

    def __init__(self):
        self.values = []

    def get(self):
        return list(self.values)

    def add(self, value):
        self.values.append(value)

    def clear(self):
        self.values = []


class BatchingContext(Context):
    """The keyed join's context with micro-batching: list state, both kinds of timers, and
    the time domain of the timer that fires."""

    def __init__(self):
        super().__init__()
        self.event_timers = []
        self.domain = None

    def get_list_state(self, descriptor):
        return ListState()

    def register_event_time_timer(self, t):
        self.event_timers.append(t)

    def time_domain(self):
        return self.domain


def model_named(runtime, name: str = "m") -> LoadedModel:
    info = ModelInfo(data_type=DEMO_DATA_TYPE, name=name, version="1", description="",
                     model_type=ModelType.ONNX, model_id="id-" + name)
    return LoadedModel(info=info, raw=name.encode(), runtime=runtime, since_ms=0)


def answers(outputs):
    """(results' record ids, dead letters) of a join's outputs."""
    results = [ServingResult.FromString(o).recordId for o in outputs if not isinstance(o, tuple)]
    letters = [DeadLetter.FromString(o[1]) for o in outputs if isinstance(o, tuple)]
    return results, letters


@pytest.fixture()
def batching_join(rows, monkeypatch):
    """The keyed join with batches of up to 4, serving every data type with a model that
    scores every record 1.0."""
    settings = Settings(state_topic="", batch_max_size=4, batch_max_wait_ms=100)
    function = KeyedServing(settings, {})
    context = BatchingContext()
    function.open(context)
    model = model_of(FailsOn(rows[0].names, -999.0, RuntimeError("never")))
    monkeypatch.setattr(function.server, "current", lambda data_type, model_id, stored: model)
    yield function, context
    function.close()


def errors_of(caplog, where: str):
    return [r for r in caplog.records if r.levelno == logging.ERROR and r.exc_info
            and r.getMessage().startswith(f"internal error {where}")]


def test_key_selectors_never_raise_they_log_count_and_fall_back(rows, caplog):
    from udfs.flink.keys import (FAILED_KEY, ModelDataType, RecordDataType, SpreadKey,
                                 key_failure)

    record_key, model_key, spread = RecordDataType(), ModelDataType(), SpreadKey((5, 7))
    contexts = [Context() for _ in range(3)]
    for selector, context in zip((record_key, model_key, spread), contexts):
        selector.open(context)
    raw = encode_record(rows[0])
    assert record_key.get_key(raw) == DEMO_DATA_TYPE and record_key.get_key(b"\xff") == ""
    assert spread.get_key(raw) in (5, 7)
    descriptor = ModelDescriptor(name="m", dataType="t").SerializeToString()
    assert model_key.get_key(descriptor) == "t" and model_key.get_key(b"") == ""
    # a value that is not bytes: the parsers raise TypeError, which they do not expect
    key = record_key.get_key(None)
    assert key.startswith(FAILED_KEY) and key_failure(key).startswith("TypeError: ")
    assert key_failure(model_key.get_key("text")).startswith("TypeError: ")
    assert spread.get_key(None) == 5                 # the record is served anyway
    assert [c.metric("internal_errors") for c in contexts] == [1, 1, 1]
    assert len(errors_of(caplog, "selecting the key of a record: TypeError")) == 1
    assert len(errors_of(caplog, "selecting the key of a model: TypeError")) == 1
    assert len(errors_of(caplog, "selecting the spreading key of a record: TypeError")) == 1
    assert key_failure(DEMO_DATA_TYPE) is None and key_failure("") is None and key_failure(5) is None
    long = RecordDataType()
    long.select = lambda raw: (_ for _ in ()).throw(ValueError("x" * 1000))
    assert len(long.get_key(raw)) < 300              # the failure key is bounded


def test_the_keyed_join_dead_letters_what_arrives_under_a_failure_key(join, rows):
    from udfs.flink.keys import failure_key

    function, context = join
    raw = encode_record(rows[0])
    context.key = failure_key(RuntimeError("boom"))
    [(tag, payload)] = list(function.process_element1(raw, context))
    letter = DeadLetter.FromString(payload)
    assert tag is DEAD_LETTERS and letter.kind == DeadLetter.INTERNAL_ERROR and letter.raw == raw
    assert letter.exceptionType == "RuntimeError" and letter.sourceTopic == "mdata"
    assert letter.reason == "internal error selecting the key of a record: RuntimeError: boom"
    descriptor = ModelDescriptor(name="m", dataType=DEMO_DATA_TYPE).SerializeToString()
    [(tag, payload)] = list(function.process_element2(descriptor, context))
    letter = DeadLetter.FromString(payload)
    assert letter.kind == DeadLetter.INTERNAL_ERROR and letter.sourceTopic == "models"
    assert letter.reason == "internal error selecting the key of a model: RuntimeError: boom"
    assert context.metric("internal_errors") == 2
    assert function.model_id.value() is None         # nothing was installed


def test_a_result_that_fails_to_serialize_is_that_records_internal_error_only(rows):
    logged = []
    server, _ = server_with(logged)
    runtime = FailsOn(rows[0].names, -999.0, RuntimeError("never"))
    bounded = server._bounded

    def failing(result, record, model, micros):
        if record.record_id == "r2":
            raise TypeError("not a float")
        return bounded(result, record, model, micros)
    server._bounded = failing
    outcomes = server.serve([encode_record(r) for r in rows], model_of(runtime))
    assert [o.kind for o in outcomes] == [SCORED, SCORED, INTERNAL_ERROR, SCORED, SCORED, SCORED]
    assert runtime.calls == [6]                      # the batch is not scored again
    letter = DeadLetter.FromString(outcomes[2].payload)
    assert letter.reason == "internal error serializing a result: TypeError: not a float"
    assert letter.modelName == "m" and letter.dataType == DEMO_DATA_TYPE
    [error] = logged
    assert error.exc_info


def test_an_internal_error_dead_letter_is_made_whatever_failed(rows):
    class Unprintable(Exception):
        def __str__(self):
            raise ValueError("no message")

    server, _ = server_with([])
    outcome = server.internal_error(b"raw", Unprintable(), "somewhere", data_type=object())
    letter = DeadLetter.FromString(outcome.payload)
    assert letter.exceptionType == "Unprintable" and outcome.data_type == ""
    assert letter.reason == "internal error somewhere: Unprintable: (its message could not be read)"
    # not even the input's bytes are bytes: a dead letter with the reason all the same
    letter = DeadLetter.FromString(server.internal_error("text", RuntimeError("x"), "there").payload)
    assert letter.kind == DeadLetter.INTERNAL_ERROR and letter.reason == "internal error there: RuntimeError: x"
    assert letter.sourceTopic == "mdata" and letter.raw == b"" and letter.sourcePartition == -1


def test_metrics_that_fail_are_logged_and_counted_and_gauges_never_raise(caplog):
    context = Context()
    metrics = ServingMetrics(context)

    def failing(kind, outcomes):
        raise RuntimeError("bug in counting")
    metrics.total.count = failing
    metrics.count([Outcome(SCORED, b"", "t", 3.0)])
    assert context.metric("internal_errors") == 1
    assert len(errors_of(caplog, "counting outcomes: RuntimeError: bug in counting")) == 1
    metrics.for_type("t").model = object()           # no info: its gauges cannot be read
    assert context.metric("datatype.t.model_version") == -1
    assert context.metric("datatype.t.model_age_seconds") == -1
    assert errors_of(caplog, "reading the gauge model_version")


def test_failures_the_record_survives_are_counted_and_it_is_served(join, rows, monkeypatch, caplog):
    function, context = join
    model = model_of(FailsOn(rows[0].names, -999.0, RuntimeError("never")))
    monkeypatch.setattr(function.server, "current", lambda data_type, model_id, stored: model)

    def failing_publish(key, value):
        raise RuntimeError("publishing bug")
    monkeypatch.setattr(function.publisher, "publish", failing_publish)
    monkeypatch.setattr(function.metrics, "for_type",
                        lambda data_type: (_ for _ in ()).throw(RuntimeError("metrics bug")))
    raw = encode_record(rows[0])
    results, letters = answers(function.process_element1(raw, context))
    assert results == [rows[0].record_id] and letters == []
    # the metrics (per type, twice: the model gauge and the count), the statistics' publication
    assert context.metric("internal_errors") == 3
    assert errors_of(caplog, "publishing statistics: RuntimeError: publishing bug")
    assert errors_of(caplog, "updating the metrics: RuntimeError: metrics bug")


def test_a_model_that_fails_to_install_leaves_the_previous_one_in_state(join, rows, monkeypatch):
    function, context = join
    runtime = FailsOn(rows[0].names, -999.0, RuntimeError("never"))
    models = {name.encode(): model_named(runtime, name) for name in ("first", "second")}
    monkeypatch.setattr(function.server, "build", lambda raw: models[raw])
    assert list(function.process_element2(b"first", context)) == []
    install = function.server.install

    def failing_install(data_type, model):
        if model is not None and model.info.name == "second":
            raise RuntimeError("install bug")
        return install(data_type, model)
    monkeypatch.setattr(function.server, "install", failing_install)
    [(tag, payload)] = list(function.process_element2(b"second", context))
    letter = DeadLetter.FromString(payload)
    assert letter.reason == "internal error installing a model: RuntimeError: install bug"
    assert letter.raw == b"second" and letter.exceptionType == "RuntimeError"
    assert (function.model_id.value(), function.descriptor.value()) == ("id-first", b"first")
    assert context.metric("internal_errors") == 1
    assert function.server.current(DEMO_DATA_TYPE, "id-first", lambda: b"first").info.name == "first"


def test_a_failing_batcher_loses_no_record_and_answers_each_once(batching_join, rows, caplog):
    function, context = batching_join
    raws = [encode_record(r) for r in rows]
    batcher = function.batcher
    add = batcher.add

    def add_failing_on_third(key, raw, timers):
        if raw == raws[2]:
            batcher.pending.add(raw)               # into state, but not the batch in memory
            raise RuntimeError("add bug")
        return add(key, raw, timers)
    batcher.add = add_failing_on_third
    assert list(function.process_element1(raws[0], context)) == []
    assert list(function.process_element1(raws[1], context)) == []
    results, letters = answers(function.process_element1(raws[2], context))
    assert results == [r.record_id for r in rows[:3]] and letters == []
    assert function.batcher.pending.get() == []       # taken out of state: not answered again
    assert errors_of(caplog, "batching a record: RuntimeError: add bug")

    # a flush timer that fails: what is pending is taken the plain way, and a new timer goes
    assert list(function.process_element1(raws[3], context)) == []
    batcher.on_processing_timer = lambda key, timestamp: 1 / 0
    context.domain = TimeDomain.PROCESSING_TIME
    results, _ = answers(function.on_timer(100, context))
    assert results == [rows[3].record_id] and errors_of(caplog, "flushing a batch: ZeroDivisionError")
    timers = len(context.timers)
    assert list(function.process_element1(raws[4], context)) == []
    assert len(context.timers) == timers + 1
    # the end of the input, likewise
    batcher.on_end_of_input = lambda key: 1 / 0
    context.domain = TimeDomain.EVENT_TIME
    results, _ = answers(function.on_timer(2 ** 62, context))
    assert results == [rows[4].record_id]
    assert errors_of(caplog, "flushing a batch at the end of input: ZeroDivisionError")
    assert context.metric("internal_errors") == 3


def test_batches_that_cannot_be_formed_are_scored_record_by_record(batching_join, rows, monkeypatch):
    function, context = batching_join
    monkeypatch.setattr(function.batcher, "batches", lambda raws, data_type_of: 1 / 0)
    raws = [encode_record(r) for r in rows[:4]]
    outputs = [o for raw in raws for o in function.process_element1(raw, context)]
    results, letters = answers(outputs)
    assert results == [r.record_id for r in rows[:4]] and letters == []
    assert context.metric("internal_errors") == 1


def test_a_record_whose_data_type_cannot_be_read_is_an_internal_error(batching_join, rows, monkeypatch):
    function, context = batching_join
    raws = [encode_record(r) for r in rows[:4]]
    monkeypatch.setattr(function, "data_type_in",
                        lambda key, raw: 1 / 0 if raw == raws[1] else key)
    outputs = [o for raw in raws for o in function.process_element1(raw, context)]
    results, [letter] = answers(outputs)
    assert results == [rows[i].record_id for i in (0, 2, 3)]
    assert letter.raw == raws[1] and letter.kind == DeadLetter.INTERNAL_ERROR
    assert letter.reason.startswith("internal error reading the data type of a record: ZeroDivisionError")
    assert context.metric("internal_errors") == 1


def test_the_last_line_stops_what_a_path_would_still_let_through(join, rows, monkeypatch, caplog):
    """Every entry point Flink calls is behind ``last_line``: a path added without its guard
    cannot restart the job either."""
    function, context = join
    raw = encode_record(rows[0])

    def half_answered(ctx, key, record):
        yield b"a result already out"
        raise RuntimeError("unguarded path")
    monkeypatch.setattr(function, "on_record", half_answered)
    outputs = list(function.process_element1(raw, context))
    assert outputs[0] == b"a result already out"
    letter = DeadLetter.FromString(outputs[1][1])
    assert outputs[1][0] is DEAD_LETTERS and letter.raw == raw and letter.kind == DeadLetter.INTERNAL_ERROR
    assert letter.reason == "internal error handling a record: RuntimeError: unguarded path"

    def failing(*args):
        raise RuntimeError("unguarded model path")
        yield
    monkeypatch.setattr(function, "on_model", failing)
    [(tag, payload)] = list(function.process_element2(b"descriptor", context))
    letter = DeadLetter.FromString(payload)
    assert letter.reason == "internal error handling a model: RuntimeError: unguarded model path"
    assert letter.sourceTopic == "models" and letter.raw == b"descriptor"
    monkeypatch.setattr(function, "timer", failing)
    assert list(function.on_timer(0, context)) == []
    assert context.metric("internal_errors") == 3
    assert errors_of(caplog, "handling a timer: RuntimeError: unguarded model path")
