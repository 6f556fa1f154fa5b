"""Turn what a model library returns into ``Prediction`` objects, the same way for every format.

A runtime hands over its raw outputs as ``(name, value)`` pairs, values already converted to
numpy arrays (or, for an ONNX ZipMap, a list of ``{class: probability}`` dicts). The rules:

* a float output of shape ``[N, k]`` with ``k > 1`` (or a ZipMap) holds class probabilities;
* an integer or string output of shape ``[N]`` / ``[N, 1]`` holds predicted class labels;
* a float output of shape ``[N]`` / ``[N, 1]`` holds a regression value (used only when the
  model has neither probabilities nor labels).

For a classifier, ``label`` is the predicted class label. It comes from the labels the
descriptor lists (``classLabels``, in model output order) when there are any; otherwise from
the model's own label output; otherwise from the model's own class names; otherwise it is the
class index as a string. ``value`` is the label as a number when every class label is numeric
("0", "5", "3.0"), else the class index. ``probabilities`` follow the class order and
``class_labels`` name them. NaN probabilities are passed through as the library gave them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from udfs.errors import ModelLoadError, OutputError, RecordError
from udfs.features import canonical_features
from udfs.runtimes.base import FeatureBatch, LoadRequest, Prediction

#: Output names that mark the probability tensor when a model has several float matrices.
_PROBABILITY_HINTS = ("prob", "proba", "softmax", "scores")


@dataclass(frozen=True)
class Interpretation:
    """Which raw output plays which role; decided once (at load) and reused per batch."""

    kind: str                       # "classification" or "regression"
    probabilities: str | None = None
    labels: str | None = None
    regression: str | None = None
    zipmap: bool = False


def _is_zipmap(value: Any) -> bool:
    return isinstance(value, list) and (not value or isinstance(value[0], dict))


def _column(array: np.ndarray) -> bool:
    return array.ndim == 1 or (array.ndim == 2 and array.shape[1] == 1)


def interpret(outputs: Sequence[tuple[str, Any]]) -> Interpretation:
    """Decide the role of each output from names, dtypes and shapes; raise OutputError."""
    probabilities: list[str] = []
    zipmaps: list[str] = []
    labels: list[str] = []
    regression: list[str] = []
    unusable: list[str] = []
    for name, value in outputs:
        if _is_zipmap(value):
            zipmaps.append(name)
            continue
        array = np.asarray(value)
        kind = array.dtype.kind
        if kind == "f" and array.ndim == 2 and array.shape[1] > 1:
            probabilities.append(name)
        elif kind == "f" and _column(array):
            regression.append(name)
        elif kind in "iuUSOb" and _column(array):
            labels.append(name)
        else:
            unusable.append(f"{name} {array.dtype} {list(array.shape)}")
    label = labels[0] if labels else None
    if probabilities:
        hinted = [n for n in probabilities if any(h in n.lower() for h in _PROBABILITY_HINTS)]
        return Interpretation("classification", probabilities=(hinted or probabilities)[0],
                              labels=label)
    if zipmaps:
        return Interpretation("classification", probabilities=zipmaps[0], labels=label,
                              zipmap=True)
    if label is not None:
        return Interpretation("classification", labels=label)
    if regression:
        return Interpretation("regression", regression=regression[0])
    described = ", ".join(unusable) or "none"
    raise OutputError("no output reads as class probabilities [N, k>1], class labels [N] or a "
                      f"regression value [N] / [N, 1] (outputs: {described})")


def _numeric(label: str) -> float | None:
    try:
        number = float(label)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    return str(value)


class OutputReader:
    """Reads one model's outputs into predictions; built once per loaded model."""

    def __init__(self, interpretation: Interpretation, *, class_labels: Sequence[str] = (),
                 model_classes: Sequence[Any] = ()):
        self.interpretation = interpretation
        self.requested_labels = tuple(str(c) for c in class_labels)
        self.model_classes = tuple(_text(c) for c in model_classes)

    @classmethod
    def for_outputs(cls, outputs: Sequence[tuple[str, Any]], *, class_labels: Sequence[str] = (),
                    model_classes: Sequence[Any] = ()) -> "OutputReader":
        """Build a reader from one sample of outputs and check the class count; OutputError."""
        reader = cls(interpret(outputs), class_labels=class_labels, model_classes=model_classes)
        sample = dict(outputs)
        it = reader.interpretation
        if it.probabilities is not None:
            if it.zipmap:
                rows = sample[it.probabilities]
                width = len(rows[0]) if rows else None
            else:
                width = np.asarray(sample[it.probabilities]).shape[1]
            for what, names in (("classLabels", reader.requested_labels),
                                ("the model's class names", reader.model_classes)):
                if names and width is not None and len(names) != width:
                    raise OutputError(f"{what} lists {len(names)} classes but the model outputs "
                                      f"{width} probabilities per record")
        return reader

    def read(self, outputs: Sequence[tuple[str, Any]] | dict, rows: int) -> list[Prediction]:
        values = outputs if isinstance(outputs, dict) else dict(outputs)
        it = self.interpretation
        if it.kind == "regression":
            column = np.asarray(values[it.regression], dtype=np.float64).reshape(rows)
            return [Prediction(value=v) for v in column.tolist()]
        model_labels = None
        if it.labels is not None:
            model_labels = [_text(v) for v in np.asarray(values[it.labels]).reshape(rows).tolist()]
        if it.probabilities is None:
            return self._labels_only(model_labels)
        names, matrix = self._probability_matrix(values[it.probabilities], rows)
        return self._classify(names, matrix, model_labels)

    # -- internals -------------------------------------------------------------------------

    def _probability_matrix(self, raw: Any, rows: int) -> tuple[tuple[str, ...], np.ndarray]:
        if self.interpretation.zipmap:
            keys = list(raw[0].keys()) if raw else []
            matrix = np.array([[row[k] for k in keys] for row in raw], dtype=np.float64)
            matrix = matrix.reshape(rows, len(keys))
            own = tuple(_text(k) for k in keys)
        else:
            matrix = np.asarray(raw, dtype=np.float64)
            own = ()
        names = (self.requested_labels or self.model_classes or own
                 or tuple(str(i) for i in range(matrix.shape[1])))
        return names, matrix

    def _classify(self, names: tuple[str, ...], matrix: np.ndarray,
                  model_labels: list[str] | None) -> list[Prediction]:
        numbers = [_numeric(n) for n in names]
        numeric = all(n is not None for n in numbers)
        # NaN never wins the argmax; a row of NaN only falls back to class 0.
        winners = np.where(np.isnan(matrix), -np.inf, matrix).argmax(axis=1).tolist()
        rows = map(tuple, matrix.tolist())
        if model_labels is None or self.requested_labels:
            labels = [names[i] for i in winners]
            values = [numbers[i] for i in winners] if numeric else [float(i) for i in winners]
        else:
            position = {n: i for i, n in enumerate(names)}
            labels = model_labels
            indices = [position.get(label, best) for label, best in zip(labels, winners)]
            if numeric:
                values = [_numeric(label) for label in labels]
                values = [numbers[i] if v is None else v for v, i in zip(values, indices)]
            else:
                values = [float(i) for i in indices]
        return [Prediction(value=v, label=label, probabilities=probs, class_labels=names)
                for v, label, probs in zip(values, labels, rows)]

    def _labels_only(self, model_labels: list[str]) -> list[Prediction]:
        names = self.requested_labels or self.model_classes
        position = {n: i for i, n in enumerate(names)}
        all_numeric = all(_numeric(n) is not None for n in names)
        predictions = []
        for label in model_labels:
            number = _numeric(label) if all_numeric else None
            if number is None:
                number = float(position[label]) if label in position else math.nan
            predictions.append(Prediction(value=number, label=label, class_labels=names))
        return predictions


# -- helpers shared by the runtimes' load() ---------------------------------------------------

def who(request: LoadRequest) -> dict:
    """Keyword arguments that make a ModelError name the model of ``request``."""
    return dict(name=request.name, version=request.version, data_type=request.data_type)


def describe_error(exc: BaseException, limit: int = 600) -> str:
    """One readable line from a library exception (TF and Py4J messages run over many lines)."""
    text = " ".join(str(exc).split()) or "no message"
    text = f"{type(exc).__name__}: {text}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def vector_input_names(request: LoadRequest, width: int | None) -> tuple[str, ...]:
    """Column names of a vector model (ONNX, TensorFlow): the descriptor's ``inputFeatures``,
    else the canonical order of its data type; checked against the model's input width."""
    names = tuple(request.input_features) or canonical_features(request.data_type)
    if not names:
        raise ModelLoadError(f"vector model for data type '{request.data_type}' needs "
                             f"inputFeatures (no canonical feature order is known for it)",
                             **who(request))
    if len(set(names)) != len(names):
        raise ModelLoadError(f"inputFeatures name a feature twice: {', '.join(names)}",
                             **who(request))
    if width is not None and width != len(names):
        raise ModelLoadError(f"the model takes {width} input features but {len(names)} are "
                             f"named ({', '.join(names)})", **who(request))
    return names


def check_batch(batch: FeatureBatch, input_names: tuple[str, ...]) -> None:
    """Refuse a batch whose columns are not the model's inputs (a wiring bug upstream)."""
    if batch.names != input_names:
        raise RecordError(f"batch columns ({', '.join(batch.names)}) are not the model inputs "
                          f"({', '.join(input_names)})")


#: Rows of every TensorFlow call. TensorFlow's CPU kernels take other summation orders for
#: other batch shapes (a row scored alone differs in the last bits from the same row in a
#: batch), so without one fixed shape a record's scores would depend on the micro-batch it
#: happens to land in. Zero rows pad the last call; for the small vector models served here
#: a call costs the same at 1 and at 64 rows.
FIXED_CALL_ROWS = 64


def in_fixed_calls(values: np.ndarray, call: Callable[[np.ndarray], Sequence[tuple[str, Any]]],
                   rows_per_call: int = FIXED_CALL_ROWS) -> list[tuple[str, Any]]:
    """``call`` on zero-padded chunks of exactly ``rows_per_call`` rows; the named outputs
    of the real rows, as if ``call`` had run once on ``values``. An output without a row
    per input row (a constant) is taken from the first call."""
    rows = values.shape[0]
    names: list[str] = []
    per_row: list[bool] = []
    parts: list[list[np.ndarray]] = []
    for start in range(0, rows, rows_per_call):
        real = min(rows_per_call, rows - start)
        padded = np.zeros((rows_per_call,) + values.shape[1:], dtype=values.dtype)
        padded[:real] = values[start:start + real]
        for i, (name, output) in enumerate(call(padded)):
            output = np.asarray(output)
            if start == 0:
                names.append(name)
                per_row.append(output.ndim > 0 and output.shape[0] == rows_per_call)
                parts.append([])
            if per_row[i]:
                parts[i].append(output[:real])
            elif start == 0:
                parts[i].append(output)
    return [(name, np.concatenate(chunks) if batched else chunks[0])
            for name, batched, chunks in zip(names, per_row, parts)]
