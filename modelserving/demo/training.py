"""Demo data and demo models that need nothing beyond the project's own dependencies.

The data is scikit-learn's bundled wine recognition dataset (``sklearn.datasets.load_wine``:
178 wines, 13 chemical measurements, 3 cultivars), so nothing is downloaded. ``train_all``
writes one model per supported format, plus ``manifest.json`` describing them (with each
model's holdout accuracy as a quality metric) and the split's rows as ``training.csv`` and
``holdout.csv`` (a drift reference and a validation gate for ``publish model``):

=====================  ================  =====================================================
model                  type              what
=====================  ================  =====================================================
wine-cultivar-logreg   ONNX              StandardScaler + LogisticRegression via skl2onnx
wine-cultivar-mlp      TENSORFLOWSAVED   MLP (16 hidden) rebuilt as a tf.function, signature
                                         "predict": inputs float32 [None, 13] -> outputs [None, 3]
wine-cultivar-mlp-pb   TENSORFLOW        another MLP (8 hidden), as a frozen GraphDef
wine-cultivar-pmml     PMML              LogisticRegression, scaler folded in (pmml_export)
=====================  ================  =====================================================

The TensorFlow models are not trained by TensorFlow: the weights of a fitted scikit-learn
``MLPClassifier`` (and its scaler) are written into a TF graph, so TF's probabilities equal
``predict_proba`` up to float32 rounding. Every seed is fixed; training all four takes seconds
(most of it importing TensorFlow).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from protos import ModelDescriptor, ModelType

DEMO_DATA_TYPE = "wine-cultivar"
SEED = 7
MANIFEST = "manifest.json"
#: The split's rows as files (features + "label"), beside the models: the training rows for a
#: drift reference (``publish model --reference``), the holdout rows for a validation gate
#: (``modelserving validate``, ``publish model --validation``).
TRAINING_CSV = "training.csv"
HOLDOUT_CSV = "holdout.csv"
#: The ONNX opsets written (onnx 1.17 reads up to 22; onnxruntime 1.17+ runs 17).
ONNX_OPSETS = {"": 17, "ai.onnx.ml": 3}


class DemoDataset(NamedTuple):
    feature_names: tuple[str, ...]
    X: np.ndarray                 # float64 [178, 13]
    y: np.ndarray                 # int class index [178]
    class_labels: tuple[str, ...]  # ("0", "1", "2"): the cultivar ids, numeric on purpose


@dataclass(frozen=True)
class TrainedModel:
    name: str
    version: str
    model_type: int               # a ModelType enum value
    path: Path                    # the model file, or the SavedModel directory
    inline: bool                  # True: sent as bytes (data); False: sent by location
    input_features: tuple[str, ...]
    class_labels: tuple[str, ...]
    description: str
    #: The fitted scikit-learn model the file was made from (None when read from a manifest).
    estimator: Any = field(default=None, compare=False, repr=False)
    #: Measured quality, published with the model (ModelDescriptor.qualityMetrics).
    quality_metrics: dict = field(default_factory=dict, compare=False)

    @property
    def type_name(self) -> str:
        return ModelType.Name(self.model_type)


def demo_dataset() -> DemoDataset:
    """The wine recognition data bundled with scikit-learn (no download)."""
    from sklearn.datasets import load_wine

    bunch = load_wine()
    labels = tuple(str(c) for c in np.unique(bunch.target))
    return DemoDataset(tuple(bunch.feature_names), np.asarray(bunch.data, dtype=np.float64),
                       np.asarray(bunch.target), labels)


def split(dataset: DemoDataset):
    """The fixed, stratified 75/25 train/holdout split every demo model uses."""
    from sklearn.model_selection import train_test_split

    return train_test_split(dataset.X, dataset.y, test_size=0.25, random_state=SEED,
                            stratify=dataset.y)


# -- scikit-learn models ----------------------------------------------------------------------

def fit_logistic(X, y, *, C: float = 1.0):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    return Pipeline([("scaler", StandardScaler()),
                     ("classifier", LogisticRegression(C=C, max_iter=2000))]).fit(X, y)


def fit_mlp(X, y, *, hidden: tuple[int, ...], seed: int):
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    mlp = MLPClassifier(hidden_layer_sizes=hidden, activation="relu", solver="lbfgs",
                        alpha=1e-2, max_iter=3000, random_state=seed)
    return Pipeline([("scaler", StandardScaler()), ("classifier", mlp)]).fit(X, y)


# -- exporters --------------------------------------------------------------------------------

def export_onnx(pipeline, n_features: int, path: Path, *, graph_name: str = "wine_cultivar") -> None:
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType

    model = convert_sklearn(pipeline, initial_types=[("inputs", FloatTensorType([None, n_features]))],
                            options={id(pipeline.steps[-1][1]): {"zipmap": False}},
                            target_opset=ONNX_OPSETS, name=graph_name)  # default: a random id
    path.write_bytes(model.SerializeToString())


def _mlp_parts(pipeline):
    scaler, mlp = pipeline.named_steps["scaler"], pipeline.named_steps["classifier"]
    if mlp.out_activation_ != "softmax":
        raise ValueError("only multi-class MLPs (softmax output) are exported to TensorFlow")
    return scaler, mlp


def _activation(tf, name: str):
    functions = {"relu": tf.nn.relu, "tanh": tf.tanh, "logistic": tf.sigmoid,
                 "identity": tf.identity}
    return functions[name]


def export_saved_model(pipeline, n_features: int, directory: Path) -> None:
    """A SavedModel whose signature "predict" maps "inputs" [None, n] to "outputs" [None, k]."""
    from udfs.runtimes.tensorflow_graph import import_tensorflow

    tf = import_tensorflow()
    scaler, mlp = _mlp_parts(pipeline)
    hidden = _activation(tf, mlp.activation)

    class MlpModule(tf.Module):
        def __init__(self):
            super().__init__(name="wine_mlp")
            self.mean = tf.Variable(scaler.mean_.astype(np.float32), trainable=False, name="mean")
            self.scale = tf.Variable(scaler.scale_.astype(np.float32), trainable=False,
                                     name="scale")
            self.kernels = [tf.Variable(w.astype(np.float32), name=f"kernel_{i}")
                            for i, w in enumerate(mlp.coefs_)]
            self.biases = [tf.Variable(b.astype(np.float32), name=f"bias_{i}")
                           for i, b in enumerate(mlp.intercepts_)]

        @tf.function(input_signature=[tf.TensorSpec([None, n_features], tf.float32,
                                                    name="inputs")])
        def predict(self, inputs):
            h = (inputs - self.mean) / self.scale
            last = len(self.kernels) - 1
            for i, (w, b) in enumerate(zip(self.kernels, self.biases)):
                h = tf.matmul(h, w) + b
                h = tf.nn.softmax(h) if i == last else hidden(h)
            return {"outputs": h}

    module = MlpModule()
    tf.saved_model.save(module, str(directory), signatures={"predict": module.predict})


def export_frozen_graph(pipeline, n_features: int, path: Path) -> None:
    """A frozen GraphDef: Placeholder "inputs" [None, n] -> Softmax "outputs" [None, k]."""
    from udfs.runtimes.tensorflow_graph import import_tensorflow

    tf = import_tensorflow()
    scaler, mlp = _mlp_parts(pipeline)
    hidden = _activation(tf, mlp.activation)
    graph = tf.Graph()
    with graph.as_default():
        inputs = tf.compat.v1.placeholder(tf.float32, [None, n_features], name="inputs")
        h = (inputs - tf.constant(scaler.mean_, tf.float32, name="mean")) \
            / tf.constant(scaler.scale_, tf.float32, name="scale")
        last = len(mlp.coefs_) - 1
        for i, (w, b) in enumerate(zip(mlp.coefs_, mlp.intercepts_)):
            h = tf.matmul(h, tf.constant(w, tf.float32, name=f"kernel_{i}")) \
                + tf.constant(b, tf.float32, name=f"bias_{i}")
            h = tf.nn.softmax(h, name="outputs") if i == last else hidden(h)
    # NodeDef attributes are a protobuf map: only deterministic serialization is reproducible.
    path.write_bytes(graph.as_graph_def().SerializeToString(deterministic=True))


def export_pmml(pipeline, feature_names, class_labels, path: Path, *, model_name: str,
                description: str) -> None:
    from modelserving.demo.pmml_export import logistic_regression_pmml

    text = logistic_regression_pmml(pipeline.named_steps["classifier"],
                                    scaler=pipeline.named_steps["scaler"],
                                    feature_names=feature_names, class_labels=class_labels,
                                    target="cultivar", model_name=model_name,
                                    description=description)
    path.write_text(text, encoding="utf-8")


# -- the model server's copy ----------------------------------------------------------------

#: The demo model a model server (MLServer) serves: the ONNX model's pipeline, as joblib.
SERVED_MODEL_NAME = "wine-cultivar-logreg"


def export_for_model_server(out_dir: Path) -> Path:
    """``model.joblib`` of the same fitted pipeline as ``wine-cultivar-logreg.onnx`` (same
    data, split and seed, so the same coefficients) into ``out_dir``, for MLServer's
    scikit-learn runtime. The file is a pickle: it is only ever loaded by the model server
    the tooling starts, from this project's own var/ folder, never by a job."""
    import joblib

    data = demo_dataset()
    X_train, _, y_train, _ = split(data)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "model.joblib"
    joblib.dump(fit_logistic(X_train, y_train, C=1.0), path)
    return path


# -- all of it --------------------------------------------------------------------------------

def train_all(out_dir: Path) -> list[TrainedModel]:
    """Fit and write the four demo models and ``manifest.json`` into ``out_dir``."""
    import shutil

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = demo_dataset()
    X_train, X_test, y_train, y_test = split(data)
    n = len(data.feature_names)
    common = dict(version="1", input_features=data.feature_names, class_labels=data.class_labels)

    def quality(pipeline) -> dict:
        return {"holdoutAccuracy": float(np.mean(pipeline.predict(X_test) == y_test))}

    def about(what: str, pipeline) -> str:
        return (f"{what}, trained on scikit-learn's wine recognition data ({n} features, "
                f"{len(data.class_labels)} cultivars); holdout accuracy "
                f"{quality(pipeline)['holdoutAccuracy']:.3f}")

    models = []
    logreg = fit_logistic(X_train, y_train, C=1.0)
    path = out_dir / "wine-cultivar-logreg.onnx"
    export_onnx(logreg, n, path)
    models.append(TrainedModel("wine-cultivar-logreg", model_type=ModelType.ONNX,
                               path=path.resolve(), inline=True, estimator=logreg,
                               quality_metrics=quality(logreg),
                               description=about("StandardScaler + LogisticRegression (ONNX)",
                                                 logreg), **common))

    mlp = fit_mlp(X_train, y_train, hidden=(16,), seed=SEED)
    path = out_dir / "wine-cultivar-mlp"
    if path.exists():
        shutil.rmtree(path)
    export_saved_model(mlp, n, path)
    models.append(TrainedModel("wine-cultivar-mlp", model_type=ModelType.TENSORFLOWSAVED,
                               path=path.resolve(), inline=False, estimator=mlp,
                               quality_metrics=quality(mlp),
                               description=about("MLP 13-16-3 (TensorFlow SavedModel)", mlp),
                               **common))

    small = fit_mlp(X_train, y_train, hidden=(8,), seed=SEED + 1)
    path = out_dir / "wine-cultivar-mlp-pb.pb"
    export_frozen_graph(small, n, path)
    models.append(TrainedModel("wine-cultivar-mlp-pb", model_type=ModelType.TENSORFLOW,
                               path=path.resolve(), inline=True, estimator=small,
                               quality_metrics=quality(small),
                               description=about("MLP 13-8-3 (frozen TensorFlow graph)", small),
                               **common))

    sparse = fit_logistic(X_train, y_train, C=0.2)
    path = out_dir / "wine-cultivar-pmml.pmml"
    description = about("LogisticRegression C=0.2, scaler folded in (PMML)", sparse)
    export_pmml(sparse, data.feature_names, data.class_labels, path,
                model_name="wine-cultivar-pmml", description=description)
    models.append(TrainedModel("wine-cultivar-pmml", model_type=ModelType.PMML,
                               path=path.resolve(), inline=True, estimator=sparse,
                               quality_metrics=quality(sparse),
                               description=description, **common))

    write_manifest(out_dir, models)
    write_rows(out_dir / TRAINING_CSV, data, X_train, y_train)
    write_rows(out_dir / HOLDOUT_CSV, data, X_test, y_test)
    return models


def write_rows(path: Path, data: DemoDataset, X, y) -> Path:
    """Rows of the demo data as CSV: the feature names, then ``label`` (the cultivar)."""
    import csv

    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow([*data.feature_names, "label"])
        for values, target in zip(X, y):
            writer.writerow([*(repr(float(v)) for v in values), data.class_labels[target]])
    return path


def write_manifest(out_dir: Path, models: list[TrainedModel]) -> Path:
    out_dir = Path(out_dir).resolve()
    entries = [{
        "name": m.name, "version": m.version, "modelType": ModelType.Name(m.model_type),
        "path": str(Path(m.path).resolve().relative_to(out_dir)), "inline": m.inline,
        "inputFeatures": list(m.input_features), "classLabels": list(m.class_labels),
        "description": m.description, "qualityMetrics": dict(m.quality_metrics),
    } for m in models]
    path = out_dir / MANIFEST
    path.write_text(json.dumps({"dataType": DEMO_DATA_TYPE, "models": entries}, indent=2) + "\n",
                    encoding="utf-8")
    return path


def load_manifest(out_dir: Path) -> list[TrainedModel]:
    """The models ``train_all`` wrote into ``out_dir``, paths made absolute."""
    out_dir = Path(out_dir).resolve()
    document = json.loads((out_dir / MANIFEST).read_text(encoding="utf-8"))
    return [TrainedModel(name=e["name"], version=e["version"],
                         model_type=ModelType.Value(e["modelType"]),
                         path=(out_dir / e["path"]).resolve(), inline=bool(e["inline"]),
                         input_features=tuple(e["inputFeatures"]),
                         class_labels=tuple(e["classLabels"]), description=e["description"],
                         quality_metrics=dict(e.get("qualityMetrics", {})))
            for e in document["models"]]


def manifest_entry(path: Path | str) -> TrainedModel | None:
    """The trained model at ``path`` when a manifest beside it lists it, else None."""
    path = Path(path).resolve()
    try:
        models = load_manifest(path.parent)
    except (OSError, ValueError, KeyError):
        return None
    return next((m for m in models if m.path == path), None)


def descriptor_for(model: TrainedModel, data_type: str = DEMO_DATA_TYPE) -> ModelDescriptor:
    """The ModelDescriptor that publishes ``model`` (inline bytes, or the directory's path)."""
    descriptor = ModelDescriptor(name=model.name, description=model.description,
                                 dataType=data_type, modeltype=model.model_type,
                                 version=model.version, inputFeatures=list(model.input_features),
                                 classLabels=list(model.class_labels),
                                 qualityMetrics=dict(model.quality_metrics))
    if model.inline:
        descriptor.data = Path(model.path).read_bytes()
    else:
        descriptor.location = str(Path(model.path).resolve())
    return descriptor


def demo_rows(seed: int = 7) -> list["Row"]:
    """The bundled demo dataset as records, shuffled (it is sorted by class), ids by row."""
    from modelserving.kafka.clients import Row

    names, X, _, _ = demo_dataset()
    order = np.random.default_rng(seed).permutation(len(X))
    return [Row(DEMO_DATA_TYPE, tuple(names), tuple(float(v) for v in X[i]), f"cultivar-{i}")
            for i in order]
