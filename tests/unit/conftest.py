"""Fixtures of the unit tests that want a real model without training every format."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest


@dataclass(frozen=True)
class OnnxWine:
    """The demo's ONNX classifier (same data, split and seed as ``train``) and its data."""

    dir: Path
    path: Path                      # the .onnx file
    pipeline: object                # the fitted scikit-learn pipeline it was made from
    feature_names: tuple[str, ...]
    class_labels: tuple[str, ...]
    X_train: np.ndarray
    X_test: np.ndarray
    y_train: np.ndarray
    y_test: np.ndarray
    training_csv: Path              # features + "label", as ``train`` writes them
    holdout_csv: Path


@pytest.fixture(scope="session")
def onnx_wine(tmp_path_factory) -> OnnxWine:
    from modelserving.demo.training import demo_dataset, export_onnx, fit_logistic, split, write_rows

    out = tmp_path_factory.mktemp("onnx-wine")
    data = demo_dataset()
    X_train, X_test, y_train, y_test = split(data)
    pipeline = fit_logistic(X_train, y_train)
    path = out / "wine-cultivar-logreg.onnx"
    export_onnx(pipeline, len(data.feature_names), path)
    return OnnxWine(out, path, pipeline, data.feature_names, data.class_labels, X_train, X_test,
                    y_train, y_test, write_rows(out / "training.csv", data, X_train, y_train),
                    write_rows(out / "holdout.csv", data, X_test, y_test))
