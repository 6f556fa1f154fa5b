"""PMML documents (inline bytes) through pypmml, which runs pmml4s in its own JVM via Py4J.

* A document with a DOCTYPE or ENTITY declaration is refused (``ModelRejected``) before any
  XML parser sees it: no external entities, no entity expansion.
* The model's inputs are its active input fields, by name, in the model's order.
* A batch is scored in few Py4J round trips: pmml4s's ``predict(String)`` takes a JSON table
  (``{"columns": [...], "data": [[...], ...]}``) and answers with one. Scoring record by record
  costs a round trip (0.4-1 ms) per record. The batch is cut into chunks whose answer stays
  under ~7 KB: Py4J's Java side writes its answer through an 8 KB buffer on a socket with
  Nagle's algorithm on, so an answer over 8 KB waits for the Python side's delayed ACK and
  every such call costs 40 ms more (measured: 128 records of a 6-class tree went from
  ~50 ms to ~8 ms per batch).
* Regression: ``value`` is the predicted value. Classification: ``label`` is the class pmml4s
  predicts, ``probabilities`` are its ``probability(X)`` outputs in the model's class order
  (NaN kept where pmml4s gives none), ``value`` is the label as a number when the class
  labels are numeric, else the class index. The descriptor's classLabels are ignored: a PMML
  document names its own classes.
"""
from __future__ import annotations

import json
import math
import re
from typing import Sequence

import numpy as np

from udfs.errors import ModelLoadError, ModelRejected
from udfs.runtimes.base import FeatureBatch, LoadRequest, ModelRuntime, Prediction
from udfs.runtimes.outputs import Interpretation, OutputReader, check_batch, describe_error, who

#: Answer size (characters) a chunk is cut to, below Py4J's 8 KB write buffer (see above).
ANSWER_BUDGET = 7000
#: Request size cap: well below one loopback TCP segment.
REQUEST_BUDGET = 48000
#: Worst-case characters of one JSON number written by Java (-2.2250738585072014E-308) + comma.
_NUMBER_CHARS = 25

#: A DTD or an entity declaration anywhere in the document (case-insensitive, spaces allowed).
_DTD = re.compile(r"<!\s*(DOCTYPE|ENTITY)", re.IGNORECASE)


def decode_document(data: bytes) -> str:
    """The PMML text of ``data``: UTF-8 (with or without BOM) or UTF-16 with a BOM."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return data.decode("utf-16")
    return data.decode("utf-8-sig")


def refuse_dtd(text: str, request: LoadRequest) -> None:
    """XXE guard: no DOCTYPE, no ENTITY; checked before the document reaches a parser."""
    match = _DTD.search(text)
    if match:
        raise ModelRejected(f"PMML document refused: it contains a {match.group(1).upper()} "
                            f"declaration (external entities are not allowed)", **who(request))


class PmmlRuntime(ModelRuntime):
    """One pypmml Model, scored through pmml4s's JSON batch interface."""

    def __init__(self, model, input_names: tuple[str, ...], function: str,
                 classes: tuple[str, ...], probability_fields: tuple[str | None, ...],
                 predicted_field: str | None, output_names: Sequence[str] = ("value",)):
        self._model = model
        self.input_names = input_names
        self.function = function
        self.classes = classes
        self._probability_fields = probability_fields
        self._predicted = predicted_field
        self._classifier = function == "classification"
        if self._classifier:
            interpretation = Interpretation(
                "classification", probabilities="probabilities" if classes else None,
                labels="label" if predicted_field else None)
        else:
            interpretation = Interpretation("regression", regression="value")
        self._reader = OutputReader(interpretation, model_classes=classes)
        self.chunk_rows = chunk_rows(input_names, output_names,
                                     max((len(c) for c in classes), default=0))

    @classmethod
    def load(cls, request: LoadRequest) -> "PmmlRuntime":
        if not request.data:
            raise ModelLoadError("a PMML model must come as inline bytes (data)", **who(request))
        try:
            text = decode_document(request.data)
        except UnicodeDecodeError as exc:
            raise ModelLoadError(f"PMML document is not UTF-8 or UTF-16 text ({exc})",
                                 **who(request)) from None
        refuse_dtd(text, request)
        from pypmml import Model, PMMLContext

        try:
            PMMLContext.getOrCreate()   # the JVM, started once per process
        except Exception as exc:
            raise ModelLoadError(f"the PMML runtime cannot start its JVM (is Java on PATH?): "
                                 f"{describe_error(exc)}", **who(request)) from None
        try:
            model = Model.fromString(text)
            model.setSupplementOutput(True)   # adds the predicted class to classifiers
            function = str(model.functionName)
            input_names = tuple(str(n) for n in model.inputNames)
            fields = [(str(f.name), str(f.feature), f.value) for f in model.outputFields]
            classes = tuple(_text(c) for c in model.classes) if function == "classification" \
                else ()
        except Exception as exc:
            raise ModelLoadError(f"not a loadable PMML document: {describe_error(exc)}",
                                 **who(request)) from None
        if function not in ("classification", "regression"):
            raise ModelLoadError(f"PMML {function} models are not served (only classification "
                                 f"and regression)", **who(request))
        if not input_names:
            raise ModelLoadError("the PMML model has no input fields", **who(request))
        predicted = next((name for name, feature, _ in fields if feature == "predictedValue"), None)
        if function == "regression" and predicted is None:
            raise ModelLoadError("the PMML regression model has no predicted value output",
                                 **who(request))
        by_class = {_text(value): name for name, feature, value in fields
                    if feature == "probability" and value is not None}
        probability_fields = tuple(by_class.get(c) for c in classes)
        if function == "classification" and predicted is None and not any(probability_fields):
            raise ModelLoadError("the PMML classification model outputs neither a predicted "
                                 "class nor class probabilities", **who(request))
        return cls(model, input_names, function, classes, probability_fields, predicted,
                   output_names=[name for name, _, _ in fields])

    def score(self, batch: FeatureBatch) -> Sequence[Prediction]:
        check_batch(batch, self.input_names)
        rows = len(batch)
        if rows == 0:
            return []
        values = batch.values.tolist()
        if not np.isfinite(batch.values).all():   # JSON has no NaN: a missing value is null
            values = [[v if math.isfinite(v) else None for v in row] for row in values]
        data: list = []
        column: dict[str, int] = {}
        for start in range(0, rows, self.chunk_rows):
            request = json.dumps({"columns": self.input_names,
                                  "data": values[start:start + self.chunk_rows]}, allow_nan=False)
            answer = json.loads(self._model.call("predict", request))
            column = {name: i for i, name in enumerate(answer["columns"])}
            data.extend(answer["data"])
        if len(data) != rows:
            raise RuntimeError(f"pmml4s answered {len(data)} rows for {rows}")
        outputs = {}
        if self._classifier:
            if self.classes:
                positions = [column.get(f) if f else None for f in self._probability_fields]
                outputs["probabilities"] = np.array(
                    [[_number(row[p]) if p is not None else math.nan for p in positions]
                     for row in data], dtype=np.float64).reshape(rows, len(positions))
            if self._predicted:
                at = column[self._predicted]
                outputs["label"] = np.array([_text(row[at]) for row in data], dtype=object)
        else:
            at = column[self._predicted]
            outputs["value"] = np.array([_number(row[at]) for row in data], dtype=np.float64)
        return self._reader.read(outputs, rows)

    def close(self) -> None:
        self._model = None   # pypmml detaches the JVM object when its wrapper is collected


def chunk_rows(input_names: Sequence[str], output_names: Sequence[str], max_label: int) -> int:
    """Rows per Py4J call so that the answer stays under ANSWER_BUDGET characters even when
    every number takes its longest form."""
    def header(names):   # {"columns":["a","b"],"data":[...]}
        return sum(len(json.dumps(n)) + 1 for n in names) + 30

    per_answer_row = len(output_names) * max(_NUMBER_CHARS, max_label + 3) + 3
    answer_rows = (ANSWER_BUDGET - header(output_names)) // per_answer_row
    request_rows = (REQUEST_BUDGET - header(input_names)) // (len(input_names) * _NUMBER_CHARS + 3)
    return max(1, min(answer_rows, request_rows))


def _number(value) -> float:
    return math.nan if value is None else float(value)


def _text(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)
