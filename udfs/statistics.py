"""Serving statistics per data type: the tutorial's queryable model state, as ModelStats.

Pure functions over the ``ModelStats`` message, so both joins keep the same statistics in
their Flink state and tests need no Flink. A new model resets the per-model figures (usage,
scoring times, since); the per-data-type counters (no model, dead letters) carry on.
"""
from __future__ import annotations

import json
from collections import OrderedDict
from typing import Iterable

from protos import FeatureDrift, ModelDescriptor, ModelStats, Reference, SpeculativeModelStats
from udfs.lifecycle.drift import DEFAULT_THRESHOLD, DriftMonitor
from udfs.serving import NO_MODEL, SCORED, LoadedModel, Outcome, now_ms
from udfs.speculative import SpeculativePlan

KEYED_PART = -1
#: Drift figures of a model are kept for the models most recently asked about (per process).
_REFERENCES_KEPT = 64
_references: "OrderedDict[str, Reference | None]" = OrderedDict()
_DRIFT_FIELDS = ("drift", "outputPsi", "driftFlagged", "driftThreshold", "driftRows", "driftCounts")


def stats_key(job: str, data_type: str, part: int) -> str:
    """The compacted topic's key: one entry per data type (keyed job) or per part of it."""
    return f"{job}/{data_type}" if part == KEYED_PART else f"{job}/{data_type}/{part}"


def new_stats(job: str, data_type: str, part: int, subtask: int) -> ModelStats:
    return ModelStats(job=job, dataType=data_type, part=part, subtask=subtask)


def is_change(stats: ModelStats, model: LoadedModel | None) -> bool:
    if model is None:
        return stats.hasModel
    return not stats.hasModel or stats.modelId != model.info.model_id


def follow_model(stats: ModelStats, model: LoadedModel | None) -> bool:
    """Point the statistics at ``model``; True when that is a change worth publishing."""
    if not is_change(stats, model):
        return False
    for field in _DRIFT_FIELDS:   # a new model is measured against its own reference
        stats.ClearField(field)
    if model is None:
        for field in ("modelName", "modelDescription", "modelType", "modelVersion", "modelId",
                      "sinceMs", "usage", "totalMicros", "minMicros", "maxMicros"):
            stats.ClearField(field)
        stats.hasModel = False
        return True
    info = model.info
    stats.hasModel = True
    stats.modelName, stats.modelDescription = info.name, info.description
    stats.modelType, stats.modelVersion, stats.modelId = info.model_type, info.version, info.model_id
    stats.sinceMs = model.since_ms
    stats.usage, stats.totalMicros, stats.minMicros, stats.maxMicros = 0, 0.0, 0.0, 0.0
    return True


def count(stats: ModelStats, outcomes: Iterable[Outcome]) -> None:
    for outcome in outcomes:
        if outcome.kind == SCORED:
            micros = outcome.micros
            stats.minMicros = micros if stats.usage == 0 else min(stats.minMicros, micros)
            stats.maxMicros = max(stats.maxMicros, micros)
            stats.usage += 1
            stats.totalMicros += micros
        elif outcome.kind == NO_MODEL:
            stats.noModel += 1
        elif outcome.is_dead_letter:
            stats.deadLetters += 1


def follow_set(stats: ModelStats, plan: SpeculativePlan | None) -> bool:
    """Point the speculative figures at ``plan`` (None: none); True when that is a change.
    A new set starts its models' figures from zero."""
    if plan is None:
        if not stats.HasField("speculative"):
            return False
        stats.ClearField("speculative")
        del stats.speculativeModels[:]
        return True
    current = stats.speculative
    if (stats.HasField("speculative") and tuple(current.models) == plan.models
            and current.budgetMs == plan.budget_ms and current.decider == plan.decider):
        return False
    current.Clear()
    current.models.extend(plan.models)
    current.budgetMs, current.decider = plan.budget_ms, plan.decider
    del stats.speculativeModels[:]
    stats.speculativeModels.extend(SpeculativeModelStats(modelId=model) for model in plan.models)
    return True


def count_speculative(stats: ModelStats, tally: Iterable[SpeculativeModelStats],
                      outcomes: Iterable[Outcome]) -> None:
    """Add one speculative batch: its models' figures (matched by model id) and its dead
    letters; the data type's own model's usage is not touched."""
    models = {figures.modelId: figures for figures in stats.speculativeModels}
    for batch in tally:
        figures = models.get(batch.modelId)
        if figures is None:
            continue
        if batch.modelName:
            figures.modelName, figures.modelVersion = batch.modelName, batch.modelVersion
        figures.answered += batch.answered
        figures.wins += batch.wins
        figures.timeouts += batch.timeouts
        figures.failures += batch.failures
        figures.totalMillis += batch.totalMillis
        figures.maxMillis = max(figures.maxMillis, batch.maxMillis)
    count(stats, [outcome for outcome in outcomes if outcome.kind != SCORED])


def follow_candidate(stats: ModelStats, candidacy, model: LoadedModel | None) -> bool:
    """Point the candidate figures at ``candidacy`` (``udfs.candidates.Candidacy``, None:
    no candidate) and its loaded ``model`` (None: it could not be loaded); True when that is
    a change. A new candidate starts from zero."""
    if candidacy is None:
        if not stats.HasField("candidate"):
            return False
        stats.ClearField("candidate")
        return True
    current = stats.candidate
    if stats.HasField("candidate") and current.descriptorId == candidacy.model_id:
        return False
    current.Clear()
    current.descriptorId, current.mode = candidacy.model_id, candidacy.mode
    current.share, current.sinceMs = candidacy.share, candidacy.since_ms
    if model is not None:
        current.modelId, current.modelName = model.info.declared_id, model.info.name
        current.modelVersion = model.info.version
    return True


def count_candidate(stats: ModelStats, figures, primary_records: int) -> None:
    """Add one batch served beside the candidate (``udfs.candidates.BesideFigures``) and the
    number of records the primary answered in it."""
    candidate = stats.candidate
    comparison = figures.comparison
    candidate.records += figures.records
    candidate.failures += figures.failures
    candidate.compared += comparison.compared
    candidate.agreed += comparison.agreed
    candidate.differenceSum += comparison.difference_sum
    candidate.absDifferenceSum += comparison.abs_difference_sum
    candidate.primaryRecords += primary_records


def reference_of(model: LoadedModel | None) -> Reference | None:
    """The reference distribution published with ``model`` (None: none), read from its
    descriptor once per model."""
    if model is None:
        return None
    key = model.info.model_id
    if key in _references:
        _references.move_to_end(key)
        return _references[key]
    descriptor = ModelDescriptor.FromString(model.raw)
    reference = descriptor.reference if descriptor.HasField("reference") else None
    _references[key] = reference
    while len(_references) > _REFERENCES_KEPT:
        _references.popitem(last=False)
    return reference


def count_drift(stats: ModelStats, reference: Reference, observed,
                threshold: float = DEFAULT_THRESHOLD) -> bool:
    """Add scored batches (``(FeatureBatch, predictions)`` pairs) to the drift counts of the
    statistics' model and refresh its figures; True when this made the model drifted."""
    monitor = DriftMonitor(reference, threshold=threshold)
    if stats.driftCounts:
        monitor.restore(json.loads(stats.driftCounts))
    for batch, predictions in observed:
        monitor.add_batch(batch)
        monitor.add_predictions(predictions)
    report = monitor.report()
    was_flagged = stats.driftFlagged
    del stats.drift[:]
    stats.drift.extend(FeatureDrift(feature=name, psi=value,
                                    flagged=name in report.flagged_features)
                       for name, value in report.feature_psi.items())
    stats.outputPsi = -1.0 if report.output_psi is None else report.output_psi
    stats.driftFlagged = report.flagged
    stats.driftThreshold, stats.driftRows = threshold, report.rows
    stats.driftCounts = json.dumps(monitor.snapshot(), separators=(",", ":"))
    return report.flagged and not was_flagged


def drift_line(stats: ModelStats) -> str:
    """The drift of the statistics' model, in one line (a log warning, a page)."""
    flagged = [f"{d.feature} (PSI {d.psi:.3f})" for d in stats.drift if d.flagged]
    parts = [f"input drift on {', '.join(flagged)}"] if flagged else []
    if stats.outputPsi > stats.driftThreshold:
        parts.append(f"output drift (PSI {stats.outputPsi:.3f})")
    return (f"{'; '.join(parts) or 'no drift'} (threshold {stats.driftThreshold:g}, "
            f"{stats.driftRows} records)")


def stamped(stats: ModelStats, subtask: int) -> bytes:
    stats.subtask = subtask
    stats.publishedMs = now_ms()
    return stats.SerializeToString()
