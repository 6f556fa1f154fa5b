"""Demo data, demo models, manifest and descriptors (modelserving.demo.training, pmml_export)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from protos import ModelDescriptor, ModelType
from modelserving.demo import training
from modelserving.demo.pmml_export import fold_scaler, logistic_regression_pmml
from modelserving.demo.training import (DEMO_DATA_TYPE, TrainedModel, demo_dataset, descriptor_for,
                                   load_manifest, train_all)
from udfs.runtimes import load_model
from udfs.runtimes.base import FeatureBatch, LoadRequest


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("trained")
    return out, train_all(out)


def as_request(descriptor: ModelDescriptor) -> LoadRequest:
    """What the serving side builds from a descriptor (policies aside)."""
    content = descriptor.WhichOneof("MessageContent")
    return LoadRequest(name=descriptor.name, version=descriptor.version,
                       data_type=descriptor.dataType, model_type=descriptor.modeltype,
                       data=descriptor.data if content == "data" else None,
                       location=Path(descriptor.location) if content == "location" else None,
                       input_features=tuple(descriptor.inputFeatures),
                       signature=descriptor.signature, class_labels=tuple(descriptor.classLabels))


def test_demo_dataset_is_bundled_wine_data():
    data = demo_dataset()
    assert data.X.shape == (178, 13) and data.X.dtype == np.float64
    assert len(data.feature_names) == 13 and data.feature_names[0] == "alcohol"
    assert data.class_labels == ("0", "1", "2")
    assert sorted(set(data.y.tolist())) == [0, 1, 2]
    assert np.bincount(data.y).tolist() == [59, 71, 48]


def test_train_all_writes_one_model_per_format(trained):
    out, models = trained
    embedded = set(ModelType.values()) - {ModelType.EXTERNAL}   # EXTERNAL lives on a server
    assert sorted(m.model_type for m in models) == sorted(embedded)
    names = [m.name for m in models]
    assert len(set(names)) == len(names)
    data = demo_dataset()
    for model in models:
        assert model.path.is_absolute() and model.path.exists() and out in model.path.parents
        assert model.inline == (model.model_type != ModelType.TENSORFLOWSAVED)
        assert model.input_features == data.feature_names
        assert model.class_labels == ("0", "1", "2")
        assert model.version == "1" and "holdout accuracy" in model.description
        assert model.estimator is not None
        accuracy = float(model.description.rsplit(" ", 1)[1])
        assert accuracy >= 0.9
    saved = next(m for m in models if m.model_type == ModelType.TENSORFLOWSAVED)
    assert (saved.path / "saved_model.pb").is_file()
    pmml = next(m for m in models if m.model_type == ModelType.PMML).path.read_text()
    assert "<!DOCTYPE" not in pmml and 'normalizationMethod="softmax"' in pmml


def test_the_two_tensorflow_models_differ(trained):
    _, models = trained
    data = demo_dataset()
    by_type = {m.model_type: m for m in models}
    saved = by_type[ModelType.TENSORFLOWSAVED].estimator.predict_proba(data.X)
    graph = by_type[ModelType.TENSORFLOW].estimator.predict_proba(data.X)
    assert np.abs(saved - graph).max() > 1e-3


def test_saved_model_signature_is_like_the_tutorials(trained):
    from udfs.runtimes.tensorflow_graph import import_tensorflow

    tf = import_tensorflow()
    _, models = trained
    path = next(m for m in models if m.model_type == ModelType.TENSORFLOWSAVED).path
    function = tf.saved_model.load(str(path)).signatures["predict"]
    _, inputs = function.structured_input_signature
    assert list(inputs) == ["inputs"]
    assert inputs["inputs"].dtype == tf.float32 and inputs["inputs"].shape.as_list() == [None, 13]
    outputs = function.structured_outputs
    assert list(outputs) == ["outputs"] and outputs["outputs"].shape.as_list() == [None, 3]


def test_manifest_round_trip(trained):
    out, models = trained
    assert (out / training.MANIFEST).is_file()
    assert load_manifest(out) == models          # the estimator is not part of equality
    assert all(m.estimator is None for m in load_manifest(out))


def test_descriptors_serve_through_the_runtimes(trained):
    _, models = trained
    data = demo_dataset()
    for model in models:
        descriptor = ModelDescriptor.FromString(descriptor_for(model).SerializeToString())
        assert descriptor.name == model.name and descriptor.version == "1"
        assert descriptor.dataType == DEMO_DATA_TYPE and descriptor.publishedMs == 0
        assert descriptor.modeltype == model.model_type
        assert tuple(descriptor.inputFeatures) == model.input_features
        assert tuple(descriptor.classLabels) == ("0", "1", "2")
        if model.inline:
            assert descriptor.data == model.path.read_bytes()
        else:
            assert descriptor.location == str(model.path) and Path(descriptor.location).is_absolute()
        runtime = load_model(as_request(descriptor))
        predictions = runtime.score(FeatureBatch(runtime.input_names, data.X[:30]))
        assert [p.label for p in predictions] == [str(c) for c in model.estimator.predict(data.X[:30])]
        runtime.close()
    assert descriptor_for(models[0], data_type="other").dataType == "other"


def test_exports_are_deterministic(tmp_path):
    data = demo_dataset()
    X_train, _, y_train, _ = training.split(data)
    outputs = []
    for run in ("a", "b"):
        folder = tmp_path / run
        folder.mkdir()
        logistic = training.fit_logistic(X_train, y_train)
        mlp = training.fit_mlp(X_train, y_train, hidden=(8,), seed=3)
        training.export_onnx(logistic, 13, folder / "m.onnx")
        training.export_frozen_graph(mlp, 13, folder / "m.pb")
        training.export_pmml(logistic, data.feature_names, data.class_labels, folder / "m.pmml",
                             model_name="m", description="d")
        outputs.append([(folder / f).read_bytes() for f in ("m.onnx", "m.pb", "m.pmml")])
    assert outputs[0] == outputs[1]


def test_fold_scaler_is_exact():
    rng = np.random.default_rng(0)
    w, b = rng.normal(size=(3, 4)), rng.normal(size=3)
    mean, scale = rng.normal(size=4), rng.uniform(0.5, 2.0, size=4)
    x = rng.normal(size=(5, 4))
    folded_w, folded_b = fold_scaler(w, b, mean, scale)
    np.testing.assert_allclose(x @ folded_w.T + folded_b, ((x - mean) / scale) @ w.T + b,
                               rtol=1e-12, atol=1e-12)


def test_binary_logistic_regression_pmml():
    from sklearn.linear_model import LogisticRegression
    from protos import ModelType

    data = demo_dataset()
    mask = data.y < 2
    X, y = data.X[mask][:, :4], np.where(data.y[mask] == 1, "yes", "no")
    classifier = LogisticRegression(max_iter=5000).fit(X, y)
    names = ("a", "b c", "d/e", "f&g")      # spaces and XML characters survive
    text = logistic_regression_pmml(classifier, feature_names=names, target="answer")
    runtime = load_model(LoadRequest(name="binary", version="1", data_type="t",
                                     model_type=ModelType.PMML, data=text.encode()))
    assert runtime.input_names == names
    predictions = runtime.score(FeatureBatch(names, X[:40]))
    np.testing.assert_allclose([p.probabilities for p in predictions],
                               classifier.predict_proba(X[:40]), rtol=0, atol=1e-9)
    assert [p.label for p in predictions] == classifier.predict(X[:40]).tolist()
    assert predictions[0].class_labels == ("no", "yes")
    assert {p.value for p in predictions} <= {0.0, 1.0}         # non-numeric labels: the index


def test_trained_model_type_name():
    model = TrainedModel("n", "1", ModelType.PMML, Path("/x"), True, (), (), "")
    assert model.type_name == "PMML"


def test_manifest_entry_describes_a_trained_file(tmp_path):
    from modelserving.demo.training import manifest_entry, train_all

    models = train_all(tmp_path)
    onnx = next(m for m in models if m.path.suffix == ".onnx")
    found = manifest_entry(onnx.path)
    assert found is not None and found.name == onnx.name
    assert found.input_features == onnx.input_features and len(found.input_features) == 13
    assert manifest_entry(tmp_path / "not-a-model.onnx") is None
