"""The shared scoring function: records and models in, results and dead letters out."""
from __future__ import annotations

import hashlib
import math
import random
import re
from pathlib import Path

import pytest

from modelserving.demo.training import DEMO_DATA_TYPE, demo_dataset, descriptor_for
from modelserving.kafka.clients import Row, encode_record
from protos import DataRecord, DeadLetter, ModelDescriptor, ModelType, ServingResult, WineRecord
from udfs.errors import ModelError, ModelLoadError, ModelRejected, UnknownModelType
from udfs.serving import BAD_RECORD, NO_MODEL, SCORED, ModelServer, Withdrawal


@pytest.fixture()
def server(trained_models, tmp_path):
    model_dir = next(m.path for m in trained_models.values() if not m.inline).parent
    return ModelServer(model_dirs=[model_dir], max_model_bytes=5_000_000,
                       data_topic="mdata", models_topic="models", subtask=1)


@pytest.fixture(scope="module")
def demo_rows():
    names, X, y, labels = demo_dataset()
    return [Row(DEMO_DATA_TYPE, tuple(names), tuple(map(float, X[i])), f"r{i}") for i in range(20)]


def load(server, model):
    built = server.build(descriptor_for(model).SerializeToString())
    server.install(built.info.data_type, built)
    return built


def results_of(outcomes):
    return [ServingResult.FromString(o.payload) for o in outcomes]


def letters_of(outcomes):
    return [DeadLetter.FromString(o.payload) for o in outcomes if o.kind == BAD_RECORD]


@pytest.mark.parametrize("model_type", [ModelType.ONNX, ModelType.PMML, ModelType.TENSORFLOW,
                                        ModelType.TENSORFLOWSAVED])
def test_scores_equal_the_runtime_called_directly(server, trained_models, demo_rows, model_type):
    model = load(server, trained_models[model_type])
    outcomes = server.serve([encode_record(r) for r in demo_rows], model)
    assert [o.kind for o in outcomes] == [SCORED] * len(demo_rows)
    results = results_of(outcomes)
    from udfs.records import to_batch
    direct = model.runtime.score(to_batch([list(r.values) for r in demo_rows], model.runtime.input_names))
    for row, result, expected in zip(demo_rows, results, direct):
        assert result.recordId == row.record_id
        assert result.dataType == DEMO_DATA_TYPE
        assert result.modelName == model.info.name and result.modelVersion == model.info.version
        assert result.modelType == model_type
        assert result.label == expected.label
        assert result.score == pytest.approx(expected.value)
        assert list(result.probabilities) == pytest.approx(list(expected.probabilities))
        assert result.subtask == 1
    # the demo models are good: most labels match the dataset's classes
    names, X, y, labels = demo_dataset()
    hits = sum(r.label == labels[y[i]] for i, r in enumerate(results))
    assert hits >= 18


@pytest.mark.parametrize("model_type", [ModelType.ONNX, ModelType.PMML, ModelType.TENSORFLOW,
                                        ModelType.TENSORFLOWSAVED])
def test_a_result_does_not_depend_on_the_batch_it_is_scored_in(server, trained_models, demo_rows,
                                                                model_type):
    """Micro-batching must not change results: every record scores bit for bit the same alone
    as inside batches of any size (onnxruntime alone differs by 1 ulp for a single row)."""
    model = load(server, trained_models[model_type])
    raws = [encode_record(r) for r in demo_rows]

    def scored(outcomes):
        fields = ("recordId", "label", "probabilities", "score", "classLabels")
        return [tuple(repr(getattr(r, f)) for f in fields) for r in results_of(outcomes)]

    alone = [scored(server.serve([raw], model))[0] for raw in raws]
    for size in (2, 3, 7, 20):
        batched = [result for start in range(0, len(raws), size)
                   for result in scored(server.serve(raws[start:start + size], model))]
        assert batched == alone, size


def test_record_without_model_is_reported_not_dropped(server, demo_rows):
    outcomes = server.serve([encode_record(demo_rows[0])], None)
    assert [o.kind for o in outcomes] == [NO_MODEL]
    result = results_of(outcomes)[0]
    assert result.status == ServingResult.NO_MODEL and result.recordId == "r0"


@pytest.mark.parametrize("raw, reason", [
    (b"", "empty message"),
    (b"\xff\xff\xff\xff", "not a WineRecord or DataRecord protobuf"),
    (DataRecord(features={"x": 1.0}).SerializeToString(), "no dataType"),
])
def test_unreadable_records_become_dead_letters(server, trained_models, raw, reason):
    model = load(server, trained_models[ModelType.ONNX])
    outcomes = server.serve([raw], model)
    [letter] = letters_of(outcomes)
    assert reason in letter.reason
    assert letter.raw == raw and letter.sourceTopic == "mdata"
    assert letter.kind == DeadLetter.BAD_RECORD


def test_bad_features_become_dead_letters_and_the_rest_is_scored(server, trained_models, demo_rows):
    model = load(server, trained_models[ModelType.ONNX])
    good = demo_rows[0]
    nan = Row(good.data_type, good.names, (math.nan,) + good.values[1:], "nan")
    short = Row(good.data_type, good.names[:-1], good.values[:-1], "short")
    renamed = Row(good.data_type, ("bogus",) + good.names[1:], good.values, "renamed")
    raws = [encode_record(r) for r in (good, nan, short, renamed, good)]
    outcomes = server.serve(raws, model)
    assert [o.kind for o in outcomes] == [SCORED, BAD_RECORD, BAD_RECORD, BAD_RECORD, SCORED]
    reasons = [letter.reason for letter in letters_of(outcomes)]
    assert f"feature '{good.names[0]}' is nan" in reasons[0]
    assert "wrong number of features: the model takes 13, the record has 12" in reasons[1]
    assert "missing feature(s) 'alcohol'" in reasons[2]
    assert [letter.raw for letter in letters_of(outcomes)] == raws[1:4]
    assert all(letter.dataType == DEMO_DATA_TYPE for letter in letters_of(outcomes))


def test_pmml_picks_features_by_name(server, trained_models, demo_rows):
    """A named-input model ignores extra features but still refuses missing ones."""
    model = load(server, trained_models[ModelType.PMML])
    good = demo_rows[0]
    extra = Row(good.data_type, good.names + ("extra",), good.values + (1.0,), "extra")
    missing = Row(good.data_type, good.names[1:], good.values[1:], "missing")
    outcomes = server.serve([encode_record(extra), encode_record(missing)], model)
    assert [o.kind for o in outcomes] == [SCORED, BAD_RECORD]
    assert "missing feature(s)" in letters_of(outcomes)[0].reason


def test_wine_records_feed_vector_models_by_position(server, tutorial_dir):
    """A tutorial WineRecord scored by the tutorial's frozen graph, sent inline."""
    descriptor = ModelDescriptor(name="wine-tf", dataType="wine", modeltype=ModelType.TENSORFLOW,
                                 data=(tutorial_dir / "optimized_WineQuality.pb").read_bytes())
    model = server.build(descriptor.SerializeToString())
    values = [7.4, 0.7, 0.0, 1.9, 0.076, 11.0, 34.0, 0.9978, 3.51, 0.56, 9.4]
    raw = WineRecord(dataType="wine", ts=5, fixed_acidity=7.4, volatile_acidity=0.7,
                     citric_acid=0.0, residual_sugar=1.9, chlorides=0.076,
                     free_sulfur_dioxide=11.0, total_sulfur_dioxide=34.0, density=0.9978,
                     pH=3.51, sulphates=0.56, alcohol=9.4).SerializeToString()
    [outcome] = server.serve([raw], model)
    assert outcome.kind == SCORED
    result = results_of([outcome])[0]
    from udfs.records import to_batch
    [expected] = model.runtime.score(to_batch([values], model.runtime.input_names))
    assert result.score == pytest.approx(expected.value) and result.recordTs == 5


# -- models -------------------------------------------------------------------------------

def descriptor(**fields) -> bytes:
    base = dict(name="m", version="3", dataType=DEMO_DATA_TYPE, modeltype=ModelType.ONNX)
    base.update(fields)
    return ModelDescriptor(**base).SerializeToString()


@pytest.mark.parametrize("raw, error, reason", [
    (b"", ModelRejected, "empty model message"),
    (b"\xff\xff\xff", ModelRejected, "not a ModelDescriptor protobuf"),
    (descriptor(modeltype=42, data=b"x"), UnknownModelType, "unknown model type 42"),
    (descriptor(data=b"garbage"), ModelLoadError, "model 'm' version '3'"),
    (descriptor(modeltype=ModelType.PMML, data=b"not xml"), ModelLoadError, "model 'm'"),
    (descriptor(modeltype=ModelType.TENSORFLOW, data=b"\x01\x02garbage"), ModelLoadError, "model 'm'"),
    (descriptor(), ModelRejected, "neither data nor location"),
    (descriptor(data=b"x" * 5_000_001), ModelRejected, "over the limit of 5000000 bytes"),
    (descriptor(location="/etc/passwd"), ModelRejected, "outside the model directories"),
    (descriptor(modeltype=ModelType.TENSORFLOWSAVED, location="no/such/model"), ModelRejected,
     "does not exist"),
    (descriptor(modeltype=ModelType.TENSORFLOWSAVED, location="../../etc"), ModelRejected,
     "outside the model directories"),
    (descriptor(modeltype=ModelType.TENSORFLOWSAVED, data=b"x"), ModelRejected, "sent by location"),
    (descriptor(modeltype=ModelType.PMML,
                data=b'<?xml version="1.0"?><!DOCTYPE PMML [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
                     b'<PMML version="4.2"/>'), ModelRejected, "DOCTYPE"),
    (ModelDescriptor(name="m", modeltype=ModelType.ONNX, data=b"x").SerializeToString(),
     ModelRejected, "no dataType"),
])
def test_bad_models_are_refused_with_a_reason(server, raw, error, reason):
    with pytest.raises(error) as caught:
        server.build(raw)
    assert reason in str(caught.value)
    letter = DeadLetter.FromString(server.model_dead_letter(raw, caught.value))
    assert letter.kind == DeadLetter.BAD_MODEL and letter.raw == raw[:64 * 1024]
    assert letter.rawSize == len(raw) and letter.rawTruncated == (len(raw) > 64 * 1024)
    assert letter.rawSha256 == hashlib.sha256(raw).hexdigest()
    assert letter.exceptionType == error.__name__
    assert reason in letter.reason and letter.sourceTopic == "models"


def test_symlink_out_of_the_model_dirs_is_refused(tmp_path, trained_models):
    """A link inside a model directory that leads out of it is refused (the shared models
    fixture is left alone: the link lives in a model directory of this test's own)."""
    model_dir = tmp_path / "models"
    model_dir.mkdir()
    outside = Path(trained_models[ModelType.TENSORFLOWSAVED].path)   # real, but not in model_dir
    link = model_dir / "escape"
    link.symlink_to(outside, target_is_directory=True)
    own = ModelServer(model_dirs=[model_dir], max_model_bytes=5_000_000,
                      data_topic="mdata", models_topic="models", subtask=1)
    with pytest.raises(ModelRejected, match="outside the model directories"):
        own.build(descriptor(modeltype=ModelType.TENSORFLOWSAVED, location=str(link)))


def test_model_too_large_at_its_location(trained_models, tmp_path):
    saved = trained_models[ModelType.TENSORFLOWSAVED]
    small = ModelServer(model_dirs=[saved.path.parent], max_model_bytes=1000,
                        data_topic="d", models_topic="m")
    with pytest.raises(ModelRejected, match="over the limit of 1000 bytes"):
        small.build(descriptor_for(saved).SerializeToString())


def test_new_model_replaces_and_closes_the_old_one(server, trained_models, demo_rows):
    first = load(server, trained_models[ModelType.ONNX])
    closed = []
    first.runtime.close = lambda: closed.append(True)
    second = load(server, trained_models[ModelType.PMML])
    assert closed == [True]
    current = server.current(DEMO_DATA_TYPE, second.info.model_id, lambda: None)
    assert current is second
    [result] = results_of(server.serve([encode_record(demo_rows[0])], current))
    assert result.modelType == ModelType.PMML


def test_restore_rebuilds_the_model_from_state_bytes(server, trained_models, demo_rows):
    raw = descriptor_for(trained_models[ModelType.ONNX]).SerializeToString()
    built = server.build(raw)
    restored = ModelServer(model_dirs=server.model_dirs, max_model_bytes=5_000_000,
                           data_topic="mdata", models_topic="models")
    model = restored.current(DEMO_DATA_TYPE, built.info.model_id, lambda: raw)
    assert model.info == built.info
    assert restored.current(DEMO_DATA_TYPE, built.info.model_id, lambda: pytest.fail("reloaded")) is model
    assert restored.current(DEMO_DATA_TYPE, None, lambda: raw) is None


def test_a_stored_model_that_no_longer_loads_dead_letters_records(server, demo_rows):
    raw = descriptor(data=b"garbage")
    with pytest.raises(ModelError):
        server.current(DEMO_DATA_TYPE, "some-id", lambda: raw)
    calls = []
    with pytest.raises(ModelError):
        server.current(DEMO_DATA_TYPE, "some-id", lambda: calls.append(1) or raw)
    assert calls == []  # the failure is remembered, not retried per record
    try:
        server.current(DEMO_DATA_TYPE, "some-id", lambda: raw)
    except ModelError as exc:
        outcomes = server.serve([encode_record(demo_rows[0])], None, exc)
    [letter] = letters_of(outcomes)
    assert "could not be loaded" in letter.reason


def test_withdrawal(server, trained_models):
    built = server.build(descriptor(withdraw=True))
    assert isinstance(built, Withdrawal) and built.info.data_type == DEMO_DATA_TYPE


def test_inline_models_are_bounded_because_they_live_in_state(trained_models):
    onnx = trained_models[ModelType.ONNX]
    size = onnx.path.stat().st_size
    server = ModelServer(max_model_bytes=10 * size, max_inline_model_bytes=size - 1,
                         model_dirs=[onnx.path.parent], data_topic="d", models_topic="m")
    with pytest.raises(ModelRejected, match="send it by location"):
        server.build(descriptor_for(onnx).SerializeToString())
    by_location = descriptor_for(onnx)
    by_location.location = str(onnx.path)  # the same file, by location, is fine
    assert server.build(by_location.SerializeToString()).info.name == onnx.name


# -- bounded outputs ------------------------------------------------------------------------

def test_a_dead_letter_keeps_a_bounded_prefix_with_the_whole_inputs_size_and_digest():
    server = ModelServer(max_model_bytes=1000, data_topic="mdata", models_topic="models",
                         dead_letter_max_raw_bytes=100)
    for size, truncated in ((99, False), (100, False), (101, True), (5000, True)):
        raw = bytes(range(256)) * (size // 256) + bytes(range(size % 256))
        raw = b"\xff" + raw[1:]   # never a parsable record
        [letter] = letters_of(server.serve([raw], None))
        assert letter.raw == raw[:100] and letter.rawTruncated == truncated, size
        assert letter.rawSize == size
        assert letter.rawSha256 == hashlib.sha256(raw).hexdigest()
        assert letter.exceptionType == "RecordError"
        assert letter.sourcePartition == -1 and letter.sourceOffset == -1
        assert "not a WineRecord or DataRecord protobuf" in letter.reason


def test_a_record_over_max_record_bytes_is_refused_on_arrival_with_its_size(demo_rows):
    """Rule: a record longer than max_record_bytes is a BAD_RECORD dead letter before it is
    parsed (or held in state for a batch); one of exactly that size is served."""
    raw = encode_record(demo_rows[0])
    server = ModelServer(max_model_bytes=1000, data_topic="mdata", models_topic="models",
                         max_record_bytes=len(raw), dead_letter_max_raw_bytes=50)
    assert server.oversized(raw) is None
    big = raw + b"\x00"
    outcome = server.oversized(big)
    assert outcome.kind == BAD_RECORD
    letter = DeadLetter.FromString(outcome.payload)
    assert letter.kind == DeadLetter.BAD_RECORD and letter.exceptionType == "RecordTooLarge"
    assert letter.reason == f"record too large ({len(raw) + 1} bytes > max_record_bytes {len(raw)})"
    assert letter.rawSize == len(big) and letter.raw == big[:50] and letter.sourceTopic == "mdata"


def test_a_20_mb_inputs_dead_letter_is_small():
    """The default bound (64 KiB) plus a few hundred bytes of fields, whatever came in."""
    server = ModelServer(max_model_bytes=1000, data_topic="mdata", models_topic="models")
    raw = b"\xff" + random.Random(1).randbytes(20 * 1000 * 1000 - 1)
    [outcome] = server.serve([raw], None)
    assert outcome.kind == BAD_RECORD
    assert len(outcome.payload) < 64 * 1024 + 1024
    letter = DeadLetter.FromString(outcome.payload)
    assert letter.rawSize == len(raw) and letter.rawTruncated and len(letter.raw) == 64 * 1024
    assert letter.rawSha256 == hashlib.sha256(raw).hexdigest()
    model_raw = ModelDescriptor(name="huge", dataType="t", modeltype=99,
                                data=raw).SerializeToString()
    with pytest.raises(ModelError) as caught:
        server.build(model_raw)
    model_letter = server.model_dead_letter(model_raw, caught.value)
    assert len(model_letter) < 64 * 1024 + 1024
    assert DeadLetter.FromString(model_letter).rawSize == len(model_raw)


class HugeOutput:
    """A runtime whose every prediction carries ``classes`` class probabilities."""

    def __init__(self, names, classes):
        self.input_names, self.classes = tuple(names), classes

    def score(self, batch):
        from udfs.runtimes.base import Prediction
        labels = tuple(f"class-{i}" for i in range(self.classes))
        return [Prediction(0.0, labels[0], (1.0 / self.classes,) * self.classes, labels)
                for _ in range(len(batch))]

    def close(self):
        pass


def fake_model(runtime, name="fake"):
    from udfs.models import ModelInfo
    from udfs.serving import LoadedModel
    info = ModelInfo(data_type=DEMO_DATA_TYPE, name=name, version="1", description="",
                     model_type=ModelType.ONNX, model_id=name)
    return LoadedModel(info=info, raw=b"", runtime=runtime, since_ms=0)


def test_a_result_over_max_result_bytes_becomes_a_dead_letter(demo_rows):
    """Rule: a ServingResult whose serialized size exceeds max_result_bytes is not sent; the
    record is dead-lettered with reason "result too large (N bytes > limit)"."""
    server = ModelServer(max_model_bytes=1000, data_topic="mdata", models_topic="models",
                         max_result_bytes=10_000)
    names = demo_rows[0].names
    small = server.serve([encode_record(demo_rows[0])], fake_model(HugeOutput(names, 10)))
    assert [o.kind for o in small] == [SCORED] and len(small[0].payload) <= 10_000
    raws = [encode_record(r) for r in demo_rows[:3]]
    outcomes = server.serve(raws, fake_model(HugeOutput(names, 5000)))
    assert [o.kind for o in outcomes] == [BAD_RECORD] * 3
    letters = letters_of(outcomes)
    assert [letter.raw for letter in letters] == raws
    for letter in letters:
        assert re.fullmatch(r"result too large \(\d+ bytes > 10000\)", letter.reason)
        assert letter.exceptionType == "ResultTooLarge" and letter.modelName == "fake"


def test_the_default_result_bound_holds_thousands_of_classes_but_not_unbounded_ones(demo_rows):
    server = ModelServer(max_model_bytes=1000, data_topic="mdata", models_topic="models")
    names = demo_rows[0].names
    raw = encode_record(demo_rows[0])
    assert server.serve([raw], fake_model(HugeOutput(names, 2000)))[0].kind == SCORED
    assert server.serve([raw], fake_model(HugeOutput(names, 200_000)))[0].kind == BAD_RECORD
