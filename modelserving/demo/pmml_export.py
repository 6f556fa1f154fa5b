"""A small PMML exporter for linear classifiers (multinomial logistic regression).

It writes a PMML 4.4 ``RegressionModel`` with ``functionName="classification"`` and
``normalizationMethod="softmax"``: one ``RegressionTable`` per class, ``p_j = exp(y_j) /
sum_k exp(y_k)`` with ``y_j = intercept_j + sum_i coefficient_ji * x_i`` -- exactly what
scikit-learn's multinomial ``LogisticRegression.predict_proba`` computes. A ``StandardScaler``
in front is folded into the coefficients, so the document reads raw feature values. The
document has no DOCTYPE (the serving side refuses one).
"""
from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import Sequence

import numpy as np

PMML_NAMESPACE = "http://www.dmg.org/PMML-4_4"
PMML_VERSION = "4.4"


def fold_scaler(coefficients: np.ndarray, intercepts: np.ndarray, mean: np.ndarray,
                scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rewrite ``w . ((x - mean) / scale) + b`` as ``w' . x + b'`` (per class row of ``w``)."""
    coefficients = np.atleast_2d(np.asarray(coefficients, dtype=np.float64))
    scale = np.asarray(scale, dtype=np.float64)
    mean = np.asarray(mean, dtype=np.float64)
    folded = coefficients / scale
    return folded, np.asarray(intercepts, dtype=np.float64) - folded @ mean


def _number(value: float) -> str:
    return repr(float(value))   # shortest text that reads back as the same double


def softmax_classifier_pmml(*, feature_names: Sequence[str], class_labels: Sequence[str],
                            coefficients: np.ndarray, intercepts: np.ndarray,
                            target: str = "class", model_name: str = "",
                            description: str = "") -> str:
    """A PMML document for a linear softmax classifier.

    ``coefficients`` has one row per class (``len(class_labels)`` x ``len(feature_names)``);
    a binary model's single row (scikit-learn's shape for two classes) becomes a zero table for
    the first class and the row for the second, which is the same logistic model.
    """
    coefficients = np.atleast_2d(np.asarray(coefficients, dtype=np.float64))
    intercepts = np.atleast_1d(np.asarray(intercepts, dtype=np.float64))
    labels = [str(c) for c in class_labels]
    if len(labels) == 2 and coefficients.shape[0] == 1:
        coefficients = np.vstack([np.zeros_like(coefficients), coefficients])
        intercepts = np.concatenate([[0.0], intercepts])
    if coefficients.shape != (len(labels), len(feature_names)) or len(intercepts) != len(labels):
        raise ValueError(f"coefficients {coefficients.shape} / intercepts {intercepts.shape} do not "
                         f"match {len(labels)} classes x {len(feature_names)} features")
    if target in feature_names:
        raise ValueError(f"target name {target!r} is also a feature name")

    ET.register_namespace("", PMML_NAMESPACE)
    q = lambda tag: f"{{{PMML_NAMESPACE}}}{tag}"  # noqa: E731 - qualified tag names
    pmml = ET.Element(q("PMML"), version=PMML_VERSION)
    header = ET.SubElement(pmml, q("Header"), description=description)
    ET.SubElement(header, q("Application"), name="flink-modelserving pmml_export", version="1")

    dictionary = ET.SubElement(pmml, q("DataDictionary"),
                               numberOfFields=str(len(feature_names) + 1))
    for name in feature_names:
        ET.SubElement(dictionary, q("DataField"), name=name, optype="continuous",
                      dataType="double")
    target_field = ET.SubElement(dictionary, q("DataField"), name=target, optype="categorical",
                                 dataType="string")
    for label in labels:
        ET.SubElement(target_field, q("Value"), value=label)

    model = ET.SubElement(pmml, q("RegressionModel"), functionName="classification",
                          normalizationMethod="softmax", algorithmName="LogisticRegression",
                          **({"modelName": model_name} if model_name else {}))
    schema = ET.SubElement(model, q("MiningSchema"))
    ET.SubElement(schema, q("MiningField"), name=target, usageType="target")
    for name in feature_names:
        ET.SubElement(schema, q("MiningField"), name=name, usageType="active")
    output = ET.SubElement(model, q("Output"))
    for label in labels:
        ET.SubElement(output, q("OutputField"), name=f"probability({label})",
                      optype="continuous", dataType="double", feature="probability", value=label)
    ET.SubElement(output, q("OutputField"), name=f"predicted_{target}", optype="categorical",
                  dataType="string", feature="predictedValue")
    for label, row, intercept in zip(labels, coefficients, intercepts):
        table = ET.SubElement(model, q("RegressionTable"), intercept=_number(intercept),
                              targetCategory=label)
        for name, coefficient in zip(feature_names, row):
            ET.SubElement(table, q("NumericPredictor"), name=name, exponent="1",
                          coefficient=_number(coefficient))
    ET.indent(pmml)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(pmml, encoding="unicode") + "\n"


def logistic_regression_pmml(classifier, *, feature_names: Sequence[str],
                             class_labels: Sequence[str] | None = None, scaler=None,
                             target: str = "class", model_name: str = "",
                             description: str = "") -> str:
    """PMML for a fitted scikit-learn ``LogisticRegression`` (multinomial, or binary), with an
    optional fitted ``StandardScaler`` in front folded into the coefficients."""
    coefficients, intercepts = classifier.coef_, classifier.intercept_
    if scaler is not None:
        mean = scaler.mean_ if scaler.with_mean else np.zeros(len(feature_names))
        scale = scaler.scale_ if scaler.with_std else np.ones(len(feature_names))
        coefficients, intercepts = fold_scaler(coefficients, intercepts, mean, scale)
    labels = class_labels if class_labels is not None else [str(c) for c in classifier.classes_]
    return softmax_classifier_pmml(feature_names=feature_names, class_labels=labels,
                                   coefficients=coefficients, intercepts=intercepts,
                                   target=target, model_name=model_name, description=description)
