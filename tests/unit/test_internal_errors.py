"""No record and no model can restart a job: failures of the project's own code become
INTERNAL_ERROR dead letters, are counted, and are logged with a stack trace at most once a
minute per kind of failure."""
from __future__ import annotations

import logging

import pytest
from pyflink.common import Row as FlinkRow

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


def batch_of(raws, data_type=DEMO_DATA_TYPE, partition=0, first_offset=0):
    """The keyed join's input 1: a sub-batch of one data type, with Kafka positions."""
    return FlinkRow(data_type, partition, list(range(first_offset, first_offset + len(raws))),
                    list(raws))


def message(raw, partition=0, offset=0):
    """The join's models input: one models-topic message."""
    return FlinkRow(partition, offset, raw)


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
    settings = Settings(state_topic="", repository_topic="", batch_max_size=1)
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
    [(tag, payload)] = list(function.process_element2(message(raw), context))
    letter = DeadLetter.FromString(payload)
    assert tag is DEAD_LETTERS and letter.kind == DeadLetter.INTERNAL_ERROR
    assert "ZeroDivisionError" in letter.reason and letter.sourceTopic == "models"
    assert context.metric("internal_errors") == 1


def test_the_join_survives_failing_lookup_statistics_and_metrics(join, rows, monkeypatch):
    function, context = join
    monkeypatch.setattr(function, "model_lookup", lambda ctx, data_type: {}["missing"])
    monkeypatch.setattr(function.stats, "contains", lambda key: 1 / 0)       # statistics
    monkeypatch.setattr(function.publisher, "publish", lambda key, value: 1 / 0)
    raw = encode_record(rows[0])
    [(tag, payload)] = list(function.process_element1(batch_of([raw]), context))
    letter = DeadLetter.FromString(payload)
    assert tag is DEAD_LETTERS and letter.kind == DeadLetter.INTERNAL_ERROR
    assert "internal error serving a batch: KeyError" in letter.reason
    # the record's dead letter, and the statistics that failed on it (served on without them)
    assert context.metric("internal_errors") == 2
    assert context.metric(f"datatype.{DEMO_DATA_TYPE}.internal_errors") == 2
    function.publish(MapState())                    # not statistics: never raises
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

def model_named(runtime, name: str = "m") -> LoadedModel:
    info = ModelInfo(data_type=DEMO_DATA_TYPE, name=name, version="1", description="",
                     model_type=ModelType.ONNX, model_id="id-" + name)
    return LoadedModel(info=info, raw=name.encode(), runtime=runtime, since_ms=0)


def answers(outputs):
    """(results' record ids, dead letters) of a join's outputs."""
    outputs = list(outputs)
    results = [ServingResult.FromString(r).recordId for o in outputs if o[0] is not DEAD_LETTERS
               for r in o[0]]
    letters = [DeadLetter.FromString(o[1]) for o in outputs if o[0] is DEAD_LETTERS]
    return results, letters


def errors_of(caplog, where: str):
    return [r for r in caplog.records if r.levelno == logging.ERROR and r.exc_info
            and r.getMessage().startswith(f"internal error {where}")]


def test_split_and_key_selectors_never_raise_they_log_count_and_fall_back(rows, caplog):
    from udfs.flink.batches import SplitByDataType
    from udfs.flink.keys import FAILED_KEY, ModelDataType, SpreadKey, key_failure

    split, model_key, spread = SplitByDataType(), ModelDataType(), SpreadKey((5, 7))
    contexts = [Context() for _ in range(3)]
    for operator, context in zip((split, model_key, spread), contexts):
        operator.open(context)
    raw, other = encode_record(rows[0]), encode_record(Row("other", ("a",), (1.0,), "o"))
    pieces = split.flat_map(FlinkRow(1, [10, 11, 12], [raw, b"\xff", other]))
    assert [(p[0], p[1], p[2], p[3]) for p in pieces] == [
        (DEMO_DATA_TYPE, 1, [10], [raw]), ("", 1, [11], [b"\xff"]), ("other", 1, [12], [other])]
    assert spread.get_key(FlinkRow(1, [10, 11], [raw, raw])) in (5, 7)
    descriptor = ModelDescriptor(name="m", dataType="t").SerializeToString()
    assert model_key.get_key(message(descriptor)) == "t" and model_key.get_key(message(b"")) == ""
    # a value that is not bytes: the parsers raise TypeError, which they do not expect
    [failed] = split.flat_map(FlinkRow(1, [10], [None]))
    assert failed[0].startswith(FAILED_KEY) and key_failure(failed[0]).startswith("TypeError: ")
    assert (failed[1], failed[2], failed[3]) == (1, [10], [None])   # the whole batch goes on
    assert key_failure(model_key.get_key(message("text"))).startswith("TypeError: ")
    assert spread.get_key(FlinkRow(1, [], [])) == 5                   # served anyway
    assert [c.metric(name) for c, name in zip(contexts, ("internal_errors", "key.internal_errors",
                                                         "key.internal_errors"))] == [1, 1, 1]
    assert len(errors_of(caplog, "splitting a batch by data type: TypeError")) == 1
    assert len(errors_of(caplog, "selecting the key of a model: TypeError")) == 1
    assert len(errors_of(caplog, "selecting the spreading key of a batch: IndexError")) == 1
    assert key_failure(DEMO_DATA_TYPE) is None and key_failure("") is None and key_failure(5) is None
    long = SplitByDataType()
    long.select = lambda batch: (_ for _ in ()).throw(ValueError("x" * 1000))
    assert len(long.flat_map(FlinkRow(1, [10], [raw]))[0][0]) < 300   # the failure key is bounded


def test_the_keyed_join_dead_letters_what_arrives_under_a_failure_key(join, rows):
    from udfs.flink.keys import failure_key

    function, context = join
    raw = encode_record(rows[0])
    context.key = failure_key(RuntimeError("boom"))
    [(tag, payload)] = list(function.process_element1(batch_of([raw], first_offset=4), context))
    letter = DeadLetter.FromString(payload)
    assert tag is DEAD_LETTERS and letter.kind == DeadLetter.INTERNAL_ERROR and letter.raw == raw
    assert letter.exceptionType == "RuntimeError" and letter.sourceTopic == "mdata"
    assert letter.reason == "internal error splitting or keying a batch: RuntimeError: boom"
    assert letter.sourceOffset == 4
    descriptor = ModelDescriptor(name="m", dataType=DEMO_DATA_TYPE).SerializeToString()
    [(tag, payload)] = list(function.process_element2(message(descriptor), context))
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

    def failing(payload, record, model, micros):
        if record.record_id == "r2":
            raise TypeError("not a float")
        return bounded(payload, record, model, micros)
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
    results, letters = answers(function.process_element1(batch_of([raw]), context))
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
    assert list(function.process_element2(message(b"first"), context)) == []
    install = function.server.install

    def failing_install(data_type, model):
        if model is not None and model.info.name == "second":
            raise RuntimeError("install bug")
        return install(data_type, model)
    monkeypatch.setattr(function.server, "install", failing_install)
    [(tag, payload)] = list(function.process_element2(message(b"second"), context))
    letter = DeadLetter.FromString(payload)
    assert letter.reason == "internal error installing a model: RuntimeError: install bug"
    assert letter.raw == b"second" and letter.exceptionType == "RuntimeError"
    assert (function.model_id.value(), function.descriptor.value()) == ("id-first", b"first")
    assert context.metric("internal_errors") == 1
    assert function.server.current(DEMO_DATA_TYPE, "id-first", lambda: b"first").info.name == "first"


def test_a_batch_whose_data_types_cannot_be_read_is_answered_with_internal_errors(join, rows,
                                                                               monkeypatch):
    function, context = join
    raws = [encode_record(r) for r in rows[:4]]
    monkeypatch.setattr(function, "data_types", lambda key, records: 1 / 0)
    results, letters = answers(function.process_element1(batch_of(raws, first_offset=10), context))
    assert results == [] and [letter.raw for letter in letters] == raws
    assert {letter.kind for letter in letters} == {DeadLetter.INTERNAL_ERROR}
    assert letters[0].reason.startswith("internal error reading the data type of a record: "
                                        "ZeroDivisionError")
    assert [letter.sourceOffset for letter in letters] == [10, 11, 12, 13]
    assert context.metric("internal_errors") == 4


def test_every_dead_letter_names_the_kafka_position_of_its_input(join, rows, monkeypatch):
    """Records: their batch's partition and each record's own offset; models: their message's."""
    function, context = join
    model = model_of(FailsOn(rows[0].names, -999.0, RuntimeError("never")))
    monkeypatch.setattr(function.server, "current", lambda data_type, model_id, stored: model)
    raws = [encode_record(rows[0]), b"\xff\xfe garbage", encode_record(rows[1]), b"x" * 2_000_000]
    results, letters = answers(function.process_element1(batch_of(raws, partition=3,
                                                                  first_offset=500), context))
    assert results == [rows[0].record_id, rows[1].record_id]
    assert [(d.sourcePartition, d.sourceOffset) for d in letters] == [(3, 501), (3, 503)]
    assert "record too large" in letters[1].reason and letters[1].rawSize == 2_000_000
    bad_model = ModelDescriptor(name="m", dataType=DEMO_DATA_TYPE, modeltype=ModelType.ONNX,
                                data=b"not onnx").SerializeToString()
    [(tag, payload)] = list(function.process_element2(message(bad_model, 1, 77), context))
    letter = DeadLetter.FromString(payload)
    assert (letter.kind, letter.sourcePartition, letter.sourceOffset) == (DeadLetter.BAD_MODEL, 1, 77)


def test_a_batch_is_scored_in_pieces_of_batch_max_size_in_order(rows, monkeypatch):
    settings = Settings(state_topic="", repository_topic="", batch_max_size=4)
    function, context = KeyedServing(settings, {}), Context()
    function.open(context)
    runtime = FailsOn(rows[0].names, -999.0, RuntimeError("never"))
    model = model_of(runtime)
    monkeypatch.setattr(function.server, "current", lambda data_type, model_id, stored: model)
    many = [Row(r.data_type, r.names, r.values, f"{r.record_id}-{i}") for i in range(2) for r in rows]
    results, letters = answers(function.process_element1(batch_of([encode_record(r) for r in many]),
                                                         context))
    assert results == [r.record_id for r in many] and letters == []
    assert runtime.calls == [4, 4, 4]
    function.close()


def test_the_last_line_stops_what_a_path_would_still_let_through(join, rows, monkeypatch, caplog):
    """Every entry point Flink calls is behind ``last_line``: a path added without its guard
    cannot restart the job either."""
    function, context = join
    raw = encode_record(rows[0])

    def half_answered(ctx, key, partition, offsets, records):
        yield FlinkRow([b"a result already out"])
        raise RuntimeError("unguarded path")
    monkeypatch.setattr(function, "on_batch", half_answered)
    outputs = list(function.process_element1(batch_of([raw], first_offset=9), context))
    assert outputs[0][0] == [b"a result already out"]
    letter = DeadLetter.FromString(outputs[1][1])
    assert outputs[1][0] is DEAD_LETTERS and letter.raw == raw and letter.kind == DeadLetter.INTERNAL_ERROR
    assert letter.reason == "internal error handling a batch: RuntimeError: unguarded path"
    assert letter.sourceOffset == 9

    def failing(*args):
        raise RuntimeError("unguarded model path")
        yield
    monkeypatch.setattr(function, "on_model", failing)
    [(tag, payload)] = list(function.process_element2(message(b"descriptor"), context))
    letter = DeadLetter.FromString(payload)
    assert letter.reason == "internal error handling a model: RuntimeError: unguarded model path"
    assert letter.sourceTopic == "models" and letter.raw == b"descriptor"
    monkeypatch.setattr(function, "timer", failing)
    assert list(function.on_timer(0, context)) == []
    assert context.metric("internal_errors") == 3
    assert errors_of(caplog, "handling a timer: RuntimeError: unguarded model path")
