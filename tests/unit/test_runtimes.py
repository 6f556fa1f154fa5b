"""Runtimes and their registry: tutorial artifacts, the project's demo models, and failures.

Tutorial artifacts are read in place from ``../shared/tutorial`` beside the repository (never
copied into it); those tests skip when the folder is absent. pypmml starts one JVM for the
whole test process; TensorFlow is imported only by the tests that need it.
"""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from protos import ModelType
from udfs.errors import ModelLoadError, ModelRejected, RecordError, UnknownModelType
from udfs.features import WINE_DATA_TYPE, WINE_FEATURES
from udfs.runtimes import SUPPORTED_TYPES, load_model, runtime_for
from udfs.runtimes.base import FeatureBatch, LoadRequest
from udfs.errors import OutputError
from udfs.runtimes.outputs import FIXED_CALL_ROWS, OutputReader, in_fixed_calls, interpret

REPO = Path(__file__).resolve().parents[2]
TUTORIAL = REPO.parent / "shared" / "tutorial"
PMML_FILES = (
    "winequalityDecisionTreeClassification.pmml",
    "winequalityDesisionTreeRegression.pmml",
    "winequalityGeneralizedLinearRegressionGamma.pmml",
    "winequalityGeneralizedLinearRegressionGaussian.pmml",
    "winequalityLinearRegression.pmml",
    "winequalityMultilayerPerceptron.pmml",
    "winequalityRandonForrestClassification.pmml",
)
ROWS = 50


def request(model_type: int, *, name: str = "m", data: bytes | None = None,
            location: Path | None = None, data_type: str = WINE_DATA_TYPE, **extra) -> LoadRequest:
    return LoadRequest(name=name, version="7", data_type=data_type, model_type=model_type,
                       data=data, location=location, **extra)


def batch_for(runtime, X: np.ndarray, names=WINE_FEATURES) -> FeatureBatch:
    columns = [list(names).index(n) for n in runtime.input_names]
    return FeatureBatch(runtime.input_names, np.ascontiguousarray(X[:, columns]))


# -- fixtures ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tutorial() -> Path:
    if not (TUTORIAL / "winequality_red.csv").is_file():
        pytest.skip(f"tutorial artifacts not found at {TUTORIAL} (they are read in place from "
                    f"../shared/tutorial beside the repository and never copied into it)")
    return TUTORIAL


@pytest.fixture(scope="module")
def wine_rows(tutorial) -> np.ndarray:
    table = np.loadtxt(tutorial / "winequality_red.csv", delimiter=";", max_rows=ROWS)
    assert table.shape == (ROWS, 12)
    return table[:, :11]


@pytest.fixture(scope="module")
def tf():
    from udfs.runtimes.tensorflow_graph import import_tensorflow

    return import_tensorflow()


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from modelserving.demo.training import demo_dataset, train_all

    models = train_all(tmp_path_factory.mktemp("demo-models"))
    return demo_dataset(), {m.model_type: m for m in models}


def demo_request(model, **overrides) -> LoadRequest:
    fields = dict(name=model.name, data_type="wine-cultivar", input_features=model.input_features,
                  class_labels=model.class_labels)
    if model.inline:
        fields["data"] = model.path.read_bytes()
    else:
        fields["location"] = model.path
    fields.update(overrides)
    return request(model.model_type, **fields)


# -- tutorial artifacts -----------------------------------------------------------------------

def one_call(rows: np.ndarray) -> np.ndarray:
    """``rows`` padded with zero rows to the shape every TensorFlow call of the runtimes has,
    so the library is compared on the same kernels."""
    assert len(rows) <= FIXED_CALL_ROWS
    return np.concatenate([rows, np.zeros((FIXED_CALL_ROWS - len(rows), rows.shape[1]))])


def test_in_fixed_calls_splits_pads_and_trims():
    calls = []

    def call(chunk):
        calls.append(chunk.copy())
        return [("doubled", chunk[:, 0] * 2), ("constant", np.array(7.0))]

    values = np.arange(10, dtype=np.float64).reshape(5, 2)
    outputs = dict(in_fixed_calls(values, call, rows_per_call=2))
    assert [c.shape for c in calls] == [(2, 2)] * 3
    assert calls[-1].tolist() == [[8.0, 9.0], [0.0, 0.0]]        # the last call is padded
    assert outputs["doubled"].tolist() == [0.0, 4.0, 8.0, 12.0, 16.0]
    assert float(outputs["constant"]) == 7.0


def test_tutorial_saved_model_matches_direct_signature_call(tutorial, wine_rows, tf):
    runtime = load_model(request(ModelType.TENSORFLOWSAVED, location=tutorial / "saved" / "1"))
    assert runtime.input_names == WINE_FEATURES
    assert runtime.signature == "predict"
    predictions = runtime.score(batch_for(runtime, wine_rows))

    direct = tf.saved_model.load(str(tutorial / "saved" / "1")).signatures["predict"]
    expected = direct(inputs=tf.constant(one_call(wine_rows), tf.float32))["outputs"].numpy()[:ROWS]
    assert expected.shape == (ROWS, 9)
    got = np.array([p.probabilities for p in predictions])
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-7)
    best = expected.argmax(axis=1)
    assert [p.label for p in predictions] == [str(i) for i in best]
    assert [p.value for p in predictions] == [float(i) for i in best]
    assert predictions[0].class_labels == tuple(str(i) for i in range(9))
    assert predictions[0].label == "5" and predictions[0].probabilities[5] == pytest.approx(0.68974, abs=1e-5)
    runtime.close()


def test_tutorial_frozen_graph_matches_session_run(tutorial, wine_rows, tf):
    raw = (tutorial / "optimized_WineQuality.pb").read_bytes()
    runtime = load_model(request(ModelType.TENSORFLOW, data=raw))
    assert runtime.signature.input_name == "dense_1_input"
    assert runtime.signature.outputs == ["dense_3/Sigmoid"]
    assert runtime.signature.width == 11          # from the first layer's weights
    assert runtime.input_names == WINE_FEATURES
    predictions = runtime.score(batch_for(runtime, wine_rows))

    graph_def = tf.compat.v1.GraphDef()
    graph_def.ParseFromString(raw)
    with tf.Graph().as_default() as graph:
        tf.compat.v1.import_graph_def(graph_def, name="")
        with tf.compat.v1.Session(graph=graph) as session:
            expected = session.run("dense_3/Sigmoid:0",
                                   {"dense_1_input:0": one_call(wine_rows).astype(np.float32)})[:ROWS]
    got = np.array([p.probabilities for p in predictions])
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-7)
    assert [p.label for p in predictions] == [str(i) for i in expected.argmax(axis=1)]
    assert predictions[0].probabilities[5] == pytest.approx(0.69122, abs=1e-5)


@pytest.fixture(scope="module")
def pypmml_model():
    from pypmml import Model

    return Model


@pytest.mark.parametrize("file_name", PMML_FILES)
def test_tutorial_pmml_matches_pypmml_per_record(tutorial, wine_rows, pypmml_model, file_name):
    text = (tutorial / file_name).read_text(encoding="utf-8")
    runtime = load_model(request(ModelType.PMML, name=file_name, data=text.encode()))
    direct = pypmml_model.fromString(text)
    assert runtime.input_names == tuple(direct.inputNames)
    assert set(runtime.input_names) <= set(WINE_FEATURES)
    predictions = runtime.score(batch_for(runtime, wine_rows))
    assert len(predictions) == ROWS

    classification = direct.functionName == "classification"
    classes = [str(c) for c in direct.classes] if classification else []
    if classification:
        assert runtime.chunk_rows < ROWS     # the batch crosses a chunk boundary
    labelled = pypmml_model.fromString(text).setSupplementOutput(True)
    for row, prediction in zip(wine_rows, predictions):
        record = {name: float(row[WINE_FEATURES.index(name)]) for name in direct.inputNames}
        expected = direct.predict(record)
        if not classification:
            assert prediction.label == "" and prediction.probabilities == ()
            assert prediction.value == pytest.approx(expected["predicted_quality"], rel=1e-12)
            continue
        assert prediction.class_labels == tuple(classes)
        want = [expected[f"probability({c})"] for c in classes]
        for got, wanted in zip(prediction.probabilities, want):
            assert (math.isnan(got) and math.isnan(wanted)) or got == pytest.approx(wanted, rel=1e-12)
        label = str(labelled.predict(record)["predicted_quality"])
        assert prediction.label == label
        assert prediction.value == float(label)
    runtime.close()


def test_tutorial_pmml_first_record_values(tutorial, wine_rows):
    """Pinned numbers, so a silent change of library or of the JSON batch path shows up."""
    def first(file_name):
        runtime = load_model(request(ModelType.PMML, data=(tutorial / file_name).read_bytes()))
        return runtime.score(batch_for(runtime, wine_rows[:1]))[0]

    assert first("winequalityLinearRegression.pmml").value == pytest.approx(5.178126058334128, rel=1e-12)
    tree = first("winequalityDecisionTreeClassification.pmml")
    assert tree.label == "5" and tree.value == 5.0
    assert tree.probabilities[0] == pytest.approx(0.8302752293577982, rel=1e-12)
    assert math.isnan(tree.probabilities[tree.class_labels.index("8")])


def test_pmml_chunks_answer_below_py4j_write_buffer(tutorial, wine_rows, pypmml_model):
    """Answers over 8 KB stall 40 ms in Py4J (Nagle + delayed ACK); chunks must stay below."""
    import json

    for file_name in PMML_FILES:
        text = (tutorial / file_name).read_text(encoding="utf-8")
        runtime = load_model(request(ModelType.PMML, data=text.encode()))
        direct = pypmml_model.fromString(text).setSupplementOutput(True)
        rows = np.resize(wine_rows, (runtime.chunk_rows, 11))
        batch = batch_for(runtime, rows)
        answer = direct.predict(json.dumps({"columns": list(runtime.input_names),
                                            "data": batch.values.tolist()}))
        assert len(answer) < 8000, (file_name, runtime.chunk_rows, len(answer))
        assert runtime.chunk_rows >= 16


# -- the project's demo models ----------------------------------------------------------------

@pytest.mark.parametrize("model_type", [ModelType.ONNX, ModelType.TENSORFLOWSAVED,
                                        ModelType.TENSORFLOW, ModelType.PMML],
                         ids=ModelType.Name)
def test_demo_model_equals_sklearn(demo, model_type):
    data, models = demo
    model = models[model_type]
    runtime = load_model(demo_request(model))
    assert runtime.input_names == data.feature_names
    predictions = runtime.score(FeatureBatch(runtime.input_names, data.X))
    got = np.array([p.probabilities for p in predictions])
    np.testing.assert_allclose(got, model.estimator.predict_proba(data.X), rtol=0, atol=1e-5)
    expected_labels = [str(c) for c in model.estimator.predict(data.X)]
    assert [p.label for p in predictions] == expected_labels
    assert [p.value for p in predictions] == [float(c) for c in expected_labels]
    assert {p.class_labels for p in predictions} == {("0", "1", "2")}
    runtime.close()


def test_onnx_zipmap_output(demo):
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType

    data, models = demo
    estimator = models[ModelType.ONNX].estimator
    onnx_model = convert_sklearn(estimator, initial_types=[("x", FloatTensorType([None, 13]))],
                                 target_opset={"": 17, "ai.onnx.ml": 3})   # ZipMap left on
    runtime = load_model(request(ModelType.ONNX, data=onnx_model.SerializeToString(),
                                 input_features=data.feature_names))
    predictions = runtime.score(FeatureBatch(data.feature_names, data.X[:20]))
    np.testing.assert_allclose([p.probabilities for p in predictions],
                               estimator.predict_proba(data.X[:20]), rtol=0, atol=1e-5)
    assert [p.label for p in predictions] == [str(c) for c in estimator.predict(data.X[:20])]


def test_onnx_regression_and_descriptor_class_labels(demo):
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.linear_model import LinearRegression

    data, models = demo
    regressor = LinearRegression().fit(data.X, data.y.astype(float))
    onnx_model = convert_sklearn(regressor, initial_types=[("x", FloatTensorType([None, 13]))],
                                 target_opset=17)
    runtime = load_model(request(ModelType.ONNX, data=onnx_model.SerializeToString(),
                                 input_features=data.feature_names))
    predictions = runtime.score(FeatureBatch(data.feature_names, data.X[:10]))
    np.testing.assert_allclose([p.value for p in predictions], regressor.predict(data.X[:10]),
                               rtol=1e-5, atol=1e-4)
    assert all(p.label == "" and p.probabilities == () for p in predictions)

    named = load_model(demo_request(models[ModelType.ONNX], class_labels=("barolo", "grignolino",
                                                                          "barbera")))
    first = named.score(FeatureBatch(data.feature_names, data.X[:1]))[0]
    assert first.label == "barolo" and first.value == 0.0     # not numeric: the class index
    assert first.class_labels == ("barolo", "grignolino", "barbera")


# -- registry and failures --------------------------------------------------------------------

def test_registry_knows_every_enum_value_and_refuses_others():
    assert SUPPORTED_TYPES == set(ModelType.values())
    with pytest.raises(UnknownModelType, match=r"unknown model type 99 .*supported: .*ONNX"):
        runtime_for(99)
    with pytest.raises(UnknownModelType) as caught:
        load_model(request(42, name="mystery", data=b"x"))
    assert "42" in str(caught.value) and "model 'mystery' version '7'" in str(caught.value)
    assert runtime_for(ModelType.ONNX).__name__ == "OnnxRuntime"


def test_registry_imports_formats_lazily():
    code = ("import sys; from protos import ModelType; from udfs.runtimes import runtime_for; "
            "runtime_for(ModelType.ONNX); runtime_for(ModelType.PMML); "
            "assert 'tensorflow' not in sys.modules, 'tensorflow imported'; "
            "runtime_for(ModelType.TENSORFLOW); assert 'tensorflow' not in sys.modules; print('ok')")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


@pytest.mark.parametrize("model_type, raw", [
    (ModelType.ONNX, b"definitely not an onnx model"),
    (ModelType.TENSORFLOW, b"\x08\x96\x01garbage that is no GraphDef"),
    (ModelType.TENSORFLOW, b""),
    (ModelType.PMML, b"<PMML><broken"),
    (ModelType.PMML, b"\xff\xfe\xfa not text"),
], ids=["onnx", "graph", "graph-empty", "pmml", "pmml-binary"])
def test_corrupt_bytes_are_load_errors(model_type, raw):
    with pytest.raises(ModelLoadError) as caught:
        load_model(request(model_type, name="broken", data=raw))
    message = str(caught.value)
    assert "model 'broken' version '7'" in message and "data type 'wine'" in message
    assert type(caught.value).__name__ == "ModelLoadError"


@pytest.mark.parametrize("document", [
    b'<?xml version="1.0"?>\n<!DOCTYPE PMML [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>\n'
    b'<PMML version="4.4"><Header description="&xxe;"/></PMML>',
    b'<?xml version="1.0"?><!doctype pmml><PMML/>',
    b'\xef\xbb\xbf<?xml version="1.0"?><!ENTITY x "y"><PMML/>',
], ids=["doctype-xxe", "lowercase-doctype", "bom-entity"])
def test_pmml_with_dtd_is_rejected_before_parsing(document, monkeypatch):
    import pypmml

    def parser_must_not_run(*args, **kwargs):
        raise AssertionError("the document reached the PMML parser")

    monkeypatch.setattr(pypmml.Model, "fromString", parser_must_not_run)
    with pytest.raises(ModelRejected, match="DOCTYPE|ENTITY"):
        load_model(request(ModelType.PMML, name="xxe", data=document))


def test_missing_saved_model_directory(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(request(ModelType.TENSORFLOWSAVED, location=tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="not a loadable SavedModel") as caught:
        load_model(request(ModelType.TENSORFLOWSAVED, name="hollow", location=tmp_path / "empty"))
    assert "model 'hollow'" in str(caught.value)


def test_saved_model_signature_choice(demo):
    model = demo[1][ModelType.TENSORFLOWSAVED]
    assert load_model(demo_request(model)).signature == "predict"
    assert load_model(demo_request(model, signature="predict")).signature == "predict"
    with pytest.raises(ModelLoadError, match=r"has no signature 'nope' \(it has: predict\)"):
        load_model(demo_request(model, signature="nope"))


@pytest.mark.parametrize("model_type", [ModelType.ONNX, ModelType.TENSORFLOWSAVED,
                                        ModelType.TENSORFLOW], ids=ModelType.Name)
def test_input_width_mismatch(demo, model_type):
    model = demo[1][model_type]
    # The wine data type's canonical order has 11 features; the demo models take 13.
    with pytest.raises(ModelLoadError, match=r"takes 13 input features but 11 are named"):
        load_model(demo_request(model, data_type=WINE_DATA_TYPE, input_features=()))
    with pytest.raises(ModelLoadError, match="needs inputFeatures"):
        load_model(demo_request(model, data_type="no-such-type", input_features=()))


def test_unexpected_library_exception_becomes_load_error(monkeypatch):
    from udfs.runtimes import onnx_runtime

    def explode(cls, req):
        raise KeyError("internal detail")

    monkeypatch.setattr(onnx_runtime.OnnxRuntime, "load", classmethod(explode))
    with pytest.raises(ModelLoadError, match=r"ONNX model could not be loaded: KeyError") as caught:
        load_model(request(ModelType.ONNX, name="fragile", data=b"x"))
    assert "model 'fragile'" in str(caught.value)


@pytest.mark.parametrize("model_type", [ModelType.ONNX, ModelType.TENSORFLOWSAVED,
                                        ModelType.TENSORFLOW, ModelType.PMML],
                         ids=ModelType.Name)
def test_batch_edges_and_close(demo, model_type):
    data, models = demo
    runtime = load_model(demo_request(models[model_type]))
    names = runtime.input_names
    assert runtime.score(FeatureBatch(names, np.empty((0, len(names))))) == []
    with pytest.raises(RecordError, match="not the model inputs"):
        runtime.score(FeatureBatch(tuple(reversed(names)), data.X[:1]))
    assert len(runtime.score(FeatureBatch(names, data.X[:1]))) == 1
    runtime.close()
    runtime.close()   # closing twice is harmless


# -- output interpretation --------------------------------------------------------------------

def test_output_rules():
    probabilities = np.array([[0.1, 0.9], [0.8, 0.2]], dtype=np.float32)
    reader = OutputReader.for_outputs([("label", np.array([1, 0])), ("probabilities", probabilities)])
    first, second = reader.read([("label", np.array([1, 0])), ("probabilities", probabilities)], 2)
    assert (first.label, first.value, second.label, second.value) == ("1", 1.0, "0", 0.0)

    strings = OutputReader.for_outputs([("label", np.array(["red", "white"], dtype=object))])
    assert [p.label for p in strings.read([("label", np.array(["red", "white"], dtype=object))], 2)] \
        == ["red", "white"]

    regression = OutputReader.for_outputs([("variable", np.array([[1.5], [2.5]]))])
    assert [p.value for p in regression.read([("variable", np.array([[1.5], [2.5]]))], 2)] == [1.5, 2.5]

    zipmap = [{"a": 0.25, "b": 0.75}]
    read = OutputReader.for_outputs([("output_probability", zipmap)]).read(
        [("output_probability", zipmap)], 1)[0]
    assert (read.label, read.value, read.class_labels, read.probabilities) == \
        ("b", 1.0, ("a", "b"), (0.25, 0.75))

    with pytest.raises(OutputError, match="classLabels lists 3 classes but the model outputs 2"):
        OutputReader.for_outputs([("p", probabilities)], class_labels=("a", "b", "c"))
    with pytest.raises(OutputError, match="no output reads as"):
        interpret([("cube", np.zeros((2, 2, 2)))])
