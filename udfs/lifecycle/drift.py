"""Behaviour monitoring: has the data, or what the model answers, moved away from its reference?

The measure is the population stability index of a histogram of live values against the
reference's histogram over the same bins (``Reference`` in protos/modelserving.proto):

    PSI = sum over bins i of (a_i - e_i) * ln(a_i / e_i)

where e_i is the reference's share of bin i and a_i the live share, each floored at
``EPSILON`` so an empty bin gives a large but finite term. PSI is 0 for identical shares
and grows with the shift; the usual rule of thumb reads < 0.1 as stable, 0.1-0.2 as a
moderate shift and > 0.2 as significant, hence ``DEFAULT_THRESHOLD``.

``DriftMonitor`` keeps counts per bin only (memory bounded by the reference, whatever the
traffic), can be merged across parallel instances and saved to and restored from state.
``reference_from_matrix`` builds the input histograms from training data (quantile edges),
``add_output_reference`` the output reference from a model's predictions (its validation
outputs, or its outputs on the training data).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import numpy as np

from protos import Reference
from udfs.runtimes.base import FeatureBatch, Prediction

#: Floor of a bin's share in the PSI formula: an empty bin is "very rare", not impossible.
EPSILON = 1e-4
#: PSI above which a shift is flagged: the usual "significant shift" rule of thumb.
DEFAULT_THRESHOLD = 0.2
#: Rows (or outputs) seen before anything is flagged: by chance alone, n records over k
#: bins give a PSI of about (k - 1) / n, 0.09 for 100 records in 10 bins.
DEFAULT_MIN_ROWS = 100
#: Bins of the histograms built from data.
DEFAULT_BINS = 10
#: Distinct labels counted beyond the reference's own; the rest share ``OTHER_LABEL``.
MAX_EXTRA_LABELS = 64
OTHER_LABEL = "(other)"


def psi(expected: Sequence[float], actual: Sequence[float], epsilon: float = EPSILON) -> float:
    """The population stability index of shares ``actual`` against shares ``expected``
    (same bins, same order; each sums to 1, or to 0 for no data)."""
    e = np.maximum(np.asarray(expected, dtype=np.float64), epsilon)
    a = np.maximum(np.asarray(actual, dtype=np.float64), epsilon)
    if e.shape != a.shape:
        raise ValueError(f"{a.size} live shares against {e.size} reference shares")
    return float(np.sum((a - e) * np.log(a / e)))


def bin_counts(edges: Sequence[float], values: Iterable[float]) -> np.ndarray:
    """How many of ``values`` fall in each of the ``len(edges) + 1`` bins (the Reference's
    convention: bin i holds edges[i-1] <= x < edges[i], the outer bins are open). Values
    that are not finite are left out."""
    values = np.asarray(values, dtype=np.float64).ravel()
    values = values[np.isfinite(values)]
    return np.bincount(np.searchsorted(np.asarray(edges, dtype=np.float64), values, side="right"),
                       minlength=len(edges) + 1)


def histogram(name: str, values: Sequence[float], bins: int = DEFAULT_BINS) -> Reference.Histogram:
    """A histogram of ``values`` with quantile edges: each bin holds about 1/bins of them
    (fewer bins when values repeat, since equal edges collapse)."""
    values = np.asarray(values, dtype=np.float64).ravel()
    values = values[np.isfinite(values)]
    if not values.size:
        raise ValueError(f"no finite values to build the histogram of {name or 'the scores'!r}")
    if bins < 1:
        raise ValueError(f"bins must be at least 1, not {bins}")
    edges = np.unique(np.quantile(values, np.arange(1, bins) / bins)) if bins > 1 else np.array([])
    counts = bin_counts(edges, values)
    return Reference.Histogram(name=name, edges=edges.tolist(),
                               proportions=(counts / counts.sum()).tolist())


def reference_from_matrix(names: Sequence[str], X, bins: int = DEFAULT_BINS,
                          source: str = "") -> Reference:
    """Input histograms of a data matrix (rows × ``names``), e.g. the training data."""
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2 or X.shape[1] != len(names):
        raise ValueError(f"a matrix of {len(names)} columns is needed, not shape {X.shape}")
    return Reference(features=[histogram(name, X[:, j], bins) for j, name in enumerate(names)],
                     rows=X.shape[0], source=source or f"{X.shape[0]} rows")


def add_output_reference(reference: Reference, predictions: Iterable[Prediction | None],
                         bins: int = DEFAULT_BINS) -> Reference:
    """Set ``reference``'s output reference from a model's predictions (None ones skipped):
    label shares when the model answers labels (a classifier), else a histogram of its
    scores. Returns ``reference``."""
    predictions = [p for p in predictions if p is not None]
    if not predictions:
        raise ValueError("no predictions to build the output reference from")
    reference.ClearField("labels")
    reference.ClearField("scores")
    reference.outputRows = len(predictions)
    if all(p.label for p in predictions):
        labels, counts = np.unique([p.label for p in predictions], return_counts=True)
        reference.labels.update({str(label): float(count / len(predictions))
                                 for label, count in zip(labels, counts)})
    else:
        reference.scores.CopyFrom(histogram("", [p.value for p in predictions], bins))
    return reference


@dataclass(frozen=True)
class DriftReport:
    """Drift measured so far: PSI per feature and of the output, and what crossed the bar."""

    rows: int
    outputs: int
    feature_psi: Mapping[str, float]
    output_psi: float | None
    threshold: float
    min_rows: int
    flagged_features: tuple[str, ...] = field(default=())
    output_flagged: bool = False

    @property
    def flagged(self) -> bool:
        return bool(self.flagged_features) or self.output_flagged

    def describe(self) -> str:
        """One line, for a log warning or a page."""
        parts = [f"input drift on {', '.join(f'{n!r} (PSI {self.feature_psi[n]:.3f})' for n in self.flagged_features)}"
                 ] if self.flagged_features else []
        if self.output_flagged:
            parts.append(f"output drift (PSI {self.output_psi:.3f})")
        what = "; ".join(parts) if parts else "no drift"
        return (f"{what} (threshold {self.threshold:g}; {self.rows} rows, {self.outputs} "
                f"outputs)")


class DriftMonitor:
    """Counts live feature values and outputs into the reference's bins; reads PSI from them.

    Not thread-safe (one per data type and subtask, like a runtime). Features the reference
    has no histogram for are ignored, and so is the output when it has no output reference.
    """

    def __init__(self, reference: Reference, threshold: float = DEFAULT_THRESHOLD,
                 min_rows: int = DEFAULT_MIN_ROWS):
        self.threshold = threshold
        self.min_rows = min_rows
        self._edges = {h.name: np.asarray(h.edges, dtype=np.float64) for h in reference.features}
        self._expected = {h.name: np.asarray(h.proportions, dtype=np.float64)
                          for h in reference.features}
        self._counts = {name: np.zeros(len(edges) + 1, dtype=np.int64)
                        for name, edges in self._edges.items()}
        self._label_expected = dict(reference.labels)
        self._score_edges = (np.asarray(reference.scores.edges, dtype=np.float64)
                             if reference.HasField("scores") and not self._label_expected else None)
        self._score_expected = np.asarray(reference.scores.proportions, dtype=np.float64)
        self._score_counts = (np.zeros(len(self._score_edges) + 1, dtype=np.int64)
                              if self._score_edges is not None else None)
        self._label_counts: dict[str, int] = {}
        self.rows = 0
        self.outputs = 0

    # -- counting ------------------------------------------------------------------------------

    def add_batch(self, batch: FeatureBatch) -> None:
        """Count a batch of live rows (as scored: ``batch.names`` are the model's inputs)."""
        if not len(batch):
            return
        for column, name in enumerate(batch.names):
            counts = self._counts.get(name)
            if counts is not None:
                counts += bin_counts(self._edges[name], batch.values[:, column])
        self.rows += len(batch)

    def add_predictions(self, predictions: Iterable[Prediction]) -> None:
        """Count a batch of the model's outputs."""
        predictions = list(predictions)
        if self._label_expected:
            for prediction in predictions:
                self._count_label(prediction.label, 1)
        elif self._score_counts is not None:
            self._score_counts += bin_counts(self._score_edges, [p.value for p in predictions])
        self.outputs += len(predictions)

    def merge(self, other: "DriftMonitor") -> None:
        """Add another monitor's counts (same reference), e.g. of another parallel instance."""
        self.restore(other.snapshot(), add=True)

    # -- reading -------------------------------------------------------------------------------

    def feature_psi(self) -> dict[str, float]:
        """PSI per feature of the reference (0.0 before any row)."""
        return {name: self._psi_of(self._expected[name], counts)
                for name, counts in self._counts.items()}

    def output_psi(self) -> float | None:
        """PSI of the outputs (label shares, or score bins); None without an output reference."""
        if self._label_expected:
            labels = sorted(set(self._label_expected) | set(self._label_counts))
            expected = np.asarray([self._label_expected.get(label, 0.0) for label in labels])
            counts = np.asarray([self._label_counts.get(label, 0) for label in labels])
            return self._psi_of(expected, counts)
        if self._score_counts is not None:
            return self._psi_of(self._score_expected, self._score_counts)
        return None

    def report(self) -> DriftReport:
        """PSI everywhere, and what is flagged: above the threshold, once min_rows were seen."""
        per_feature = self.feature_psi()
        output = self.output_psi()
        flagged = tuple(name for name, value in per_feature.items()
                        if self.rows >= self.min_rows and value > self.threshold)
        output_flagged = (output is not None and self.outputs >= self.min_rows
                          and output > self.threshold)
        return DriftReport(rows=self.rows, outputs=self.outputs, feature_psi=per_feature,
                           output_psi=output, threshold=self.threshold, min_rows=self.min_rows,
                           flagged_features=flagged, output_flagged=output_flagged)

    # -- state ---------------------------------------------------------------------------------

    def snapshot(self) -> dict:
        """The counts as plain JSON-able data (for Flink state or a metrics message)."""
        return {"rows": self.rows, "outputs": self.outputs,
                "features": {name: counts.tolist() for name, counts in self._counts.items()},
                "labels": dict(self._label_counts),
                "scores": None if self._score_counts is None else self._score_counts.tolist()}

    def restore(self, snapshot: Mapping, add: bool = False) -> None:
        """Take the counts of ``snapshot`` (of a monitor of the same reference); ``add``
        adds them to the current ones instead. Counts of bins this reference lacks are
        refused (``ValueError``): they belong to another reference."""
        features = snapshot.get("features", {})
        for name, counts in features.items():
            if name not in self._counts or len(counts) != len(self._counts[name]):
                raise ValueError(f"the snapshot's bins of {name!r} are not this reference's")
        scores = snapshot.get("scores")
        if scores is not None and (self._score_counts is None
                                   or len(scores) != len(self._score_counts)):
            raise ValueError("the snapshot's score bins are not this reference's")
        if not add:
            self.rows = self.outputs = 0
            self._label_counts = {}
            for counts in self._counts.values():
                counts[:] = 0
            if self._score_counts is not None:
                self._score_counts[:] = 0
        self.rows += int(snapshot.get("rows", 0))
        self.outputs += int(snapshot.get("outputs", 0))
        for name, counts in features.items():
            self._counts[name] += np.asarray(counts, dtype=np.int64)
        if scores is not None:
            self._score_counts += np.asarray(scores, dtype=np.int64)
        for label, count in snapshot.get("labels", {}).items():
            self._count_label(label, int(count))

    def _count_label(self, label: str, count: int) -> None:
        """Count an output label; labels beyond the bound share OTHER_LABEL."""
        if (label not in self._label_expected and label not in self._label_counts
                and len(self._label_counts) >= len(self._label_expected) + MAX_EXTRA_LABELS):
            label = OTHER_LABEL
        self._label_counts[label] = self._label_counts.get(label, 0) + count

    @staticmethod
    def _psi_of(expected: np.ndarray, counts: np.ndarray) -> float:
        total = counts.sum()
        return psi(expected, counts / total) if total else 0.0
