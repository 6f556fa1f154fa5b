"""The validation gate: a new model scores its descriptor's validation rows before it takes over.

The rows are records as the data topic carries them, read by the serving path's own code
(``udfs.records.parse_record``, then ``feature_row`` in the runtime's input order, exact for
vector models), so a model passes here exactly when it would score those records live.

What must hold (``Validation`` in protos/modelserving.proto):

- every row can be scored (a model that cannot read its own validation records is wrong);
- rows with an ``expectedScore``: ``|score - expectedScore| <= tolerance`` for all of them
  (``tolerance`` unset: ``DEFAULT_TOLERANCE``, float32 models' rounding);
- rows with an ``expectedLabel``: the same label for every one of them, or, when
  ``minAccuracy`` is set, for at least that share of them.

The job calls ``validate`` on the runtime it has just loaded and refuses the model with
``raise_if_failed``; ``check_descriptor`` does the whole thing offline (``modelserving
validate``). ``validation_from_file`` builds the message from a CSV or JSON-lines file.
"""
from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from protos import DataRecord, ModelDescriptor, Validation, ValidationFigures
from udfs.errors import RecordError, ValidationFailed
from udfs.failures import describe as describe_failure
from udfs.models import VECTOR_TYPES, load_request
from udfs.records import feature_row, parse_record, to_batch
from udfs.runtimes import load_model
from udfs.runtimes.base import ModelRuntime, Prediction

#: Largest |score error| accepted when a validation sets no tolerance: float32 rounding.
DEFAULT_TOLERANCE = 1e-6
#: Rows scored per call of the model: bounded memory whatever the validation's size.
BATCH_ROWS = 256
#: Most rows ``validation_from_file`` puts in a descriptor, which the jobs keep in state.
MAX_ROWS = 1000
#: Columns (CSV) or keys (JSON lines) of a validation file that are not features.
ID_COLUMN, LABEL_COLUMN, SCORE_COLUMN = "id", "label", "score"


@dataclass(frozen=True)
class ValidationOutcome:
    """What the gate measured; ``reason`` says it in one line with the figures."""

    passed: bool
    reason: str
    rows: int
    unscored: int = 0
    score_rows: int = 0
    max_abs_error: float = 0.0
    tolerance: float = DEFAULT_TOLERANCE
    label_rows: int = 0
    mismatches: int = 0
    min_accuracy: float = 1.0
    #: The model's prediction per row (None where it could not score it), e.g. for the
    #: output reference of drift (``udfs.lifecycle.drift.add_output_reference``).
    predictions: tuple[Prediction | None, ...] = ()

    @property
    def accuracy(self) -> float:
        """Share of labelled rows with the expected label (1.0 when none are labelled)."""
        return 1.0 - self.mismatches / self.label_rows if self.label_rows else 1.0

    def figures(self) -> ValidationFigures:
        """The figures as the repository keeps them."""
        return ValidationFigures(passed=self.passed, rows=self.rows, unscored=self.unscored,
                                 scoreRows=self.score_rows, maxAbsError=self.max_abs_error,
                                 tolerance=self.tolerance, labelRows=self.label_rows,
                                 mismatches=self.mismatches, accuracy=self.accuracy,
                                 minAccuracy=self.min_accuracy)


def validate(validation: Validation, runtime: ModelRuntime, model_type: int) -> ValidationOutcome:
    """Score the rows of ``validation`` with a loaded model and say whether it passes. Never
    raises for what the model or the rows do: a model that fails is an outcome that failed."""
    tolerance = validation.tolerance if validation.HasField("tolerance") else DEFAULT_TOLERANCE
    min_accuracy = validation.minAccuracy if validation.HasField("minAccuracy") else 1.0
    rows = len(validation.rows)
    bars = dict(rows=rows, tolerance=tolerance, min_accuracy=min_accuracy)
    if not rows:
        return ValidationOutcome(False, "validation failed: it has no rows", **bars)
    if not (tolerance >= 0 and math.isfinite(tolerance)):
        return ValidationOutcome(False, f"validation failed: tolerance {tolerance} is not a "
                                        f"finite number >= 0", **bars)
    if not 0.0 <= min_accuracy <= 1.0:
        return ValidationOutcome(False, f"validation failed: minAccuracy {min_accuracy} lies "
                                        f"outside [0, 1]", **bars)
    try:
        predictions, refusals = _score_rows(validation.rows, runtime, model_type)
    except Exception as exc:   # the model failed on the batch: it does not pass
        return ValidationOutcome(False, f"validation failed: the model failed on the validation "
                                        f"rows: {describe_failure(exc)}", **bars)
    return _judge(validation, predictions, refusals, **bars)


def validate_descriptor(descriptor: ModelDescriptor,
                        runtime: ModelRuntime) -> ValidationOutcome | None:
    """The gate of a descriptor's freshly loaded model; None when it carries no validation."""
    if not descriptor.HasField("validation"):
        return None
    return validate(descriptor.validation, runtime, descriptor.modeltype)


def raise_if_failed(outcome: ValidationOutcome | None, descriptor: ModelDescriptor) -> None:
    """Refuse a model that missed its gate: ``ValidationFailed`` (a ``ModelRejected``, so a
    BAD_MODEL dead letter whose reason has the figures) naming the model."""
    if outcome is not None and not outcome.passed:
        raise ValidationFailed(outcome.reason, outcome=outcome, name=descriptor.name,
                               version=descriptor.version, data_type=descriptor.dataType)


def check_descriptor(descriptor: ModelDescriptor, model_dirs: Sequence[Path],
                     max_model_bytes: int) -> ValidationOutcome | None:
    """Load the descriptor's model under the serving policies, run its gate, close it: the
    job's check, offline. Raises ``ModelError`` when the model does not even load."""
    runtime = load_model(load_request(descriptor, model_dirs, max_model_bytes))
    try:
        return validate_descriptor(descriptor, runtime)
    finally:
        runtime.close()


def _score_rows(rows, runtime: ModelRuntime, model_type: int):
    """Per row its prediction (None when unscored), and the refusals: (row index, why)."""
    exact = model_type in VECTOR_TYPES
    names = runtime.input_names
    predictions: list[Prediction | None] = [None] * len(rows)
    refusals: list[tuple[int, str]] = []
    for start in range(0, len(rows), BATCH_ROWS):
        values, positions = [], []
        for index in range(start, min(start + BATCH_ROWS, len(rows))):
            try:
                values.append(feature_row(parse_record(rows[index].record), names, exact))
                positions.append(index)
            except RecordError as exc:
                refusals.append((index, str(exc)))
        if not values:
            continue
        scored = list(runtime.score(to_batch(values, names)))
        if len(scored) != len(values):
            raise RuntimeError(f"the model returned {len(scored)} predictions for "
                               f"{len(values)} rows")
        for index, prediction in zip(positions, scored):
            predictions[index] = prediction
    return predictions, refusals


def _judge(validation: Validation, predictions, refusals, *, rows: int, tolerance: float,
           min_accuracy: float) -> ValidationOutcome:
    score_rows = label_rows = mismatches = 0
    max_error, worst, first_mismatch = 0.0, None, None
    for index, (row, prediction) in enumerate(zip(validation.rows, predictions)):
        if prediction is None:
            continue
        if row.HasField("expectedScore"):
            score_rows += 1
            error = abs(prediction.value - row.expectedScore)
            error = math.inf if math.isnan(error) else error   # a NaN score misses anything
            if error > max_error or worst is None:
                max_error, worst = error, (index, prediction.value, row.expectedScore)
        if row.HasField("expectedLabel"):
            label_rows += 1
            if prediction.label != row.expectedLabel:
                mismatches += 1
                first_mismatch = first_mismatch or (index, prediction.label, row.expectedLabel)
    figures = dict(rows=rows, unscored=len(refusals), score_rows=score_rows,
                   max_abs_error=max_error, tolerance=tolerance, label_rows=label_rows,
                   mismatches=mismatches, min_accuracy=min_accuracy,
                   predictions=tuple(predictions))
    parts, passed = [], True
    if refusals:
        passed = False
        index, why = refusals[0]
        parts.append(f"{len(refusals)} row(s) could not be scored (first: {_row(validation, index)}: "
                     f"{why})")
    if score_rows:
        within = max_error <= tolerance
        passed &= within
        text = f"max |score error| {max_error:.6g} {'<=' if within else '>'} tolerance {tolerance:g}"
        if not within:
            index, got, expected = worst
            text += f" ({_row(validation, index)}: score {got:.6g}, expected {expected:.6g})"
        parts.append(text)
    if label_rows:
        accuracy = 1.0 - mismatches / label_rows
        if validation.HasField("minAccuracy"):
            enough = accuracy >= min_accuracy
            parts.append(f"accuracy {accuracy:.4f} {'>=' if enough else '<'} minimum "
                         f"{min_accuracy:g} ({label_rows - mismatches}/{label_rows} labels)")
        else:
            enough = mismatches == 0
            parts.append(f"{mismatches} label mismatch(es) in {label_rows} labelled rows")
        passed &= enough
        if not enough and first_mismatch:
            index, got, expected = first_mismatch
            parts[-1] += f" (first: {_row(validation, index)}: label {got!r}, expected {expected!r})"
    if not score_rows and not label_rows and not refusals:
        parts.append("no row has an expected output (scored only)")
    verdict = "passed" if passed else "failed"
    return ValidationOutcome(passed, f"validation {verdict} on {rows} rows: {'; '.join(parts)}",
                             **figures)


def _row(validation: Validation, index: int) -> str:
    """A row as a reason names it: its position, and its record's id when it has one."""
    try:
        record_id = DataRecord.FromString(validation.rows[index].record).id
    except Exception:   # the row is named by position alone
        record_id = ""
    return f"row {index}" + (f" (id {record_id!r})" if record_id else "")


# -- validation files -------------------------------------------------------------------------

@dataclass(frozen=True)
class FileRow:
    """A row of a validation or reference file."""

    record_id: str
    features: dict[str, float]
    expected_score: float | None = None
    expected_label: str | None = None


def read_rows(path: Path | str) -> list[FileRow]:
    """The rows of a file of records with (optionally) their expected outputs.

    - JSON lines (``.jsonl``, ``.ndjson``, ``.json``): one object a line,
      ``{"id": "r1", "features": {"alcohol": 13.2, ...}, "label": "1", "score": 0.0}``;
      ``id``, ``label`` and ``score`` are optional.
    - CSV (any other name; ``;`` or ``,``): a header row, then one record a row. Columns
      ``id``, ``label`` (expected label) and ``score`` (expected score) are what they say;
      every other column is a feature, by its header name. An empty label or score cell
      means no expectation for that row.

    Raises ``ValueError`` naming the line of what cannot be read."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() in (".jsonl", ".ndjson", ".json"):
        return [_json_row(line, number, path) for number, line in enumerate(text.splitlines(), 1)
                if line.strip()]
    delimiter = ";" if text.count(";") > text.count(",") else ","
    reader = csv.DictReader(text.splitlines(), delimiter=delimiter)
    if not reader.fieldnames:
        raise ValueError(f"{path} is empty: a header row is needed")
    special = {ID_COLUMN, LABEL_COLUMN, SCORE_COLUMN}
    columns = {name.strip().strip('"'): name for name in reader.fieldnames}
    features = [name for name in columns if name.lower() not in special]
    if not features:
        raise ValueError(f"{path} has no feature columns (header: {', '.join(columns)})")
    by_kind = {name.lower(): original for name, original in columns.items()
               if name.lower() in special}
    rows = []
    for number, line in enumerate(reader, 2):
        try:
            label = (line.get(by_kind.get(LABEL_COLUMN, ""), "") or "").strip()
            score = (line.get(by_kind.get(SCORE_COLUMN, ""), "") or "").strip()
            rows.append(FileRow(record_id=(line.get(by_kind.get(ID_COLUMN, ""), "") or "").strip()
                                or f"{path.stem}-{number - 1}",
                                features={n: float(line[columns[n]]) for n in features},
                                expected_score=float(score) if score else None,
                                expected_label=label or None))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path}, line {number}: {exc}") from None
    return rows


def _json_row(line: str, number: int, path: Path) -> FileRow:
    try:
        item = json.loads(line)
        score = item.get(SCORE_COLUMN)
        label = item.get(LABEL_COLUMN)
        features = {str(k): float(v) for k, v in item["features"].items()}
        if not features:
            raise ValueError("its features are empty")
        return FileRow(record_id=str(item.get(ID_COLUMN) or f"{path.stem}-{number}"),
                       features=features,
                       expected_score=None if score is None else float(score),
                       expected_label=None if label is None else str(label))
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise ValueError(f"{path}, line {number}: not a validation row "
                         f"({type(exc).__name__}: {exc})") from None


def validation_from_rows(rows: Sequence[FileRow], data_type: str, *,
                         tolerance: float | None = None, min_accuracy: float | None = None,
                         max_rows: int = MAX_ROWS) -> Validation:
    """A ``Validation`` of ``rows``, each a ``DataRecord`` of ``data_type``."""
    if len(rows) > max_rows:
        raise ValueError(f"{len(rows)} validation rows, over {max_rows}: the descriptor carries "
                         f"them and the jobs keep it in state; take a sample")
    validation = Validation()
    for row in rows:
        record = DataRecord(dataType=data_type, id=row.record_id, features=row.features)
        target = validation.rows.add(record=record.SerializeToString(deterministic=True))
        if row.expected_score is not None:
            target.expectedScore = row.expected_score
        if row.expected_label is not None:
            target.expectedLabel = row.expected_label
    if tolerance is not None:
        validation.tolerance = tolerance
    if min_accuracy is not None:
        validation.minAccuracy = min_accuracy
    return validation


def validation_from_file(path: Path | str, data_type: str, *, tolerance: float | None = None,
                         min_accuracy: float | None = None, max_rows: int = MAX_ROWS) -> Validation:
    """A ``Validation`` from a file ``read_rows`` reads (raises ``ValueError``)."""
    return validation_from_rows(read_rows(path), data_type, tolerance=tolerance,
                                min_accuracy=min_accuracy, max_rows=max_rows)
