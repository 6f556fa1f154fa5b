"""The model lifecycle in the serving path: every model's digest on its results, the
validation gate before a model takes over, and the joins' records in the model repository.
A real ONNX model (the demo's classifier, ``onnx_wine``)."""
from __future__ import annotations

import copy
import hashlib

import numpy as np
import pytest
from pyflink.common import Row as FlinkRow

from jobs.settings import Settings
from modelserving.kafka.clients import Row, encode_record
from protos import DeadLetter, ModelDescriptor, ModelType, RepositoryEntry, ServingResult
from udfs import serving as serving_module
from udfs.errors import ValidationFailed
from udfs.flink.joins import BroadcastServing, KeyedServing
from udfs.lifecycle.digest import digest_path
from udfs.lifecycle.repository import ACCEPTED, VALIDATION_FAILED, Repository
from udfs.lifecycle.validation import FileRow, validation_from_rows
from udfs.serving import SCORED, LoadedModel, ModelServer
from udfs.speculative import member_key

from flink_state_fakes import DictMapState
from test_overlap_join import KeyedContext

DATA_TYPE = "wine-cultivar"


def descriptor(wine, version: str = "1", by_location: bool = False, **fields) -> ModelDescriptor:
    model = ModelDescriptor(name=f"logreg-{version}", version=version, dataType=DATA_TYPE,
                            modeltype=ModelType.ONNX, inputFeatures=wine.feature_names,
                            classLabels=wine.class_labels, **fields)
    if by_location:
        model.location = str(wine.path)
    else:
        model.data = wine.path.read_bytes()
    return model


def gate(wine, wrong_labels: int = 0, min_accuracy: float = 0.9):
    """The holdout with its true labels, ``wrong_labels`` of those the model gets right
    changed to another class."""
    expected = wine.y_test.copy()
    right = np.flatnonzero(wine.pipeline.predict(wine.X_test) == expected)[:wrong_labels]
    expected[right] = (expected[right] + 1) % 3
    rows = [FileRow(f"h-{i}", dict(zip(wine.feature_names, map(float, x))),
                    expected_label=str(expected[i])) for i, x in enumerate(wine.X_test)]
    return validation_from_rows(rows, DATA_TYPE, min_accuracy=min_accuracy)


def records(wine, prefix: str, n: int = 6) -> list[bytes]:
    return [encode_record(Row(DATA_TYPE, wine.feature_names, tuple(map(float, wine.X_test[i])),
                              f"{prefix}-{i}")) for i in range(n)]


@pytest.fixture()
def server(onnx_wine):
    return ModelServer(model_dirs=[onnx_wine.dir], max_model_bytes=1 << 30, data_topic="mdata",
                       models_topic="models")


@pytest.fixture()
def closed(monkeypatch):
    """The runtimes the server loads, each with whether it was closed."""
    loaded = []
    load = serving_module.load_model

    def recording_load(request):
        runtime = load(request)
        close = runtime.close
        entry = {"runtime": runtime, "closed": False}

        def recording_close():
            entry["closed"] = True
            close()
        runtime.close = recording_close
        loaded.append(entry)
        return runtime
    monkeypatch.setattr(serving_module, "load_model", recording_load)
    return loaded


def test_every_result_carries_the_digest_of_the_model_that_scored_it(server, onnx_wine):
    inline = server.build(descriptor(onnx_wine).SerializeToString())
    expected = hashlib.sha256(onnx_wine.path.read_bytes()).hexdigest()
    assert inline.info.digest == expected
    outcomes = server.serve(records(onnx_wine, "r"), inline)
    assert [o.kind for o in outcomes] == [SCORED] * 6
    results = [ServingResult.FromString(o.payload) for o in outcomes]
    assert {(r.modelName, r.modelVersion, r.modelDigest) for r in results} == \
        {("logreg-1", "1", expected)}
    # the same file by location: the same digest (its file's), on results alike
    by_location = server.build(descriptor(onnx_wine, "2", by_location=True).SerializeToString())
    assert by_location.info.digest == digest_path(onnx_wine.path) == expected
    [result] = [ServingResult.FromString(o.payload)
                for o in server.serve(records(onnx_wine, "l", 1), by_location)]
    assert (result.modelVersion, result.modelDigest) == ("2", expected)


def test_a_model_that_passes_its_gate_takes_over(server, onnx_wine, closed):
    model = server.build(descriptor(onnx_wine, validation=gate(onnx_wine)).SerializeToString())
    assert isinstance(model, LoadedModel) and not closed[0]["closed"]


def test_a_model_that_misses_its_gate_is_refused_with_its_figures_and_closed(server, onnx_wine,
                                                                               closed):
    failing = descriptor(onnx_wine, "2", validation=gate(onnx_wine, wrong_labels=8))
    with pytest.raises(ValidationFailed) as refused:
        server.build(failing.SerializeToString())
    outcome = refused.value.outcome
    n = len(onnx_wine.y_test)
    hits = int(np.sum(onnx_wine.pipeline.predict(onnx_wine.X_test) == onnx_wine.y_test)) - 8
    assert (outcome.passed, outcome.label_rows, outcome.mismatches) == (False, n, n - hits)
    assert str(refused.value).startswith(f"validation failed on {n} rows: accuracy {hits / n:.4f} "
                                         f"< minimum 0.9 ({hits}/{n} labels)")
    assert "(model 'logreg-2' version '2', data type 'wine-cultivar')" in str(refused.value)
    assert refused.value.digest == hashlib.sha256(onnx_wine.path.read_bytes()).hexdigest()
    assert [entry["closed"] for entry in closed] == [True]
    # what the joins make of it: a BAD_MODEL dead letter whose reason has the figures
    letter = DeadLetter.FromString(server.model_dead_letter(failing.SerializeToString(),
                                                            refused.value))
    assert letter.kind == DeadLetter.BAD_MODEL and letter.exceptionType == "ValidationFailed"
    assert f"accuracy {hits / n:.4f} < minimum 0.9" in letter.reason
    assert (letter.modelName, letter.modelVersion) == ("logreg-2", "2")


# -- the joins' records in the model repository ---------------------------------------------------

class BroadcastContext(KeyedContext):
    """The broadcast join's contexts for one instance: its own broadcast state."""

    def __init__(self, subtask: int):
        super().__init__()
        self.subtask = subtask

    def get_index_of_this_subtask(self):
        return self.subtask

    def get_broadcast_state(self, descriptor):
        return DictMapState(self.state.setdefault(descriptor.name, {}))


def recording(join_class, onnx_wine, context):
    """An open join of ``join_class`` publishing to a repository topic, and what it publishes:
    (topic, key, entry)."""
    settings = Settings(state_topic="", repository_topic="repo", batch_max_size=8,
                        model_dirs=(str(onnx_wine.dir),)).for_job("test")
    join = join_class(settings, {})
    join.open(context)
    published = []

    def publish(key, value, topic=None):   # statistics (topic None) go nowhere: state_topic ""
        if topic is not None:
            published.append((topic, key, RepositoryEntry.FromString(value)))
    join.publisher.publish = publish
    return join, published


def handled(join, context, descriptor: ModelDescriptor, offset: int = 0) -> list[DeadLetter]:
    """The dead letters of one models-topic message."""
    message = FlinkRow(0, offset, descriptor.SerializeToString())
    handle = (join.process_element2 if isinstance(join, KeyedServing)
              else join.process_broadcast_element)
    return [DeadLetter.FromString(letter) for _, letter in handle(message, context)]


def test_the_keyed_join_records_every_decision_and_a_restore_keeps_the_history(onnx_wine):
    context = KeyedContext()
    join, published = recording(KeyedServing, onnx_wine, context)
    job = join.settings.job_name
    first = descriptor(onnx_wine, "1", publishedMs=1000)
    assert handled(join, context, first) == []
    [(topic, key, accepted)] = published
    assert (topic, key) == ("repo", f"{DATA_TYPE}//1@{job}")
    assert accepted.digest == hashlib.sha256(onnx_wine.path.read_bytes()).hexdigest()
    assert accepted.descriptor == first.SerializeToString() and accepted.createdMs == 1000
    [deployment] = accepted.deployments
    assert (deployment.job, deployment.outcome, deployment.retiredMs) == (job, ACCEPTED, 0)

    # a model that misses its gate: refused with its figures, the first one serves on
    failing = descriptor(onnx_wine, "2", publishedMs=2000,
                         validation=gate(onnx_wine, wrong_labels=8))
    [letter] = handled(join, context, failing, 1)
    assert letter.kind == DeadLetter.BAD_MODEL and "< minimum 0.9" in letter.reason
    refused = published[-1][2]
    [decision] = refused.deployments
    assert (refused.version, decision.outcome) == ("2", VALIDATION_FAILED)
    assert decision.reason == letter.reason and decision.validation.mismatches >= 8
    assert decision.validation.minAccuracy == pytest.approx(0.9)
    batch = FlinkRow(DATA_TYPE, 0, list(range(6)), records(onnx_wine, "r"))
    results = [ServingResult.FromString(raw) for output in join.process_element1(batch, context)
               for raw in output[0]]
    assert {(r.modelVersion, r.modelDigest) for r in results} == {("1", accepted.digest)}

    # a successor retires the first (with its descriptor: the record replaces the earlier one)
    third = descriptor(onnx_wine, "3", by_location=True, publishedMs=3000)
    assert handled(join, context, third, 2) == []
    retired, successor = published[-2][2], published[-1][2]
    assert (retired.version, successor.version) == ("1", "3")
    assert retired.descriptor == first.SerializeToString()
    assert retired.deployments[0].retiredMs == successor.deployments[0].deployedMs
    assert retired.deployments[0].retiredBy == "3"
    count = len(published)
    assert handled(join, context, third, 3) == [] and len(published) == count   # nothing new

    # a checkpoint, restored into a new instance: a rollback to the first version keeps its
    # first deployment and creation time; a withdrawal retires it
    restored_context = KeyedContext(copy.deepcopy(context.state))
    restored, published_after = recording(KeyedServing, onnx_wine, restored_context)
    again = ModelDescriptor.FromString(first.SerializeToString())
    again.publishedMs = 4000
    assert handled(restored, restored_context, again, 4) == []
    replaced, back = published_after[0][2], published_after[1][2]
    assert (replaced.version, replaced.deployments[-1].retiredBy) == ("3", "1")
    assert back.createdMs == 1000 and back.publishedMs == 4000
    assert [(d.outcome, bool(d.retiredMs)) for d in back.deployments] == [(ACCEPTED, True),
                                                                          (ACCEPTED, False)]
    withdrawal = ModelDescriptor(name="logreg-1", dataType=DATA_TYPE, withdraw=True)
    assert handled(restored, restored_context, withdrawal, 5) == []
    assert published_after[-1][2].deployments[-1].retiredBy == "withdrawn"

    folded = Repository.fold(entry for _, _, entry in published + published_after)
    assert [e.version for e in folded.history(DATA_TYPE)] == ["1", "2", "3"]
    assert folded.serving(DATA_TYPE) == {}
    assert folded.rollback_target(DATA_TYPE, "3").version == "3"


def test_the_broadcast_join_records_on_every_instance_and_publishes_from_instance_0(onnx_wine):
    instances = []
    for subtask in (0, 1):
        context = BroadcastContext(subtask)
        instances.append((*recording(BroadcastServing, onnx_wine, context), context))
    models = [descriptor(onnx_wine, "1", publishedMs=1000),
              descriptor(onnx_wine, "2", publishedMs=2000,
                         validation=gate(onnx_wine, wrong_labels=8)),
              descriptor(onnx_wine, "3", publishedMs=3000)]
    for join, _, context in instances:
        for offset, model in enumerate(models):
            handled(join, context, model, offset)
    (_, first_published, first_context), (_, second_published, second_context) = instances
    assert [(e.version, [RepositoryEntry.Outcome.Name(d.outcome) for d in e.deployments])
            for _, _, e in first_published] == [
        ("1", ["ACCEPTED"]), ("2", ["VALIDATION_FAILED"]), ("1", ["ACCEPTED"]),
        ("3", ["ACCEPTED"])]
    assert first_published[2][2].deployments[0].retiredBy == "3"
    assert second_published == []
    for context in (first_context, second_context):
        kept = context.state["repository-entries"]
        assert sorted(kept) == [member_key(DATA_TYPE, f"{DATA_TYPE}//{v}") for v in "123"]
        assert all(not RepositoryEntry.FromString(raw).descriptor for raw in kept.values())
