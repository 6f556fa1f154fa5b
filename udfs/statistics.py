"""Serving statistics per data type: the tutorial's queryable model state, as ModelStats.

Pure functions over the ``ModelStats`` message, so both joins keep the same statistics in
their Flink state and tests need no Flink. A new model resets the per-model figures (usage,
scoring times, since); the per-data-type counters (no model, dead letters) carry on.
"""
from __future__ import annotations

from typing import Iterable

from protos import ModelStats
from udfs.serving import NO_MODEL, SCORED, LoadedModel, Outcome, now_ms

KEYED_PART = -1


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


def stamped(stats: ModelStats, subtask: int) -> bytes:
    stats.subtask = subtask
    stats.publishedMs = now_ms()
    return stats.SerializeToString()
