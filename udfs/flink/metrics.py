"""The serving metrics in Flink's metric system, as the web UI and the tests read them.

Names are part of the interface: ``modelserving.records_scored``, ``records_no_model``,
``dead_letters_records``, ``dead_letters_models``, ``internal_errors`` (failures of the job's
own code: records and models dead-lettered as INTERNAL_ERROR, and failures serving survived,
in statistics, metrics or batching), ``models_loaded``, ``scoring_micros``,
and per data type ``modelserving.datatype.<type>.*`` plus ``model_version`` and
``model_age_seconds``; for a data type served speculatively, per model of its set
``modelserving.datatype.<type>.model.<modelId>.`` ``answered``, ``wins``, ``timeouts``,
``failures`` and ``latency_ms`` (mean, batch start to its answer); for a data type with a
candidate model (canary or shadow) ``candidate_records``, ``candidate_failures``,
``candidate_agreement_milli`` and ``candidate_score_difference_micro``.

Metrics never raise into the join: a failure to count is logged (rate-limited, with its stack
trace) and counted in ``internal_errors``; a gauge that cannot be read reads -1 (PyFlink reads
the gauges at the end of every bundle, where an exception would fail the job).
"""
from __future__ import annotations

import logging
from typing import Callable

from udfs.failures import FailureLog
from udfs.serving import BAD_RECORD, INTERNAL_ERROR, NO_MODEL, SCORED, LoadedModel, now_ms

log = logging.getLogger("modelserving")


class ServingMetrics:
    """Counts under the operator's ``modelserving`` group, in total and per data type
    (``modelserving.datatype.<type>.*``), plus the current model's version and age.

    Counts are kept in Python and exposed as gauges, read when a bundle ends: PyFlink
    (2.2, process mode) drops counter and distribution updates made while a timer fires,
    and micro-batches are mostly scored from their flush timer."""

    def __init__(self, runtime_context, failures: FailureLog | None = None):
        self.failures = failures or FailureLog(log)
        self.group = runtime_context.get_metrics_group().add_group("modelserving")
        self.total = _Counters(self.group, failures=self.failures)
        self.bad_models = _Count(self.group, "dead_letters_models")
        self.models_loaded = _Count(self.group, "models_loaded")
        self._per_type: dict[str, _Counters] = {}
        self._per_member: dict[tuple[str, str], _MemberCounters] = {}

    def for_type(self, data_type: str) -> "_Counters":
        counters = self._per_type.get(data_type)
        if counters is None:
            counters = _Counters(self.group.add_group("datatype", data_type or "(none)"),
                                 per_type=True, failures=self.failures)
            self._per_type[data_type] = counters
        return counters

    def speculative(self, data_type: str, tally) -> None:
        """Add a speculative batch's figures per model (``SpeculativeModelStats``)."""
        for figures in tally:
            key = (data_type, figures.modelId)
            counters = self._per_member.get(key)
            if counters is None:
                counters = self._per_member[key] = _MemberCounters(
                    self.for_type(data_type).group.add_group("model", figures.modelId))
            counters.add(figures)

    def count(self, outcomes) -> None:
        """Count a batch's outcomes; never raises (metrics must not stop serving): a failure
        is logged and counted as an internal error."""
        try:
            self._count(outcomes)
        except Exception as exc:
            self.failures.failed("counting outcomes", exc)
            self.internal_error()

    def internal_error(self, data_type: str = "") -> None:
        """Count an internal error outside a record's outcome (a model's, or one serving
        survived); never raises."""
        try:
            self.total.internal.inc()
            if data_type:
                self.for_type(data_type).internal.inc()
        except Exception as exc:
            self.failures.failed("counting an internal error", exc)

    def _count(self, outcomes) -> None:
        kinds: dict[tuple[str, str], list] = {}
        for outcome in outcomes:
            kinds.setdefault((outcome.data_type, outcome.kind), []).append(outcome)
        for (data_type, kind), same in kinds.items():
            self.total.count(kind, same)
            self.for_type(data_type).count(kind, same)


class _Count:
    """A monotonic count, exposed as a gauge."""

    def __init__(self, group, name: str):
        self.value = 0
        group.gauge(name, lambda: self.value)   # reading an int cannot fail

    def inc(self, n: int = 1) -> None:
        self.value += n


class _MemberCounters:
    """One model of a speculative set."""

    def __init__(self, group):
        self.answered = _Count(group, "answered")
        self.wins = _Count(group, "wins")
        self.timeouts = _Count(group, "timeouts")
        self.failures = _Count(group, "failures")
        self._millis = 0.0
        group.gauge("latency_ms", lambda: int(self._millis / self.answered.value)
                    if self.answered.value else 0)   # cannot fail: a guarded division

    def add(self, figures) -> None:
        self.answered.inc(figures.answered)
        self.wins.inc(figures.wins)
        self.timeouts.inc(figures.timeouts)
        self.failures.inc(figures.failures)
        self._millis += figures.totalMillis


class _Counters:
    def __init__(self, group, per_type: bool = False, failures: FailureLog | None = None):
        failures = failures or FailureLog(log)
        self.group = group
        self.scored = _Count(group, "records_scored")
        self.no_model = _Count(group, "records_no_model")
        self.bad_records = _Count(group, "dead_letters_records")
        self.internal = _Count(group, "internal_errors")
        self._by_kind = {SCORED: self.scored, NO_MODEL: self.no_model, BAD_RECORD: self.bad_records,
                         INTERNAL_ERROR: self.internal}
        self._micros_total = 0.0
        group.gauge("scoring_micros", _safe(lambda: int(self._micros_total / self.scored.value)
                                            if self.scored.value else 0,   # mean model time
                                            "scoring_micros", failures))
        self._model: LoadedModel | None = None
        self.drift_flagged, self.drift_psi_max = 0, 0.0
        if per_type:
            group.gauge("model_version", _safe(
                lambda: _numeric(self.model.info.version) if self.model else -1,
                "model_version", failures))
            group.gauge("model_age_seconds", _safe(
                lambda: (now_ms() - self.model.since_ms) // 1000 if self.model else -1,
                "model_age_seconds", failures))
            # drift of the current model against its reference: flagged (0/1), and the
            # largest PSI of its features and outputs, in thousandths (gauges are integers)
            group.gauge("drift_flagged", lambda: self.drift_flagged)
            group.gauge("drift_psi_max_milli", lambda: int(self.drift_psi_max * 1000))
            # the candidate beside the model (canary or shadow, udfs.candidates): records it
            # answered or scored, failed, and its agreement with the model (thousandths, -1
            # before any record compared) and mean score difference (millionths)
            self.candidate_figures = (0, 0, -1, 0)
            for index, name in enumerate(("candidate_records", "candidate_failures",
                                          "candidate_agreement_milli",
                                          "candidate_score_difference_micro")):
                group.gauge(name, lambda index=index: self.candidate_figures[index])

    @property
    def model(self) -> LoadedModel | None:
        return self._model

    @model.setter
    def model(self, model: LoadedModel | None) -> None:
        """The data type's model now; another one starts with no drift."""
        if model is not self._model:
            self.drift_flagged, self.drift_psi_max = 0, 0.0
        self._model = model

    def drift(self, stats) -> None:
        """Take the drift figures of the statistics of this data type's model."""
        self.drift_flagged = int(stats.driftFlagged)
        self.drift_psi_max = max([d.psi for d in stats.drift] + [stats.outputPsi, 0.0])

    def candidate(self, stats) -> None:
        """Take the candidate figures of the statistics of this data type (none: zeros)."""
        if not stats.HasField("candidate"):
            self.candidate_figures = (0, 0, -1, 0)
            return
        c = stats.candidate
        self.candidate_figures = (
            c.records, c.failures, c.agreed * 1000 // c.compared if c.compared else -1,
            int(c.differenceSum / c.compared * 1e6) if c.compared else 0)

    def count(self, kind: str, outcomes) -> None:
        self._by_kind[kind].inc(len(outcomes))
        if kind == SCORED:
            self._micros_total += sum(outcome.micros for outcome in outcomes)


def _safe(read: Callable[[], int], name: str, failures: FailureLog) -> Callable[[], int]:
    """A gauge that never raises: -1 when ``read`` fails (logged, rate-limited)."""
    def gauge() -> int:
        try:
            return int(read())
        except Exception as exc:
            failures.failed(f"reading the gauge {name}", exc)
            return -1
    return gauge


def _numeric(version: str) -> int:
    """Gauges are numbers: a version like "3" or "v3" reads 3, anything else -1."""
    digits = version.lstrip("vV")
    return int(digits) if digits.isdigit() else -1
