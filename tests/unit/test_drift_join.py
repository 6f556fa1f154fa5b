"""Behaviour monitoring in the keyed join (in-memory runtime context, a real ONNX model):
records like the training data leave the model unflagged, records with one feature shifted
flag that feature, in the statistics (and so the state page) and the metrics; the counts
live in the statistics' state, so a restored join goes on counting."""
from __future__ import annotations

import copy

import numpy as np
import pytest
from pyflink.common import Row as FlinkRow

from flink_state_fakes import KeyedContext
from jobs.settings import Settings
from modelserving.demo.training import DEMO_DATA_TYPE
from modelserving.kafka.clients import Row, encode_record
from modelserving.state.view import ModelStateView
from protos import ModelDescriptor, ModelStats, ModelType
from udfs.flink.joins import MODEL_STATS, KeyedServing
from udfs.lifecycle import drift
from udfs.runtimes import load_model
from udfs.runtimes.base import FeatureBatch
from udfs.models import load_request


@pytest.fixture(scope="module")
def with_reference(onnx_wine) -> bytes:
    """The ONNX classifier with the reference of all the wine data: feature bins and the
    shares of the labels it gives them."""
    names = list(onnx_wine.feature_names)
    X = np.vstack([onnx_wine.X_train, onnx_wine.X_test])
    descriptor = ModelDescriptor(name="wine-logreg", version="1", dataType=DEMO_DATA_TYPE,
                                 modeltype=ModelType.ONNX, data=onnx_wine.path.read_bytes(),
                                 inputFeatures=names, classLabels=list(onnx_wine.class_labels))
    runtime = load_model(load_request(descriptor, [], 10**8))
    reference = drift.reference_from_matrix(names, X, source="the wine data")
    drift.add_output_reference(reference, runtime.score(FeatureBatch(tuple(names), X)))
    descriptor.reference.CopyFrom(reference)
    return descriptor.SerializeToString()


def serve(join, context, onnx_wine, X):
    names = onnx_wine.feature_names
    raws = [encode_record(Row(DEMO_DATA_TYPE, names, tuple(map(float, x)), f"r{i}"))
            for i, x in enumerate(X)]
    for start in range(0, len(raws), 50):
        chunk = raws[start:start + 50]
        list(join.process_element1(FlinkRow(DEMO_DATA_TYPE, 0, list(range(len(chunk))), chunk),
                                   context))


def stats_of(context) -> ModelStats:
    return ModelStats.FromString(context.state[MODEL_STATS][DEMO_DATA_TYPE])


def joined(context, model: bytes | None):
    join = KeyedServing(Settings(state_topic="", stats_interval_ms=0), {})
    join.open(context)
    if model is not None:
        list(join.process_element2(FlinkRow(0, 0, model), context))
    return join


def sample(onnx_wine, n: int, seed: int) -> np.ndarray:
    X = np.vstack([onnx_wine.X_train, onnx_wine.X_test])
    return X[np.random.default_rng(seed).integers(0, len(X), n)]


def test_records_like_the_reference_are_not_flagged(onnx_wine, with_reference):
    context = KeyedContext()
    join = joined(context, with_reference)
    serve(join, context, onnx_wine, sample(onnx_wine, 400, seed=3))
    join.close()
    stats = stats_of(context)
    assert stats.driftRows == 400 and not stats.driftFlagged
    assert max(d.psi for d in stats.drift) < 0.1 and 0 <= stats.outputPsi < 0.1
    assert context.gauge("drift_flagged") == 0


def test_a_shifted_feature_is_flagged_and_counting_survives_a_restore(onnx_wine, with_reference,
                                                                      caplog):
    shifted = sample(onnx_wine, 400, seed=4)
    shifted[:, onnx_wine.feature_names.index("alcohol")] += 1.0
    context = KeyedContext()
    join = joined(context, with_reference)
    serve(join, context, onnx_wine, shifted[:200])
    join.close()
    stats = stats_of(context)
    assert stats.driftRows == 200 and stats.driftFlagged
    assert [d.feature for d in stats.drift if d.flagged] == ["alcohol"]
    assert next(d.psi for d in stats.drift if d.feature == "alcohol") > 1.0
    assert context.gauge("drift_flagged") == 1 and context.gauge("drift_psi_max_milli") > 1000
    assert any("model drift for data type 'wine-cultivar'" in r.getMessage()
               and "alcohol" in r.getMessage() for r in caplog.records)

    restored = KeyedContext(copy.deepcopy(context.state))   # as a checkpoint would give it
    again = joined(restored, None)                          # the model comes from state
    serve(again, restored, onnx_wine, shifted[200:])
    again.close()
    assert stats_of(restored).driftRows == 400 and stats_of(restored).driftFlagged

    view = ModelStateView()
    view.ingest(f"keyed/{DEMO_DATA_TYPE}", stats_of(restored).SerializeToString())
    [job] = view.state(DEMO_DATA_TYPE)["jobs"].values()
    assert job["drift"]["flagged"] and job["drift"]["flagged_features"] == ["alcohol"]
    assert job["drift"]["rows"] == 400


def test_a_new_model_starts_its_drift_afresh(onnx_wine, with_reference):
    shifted = sample(onnx_wine, 200, seed=5)
    shifted[:, onnx_wine.feature_names.index("alcohol")] += 1.0
    context = KeyedContext()
    join = joined(context, with_reference)
    serve(join, context, onnx_wine, shifted)
    assert stats_of(context).driftFlagged
    plain = ModelDescriptor.FromString(with_reference)
    plain.ClearField("reference")
    plain.version = "2"
    list(join.process_element2(FlinkRow(0, 1, plain.SerializeToString()), context))
    serve(join, context, onnx_wine, shifted)
    join.close()
    stats = stats_of(context)
    assert stats.modelVersion == "2" and stats.driftRows == 0 and not stats.driftFlagged
    assert list(stats.drift) == [] and context.gauge("drift_flagged") == 0
