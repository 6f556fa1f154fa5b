"""What the state topic says, as JSON-able answers: pure, no Kafka and no HTTP.

The jobs publish their serving statistics as ``ModelStats`` messages to a compacted topic,
keyed by ``<job>/<dataType>`` (keyed job, part -1) or ``<job>/<dataType>/<part>`` (broadcast
job, one key per share of the spread records). :class:`ModelStateView` takes those records
one by one (``ingest``) and answers ``models()``, ``state()``, ``history()`` and ``health()``;
the feed (``feed.py``) and the HTTP app (``app.py``) are only its plumbing, so everything
it decides is testable without a broker.

Restarts: the current view is rebuilt exactly from the compacted topic, because every key
keeps its latest message. The history is best-effort across a restart of the service:
compaction keeps only the latest message per key, so models replaced before the service
started may be missing. Every history answer says from when it is complete
(``history_complete_since_ms``: the moment ingestion started).
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from google.protobuf.message import DecodeError

from protos import ModelStats, Rollout, SpeculativeSet
from udfs.lifecycle.routing import ShadowComparison
from udfs.runtimes import type_name
from udfs.statistics import KEYED_PART, stats_key

log = logging.getLogger(__name__)

DEFAULT_HISTORY_LIMIT = 10
#: History entries kept per (job, data type); older ones are forgotten.
HISTORY_KEPT = 100


def now_ms() -> int:
    return int(time.time() * 1000)


def iso(ms: int | None) -> str | None:
    """An epoch-millisecond time as ISO 8601 UTC text, None for none (0 means unset in protobuf)."""
    if not ms:
        return None
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).isoformat(timespec="milliseconds")


def model_label(name: str, version: str) -> str:
    """How a model is named to people: ``name vVERSION`` (just the name without a version)."""
    return f"{name} v{version}" if version else name


@dataclass
class _HistoryEntry:
    """One model that served a (job, data type), with what its keys last said about it."""
    job: str
    model_id: str
    name: str
    version: str
    model_type: int
    since_ms: int
    usage_by_key: dict[str, int] = field(default_factory=dict)
    last_seen_ms: int = 0

    def as_json(self) -> dict:
        return {"job": self.job, "model": model_label(self.name, self.version), "name": self.name,
                "version": self.version, "type": type_name(self.model_type), "model_id": self.model_id,
                "since_ms": self.since_ms, "since": iso(self.since_ms),
                "usage": sum(self.usage_by_key.values()), "last_seen_ms": self.last_seen_ms}


class ModelStateView:
    """Serving statistics of every job and data type, built from the state topic's records.

    Thread-safe: one thread may ingest while others query. Keys identify the publisher
    (``<job>/<dataType>`` or ``<job>/<dataType>/<part>``); the job, data type and part are read
    from the message itself and from the key only when the message leaves them empty.

    The current view is a function of the latest message per key, so rebuilding it from a
    compacted topic gives the same answer. The history is derived from the stream (a part
    switching to a new ``modelId`` starts or joins a history entry) and is therefore only
    complete from the moment ingestion started (``history_complete_since_ms``); before that,
    compaction may have removed the messages of replaced models.
    """

    def __init__(self, history_complete_since_ms: int | None = None):
        self._lock = threading.RLock()
        self._latest: dict[str, ModelStats] = {}
        self._history: dict[tuple[str, str], list[_HistoryEntry]] = {}
        self._entry_of_key: dict[str, _HistoryEntry] = {}
        self.history_complete_since_ms = (now_ms() if history_complete_since_ms is None
                                          else history_complete_since_ms)
        self.messages = 0
        self.tombstones = 0
        self.undecodable = 0
        self.last_message_ms: int | None = None

    # -- ingestion ------------------------------------------------------------------------

    def ingest(self, key: str | bytes | None, value: bytes | None) -> ModelStats | None:
        """Take one record of the state topic: a serialized ``ModelStats``, or None (tombstone)
        to forget that key. Undecodable records are counted (``health()``) and skipped."""
        if isinstance(key, bytes):
            key = key.decode("utf-8", errors="replace")
        with self._lock:
            self.messages += 1
            self.last_message_ms = now_ms()
            if value is None:
                self.tombstones += 1
                if key is not None:
                    self._latest.pop(key, None)
                    self._entry_of_key.pop(key, None)
                return None
            try:
                stats = ModelStats.FromString(value)
            except DecodeError as exc:
                self.undecodable += 1
                log.warning("skipping an undecodable state record (key %r): %s", key, exc)
                return None
            self._complete_from_key(stats, key)
            if not stats.dataType:
                self.undecodable += 1
                log.warning("skipping a state record without data type (key %r)", key)
                return None
            key = key or self._key_of(stats)
            self._latest[key] = stats
            self._record_history(key, stats)
            return stats

    @staticmethod
    def _key_of(stats: ModelStats) -> str:
        return stats_key(stats.job, stats.dataType, stats.part)

    @staticmethod
    def _complete_from_key(stats: ModelStats, key: str | None) -> None:
        if not key or (stats.job and stats.dataType):
            return
        pieces = key.split("/")
        if not stats.job and pieces:
            stats.job = pieces[0]
        if not stats.dataType and len(pieces) > 1:
            stats.dataType = pieces[1]
        if len(pieces) == 2 and stats.part == 0:
            stats.part = KEYED_PART

    def _record_history(self, key: str, stats: ModelStats) -> None:
        if not stats.hasModel or not stats.modelId:
            self._entry_of_key.pop(key, None)
            return
        entries = self._history.setdefault((stats.job, stats.dataType), [])
        entry = self._entry_of_key.get(key)
        if entry is None or entry.model_id != stats.modelId:
            entry = self._entry_for(entries, stats)
            self._entry_of_key[key] = entry
        entry.usage_by_key[key] = stats.usage
        entry.last_seen_ms = max(entry.last_seen_ms, stats.publishedMs or now_ms())
        if stats.sinceMs and (not entry.since_ms or stats.sinceMs < entry.since_ms):
            entry.since_ms = stats.sinceMs

    @staticmethod
    def _entry_for(entries: list[_HistoryEntry], stats: ModelStats) -> _HistoryEntry:
        """The entry a key switching to ``stats.modelId`` belongs to: the newest entry of that
        model, unless another model started serving after it and before this key's switch (then
        the model came back: a new entry)."""
        same = [e for e in entries if e.model_id == stats.modelId]
        if same:
            newest = max(same, key=lambda e: e.since_ms)
            later = [e for e in entries if e is not newest and e.since_ms > newest.since_ms]
            if all(e.since_ms >= stats.sinceMs for e in later):
                return newest
        entry = _HistoryEntry(job=stats.job, model_id=stats.modelId, name=stats.modelName,
                              version=stats.modelVersion, model_type=stats.modelType,
                              since_ms=stats.sinceMs)
        entries.append(entry)
        entries.sort(key=lambda e: e.since_ms)
        del entries[:-HISTORY_KEPT]
        return entry

    # -- queries --------------------------------------------------------------------------

    def data_types(self) -> list[str]:
        with self._lock:
            return sorted({s.dataType for s in self._latest.values()})

    def models(self) -> dict:
        """Every data type with, per job, its current model and statistics."""
        with self._lock:
            by_type: dict[str, dict[str, list[tuple[str, ModelStats]]]] = {}
            for key, stats in self._latest.items():
                by_type.setdefault(stats.dataType, {}).setdefault(stats.job, []).append((key, stats))
            return {"data_types": {dt: self._data_type_json(dt, jobs) for dt, jobs in sorted(by_type.items())},
                    "count": len(by_type), "as_of_ms": now_ms(),
                    "history_complete_since_ms": self.history_complete_since_ms}

    def state(self, data_type: str) -> dict | None:
        """One data type as in :meth:`models` (with ``data_type`` and ``jobs``), or None."""
        with self._lock:
            jobs: dict[str, list[tuple[str, ModelStats]]] = {}
            for key, stats in self._latest.items():
                if stats.dataType == data_type:
                    jobs.setdefault(stats.job, []).append((key, stats))
            if not jobs:
                return None
            return self._data_type_json(data_type, jobs)

    def history(self, data_type: str, limit: int = DEFAULT_HISTORY_LIMIT) -> dict | None:
        """The last ``limit`` models that served ``data_type`` (in any job), newest first, each
        with the last usage reported for it; None for a data type never seen. Complete only
        from ``history_complete_since_ms`` on (see the class docstring)."""
        with self._lock:
            entries = [e for (job, dt), es in self._history.items() if dt == data_type for e in es]
            if not entries and not any(s.dataType == data_type for s in self._latest.values()):
                return None
            entries.sort(key=lambda e: (e.since_ms, e.last_seen_ms), reverse=True)
            return {"data_type": data_type, "models": [e.as_json() for e in entries[:max(limit, 0)]],
                    "history_complete_since_ms": self.history_complete_since_ms,
                    "history_complete_since": iso(self.history_complete_since_ms),
                    "note": "complete from history_complete_since on; earlier models are only known "
                            "if their statistics survived the topic's compaction"}

    def health(self) -> dict:
        with self._lock:
            return {"keys": len(self._latest), "data_types": len({s.dataType for s in self._latest.values()}),
                    "messages": self.messages, "tombstones": self.tombstones,
                    "undecodable": self.undecodable, "last_message_ms": self.last_message_ms}

    # -- merging --------------------------------------------------------------------------

    def _data_type_json(self, data_type: str, jobs: dict[str, list[tuple[str, ModelStats]]]) -> dict:
        return {"data_type": data_type,
                "jobs": {job: self._job_json(job, data_type, parts) for job, parts in sorted(jobs.items())}}

    @staticmethod
    def _job_json(job: str, data_type: str, parts: list[tuple[str, ModelStats]]) -> dict:
        """Merge the parts of one (job, data type). The current model is the one of the most
        recent ``sinceMs``; usage and scoring times count the parts serving it (all of them
        unless there is jitter); records without model and dead letters count every part."""
        parts = sorted(parts, key=lambda kv: (kv[1].part, kv[0]))
        stats = [s for _, s in parts]
        with_model = [s for s in stats if s.hasModel]
        current = max(with_model, key=lambda s: (s.sinceMs, s.publishedMs), default=None)
        serving = [s for s in with_model if current is not None and s.modelId == current.modelId]
        usage = sum(s.usage for s in serving)
        scored = [s for s in serving if s.usage > 0]
        total_micros = sum(s.totalMicros for s in serving)
        answer: dict[str, Any] = {
            "job": job, "data_type": data_type, "parts": len(stats),
            "has_model": current is not None,
            "model": None,
            "stats": {
                "usage": usage,
                "mean_ms": round(total_micros / usage / 1000, 6) if usage else None,
                "min_ms": round(min(s.minMicros for s in scored) / 1000, 6) if scored else None,
                "max_ms": round(max(s.maxMicros for s in scored) / 1000, 6) if scored else None,
                "total_ms": round(total_micros / 1000, 6),
                "no_model": sum(s.noModel for s in stats),
                "dead_letters": sum(s.deadLetters for s in stats),
            },
            "published_ms": max((s.publishedMs for s in stats), default=0),
        }
        if current is not None:
            since_ms = min((s.sinceMs for s in serving if s.sinceMs), default=current.sinceMs)
            answer["model"] = {"name": current.modelName, "description": current.modelDescription,
                               "type": type_name(current.modelType), "version": current.modelVersion,
                               "id": current.modelId, "since_ms": since_ms, "since": iso(since_ms)}
        answer["speculative"] = _speculative_json(stats)
        answer["drift"] = _drift_json(serving)
        answer["candidate"] = _candidate_json(stats)
        serving_what = {(s.modelId if s.hasModel else "") for s in stats}
        answer["jitter"] = len(serving_what) > 1
        answer["instances"] = [
            {"part": s.part, "subtask": s.subtask,
             "model": model_label(s.modelName, s.modelVersion) if s.hasModel else None,
             "model_id": s.modelId if s.hasModel else None, "usage": s.usage,
             "since_ms": s.sinceMs or None, "published_ms": s.publishedMs or None}
            for s in stats]
        return answer


def _drift_json(serving: list[ModelStats]) -> dict | None:
    """The current model's drift against its reference, over the parts serving it: each
    part measures its own records, so a PSI here is the largest of the parts' (the worst
    share of the data), rows are summed; None when no part measured drift."""
    measured = [s for s in serving if s.driftRows]
    if not measured:
        return None
    features: dict[str, float] = {}
    flagged: set[str] = set()
    for stats in measured:
        for drift in stats.drift:
            features[drift.feature] = max(features.get(drift.feature, 0.0), drift.psi)
            if drift.flagged:
                flagged.add(drift.feature)
    output = max(s.outputPsi for s in measured)
    return {"flagged": any(s.driftFlagged for s in measured),
            "threshold": measured[0].driftThreshold, "rows": sum(s.driftRows for s in measured),
            "features": {name: round(value, 6) for name, value in sorted(features.items())},
            "flagged_features": sorted(flagged),
            "output_psi": round(output, 6) if output >= 0 else None,
            "output_flagged": output > measured[0].driftThreshold and any(
                s.driftFlagged for s in measured)}


def _candidate_json(stats: list[ModelStats]) -> dict | None:
    """The data type's candidate (canary or shadow) beside its model, and how it compares,
    over the parts that have it: the most recent candidate (``sinceMs``) is the data type's,
    its counts are summed over the parts holding that same candidate (``descriptorId``; a
    part still holding an older one during a switch is left out, as for the model's usage).
    Agreement and mean score difference come from the summed counts (``ShadowComparison``),
    not as a mean of the parts' rates. None when no part has a candidate."""
    with_candidate = [s.candidate for s in stats if s.HasField("candidate")]
    if not with_candidate:
        return None
    latest = max(with_candidate, key=lambda c: c.sinceMs)
    same = [c for c in with_candidate if c.descriptorId == latest.descriptorId
            and c.modelId == latest.modelId]
    comparison = ShadowComparison(compared=sum(c.compared for c in same),
                                  agreed=sum(c.agreed for c in same),
                                  difference_sum=sum(c.differenceSum for c in same),
                                  abs_difference_sum=sum(c.absDifferenceSum for c in same))
    records = sum(c.records for c in same)
    primary_records = sum(c.primaryRecords for c in same)
    canary = latest.mode == Rollout.CANARY
    # what the candidate's records are a share of: canary, every record of the data type (the
    # candidate's and the rest, the primary's); shadow, the records the primary answered
    of_records = records + primary_records if canary else primary_records
    since_ms = min((c.sinceMs for c in same if c.sinceMs), default=0)

    def rounded(value: float | None) -> float | None:
        return None if value is None else round(value, 6)

    return {"model": model_label(latest.modelName, latest.modelVersion),
            "name": latest.modelName, "version": latest.modelVersion,
            "model_id": latest.modelId, "descriptor_id": latest.descriptorId,
            "mode": "canary" if canary else "shadow",
            "share": latest.share if canary else None,
            "since_ms": since_ms or None, "since": iso(since_ms),
            "records": records, "failures": sum(c.failures for c in same),
            "primary_records": primary_records, "of_records": of_records,
            "record_share": rounded(records / of_records) if of_records else None,
            "compared": comparison.compared, "agreed": comparison.agreed,
            "agreement_rate": rounded(comparison.agreement_rate),
            "mean_score_difference": rounded(comparison.mean_score_difference),
            "mean_abs_score_difference": rounded(comparison.mean_abs_score_difference),
            "parts": len(same)}


def _speculative_json(stats: list[ModelStats]) -> dict | None:
    """The data type's speculative set (the most recently published one) and its models'
    figures summed over the parts running that same set; None when it has none."""
    with_set = [s for s in stats if s.HasField("speculative")]
    if not with_set:
        return None
    latest = max(with_set, key=lambda s: s.publishedMs).speculative
    running = [s for s in with_set if s.speculative == latest]
    models = []
    for index, model_id in enumerate(latest.models):
        figures = [s.speculativeModels[index] for s in running
                   if len(s.speculativeModels) > index and s.speculativeModels[index].modelId == model_id]
        answered = sum(f.answered for f in figures)
        named = next((f for f in figures if f.modelName), None)
        models.append({
            "model_id": model_id,
            "model": model_label(named.modelName, named.modelVersion) if named else None,
            "answered": answered, "wins": sum(f.wins for f in figures),
            "timeouts": sum(f.timeouts for f in figures),
            "failures": sum(f.failures for f in figures),
            "mean_ms": round(sum(f.totalMillis for f in figures) / answered, 3) if answered else None,
            "max_ms": round(max((f.maxMillis for f in figures), default=0.0), 3) if answered else None})
    return {"decider": SpeculativeSet.Decider.Name(latest.decider), "budget_ms": latest.budgetMs,
            "models": models}


__all__ = ["DEFAULT_HISTORY_LIMIT", "HISTORY_KEPT", "ModelStateView", "iso", "model_label", "now_ms"]
