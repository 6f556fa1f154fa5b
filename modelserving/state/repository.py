"""What the repository topic says, as JSON-able answers: pure, no Kafka and no HTTP.

The jobs publish a ``RepositoryEntry`` per model instance and job to a compacted topic
(``Settings.repository_topic``) whenever they accept or refuse a model, or it stops
serving. :class:`RepositoryView` folds those records (``udfs.lifecycle.repository``) one by
one (``ingest``, as the state feed calls it) and answers ``listing()``, ``history()`` and
``show()``, which the state service serves and ``modelserving models`` prints. The topic
is compacted per model instance and job, so the view rebuilt from it after a restart is
the same: nothing here depends on having seen the records as they came.
"""
from __future__ import annotations

import threading
import time

from google.protobuf.json_format import MessageToDict
from google.protobuf.message import DecodeError

from protos import RepositoryEntry
from modelserving.state.view import iso
from udfs.candidates import ABORTED, PROMOTED
from udfs.lifecycle.repository import ACCEPTED, WITHDRAWN, Repository, entry_key
from udfs.runtimes import type_name

#: How an outcome is named to people.
OUTCOMES = {value: name for name, value in RepositoryEntry.Outcome.items()}
#: How the role "" (the data type's own model, beside which a candidate may run) is named.
PRIMARY = "primary"
#: How a candidate deployment can end besides being replaced by another candidate version.
CANDIDATE_ENDINGS = (PROMOTED, ABORTED, WITHDRAWN)


def role_label(role: str) -> str:
    """A deployment's role for people: "primary", or the candidate's ("canary 10%", "shadow")."""
    return role or PRIMARY


def ended_note(deployment: RepositoryEntry.Deployment) -> str:
    """Why a deployment ended, or why it was refused: "replaced by 2", "withdrawn"; for a
    candidate also "promoted" or "aborted" (a version named so is still a version when the
    deployment was the data type's model)."""
    by = deployment.retiredBy
    if by and (by in CANDIDATE_ENDINGS if deployment.role else by == WITHDRAWN):
        return by
    if by:
        return f"replaced by {by}"
    return deployment.reason


def deployment_json(deployment: RepositoryEntry.Deployment) -> dict:
    answer = {"job": deployment.job, "outcome": OUTCOMES.get(deployment.outcome, "UNKNOWN"),
              "role": deployment.role, "role_label": role_label(deployment.role),
              "deployed_ms": deployment.deployedMs or None, "deployed": iso(deployment.deployedMs),
              "retired_ms": deployment.retiredMs or None, "retired": iso(deployment.retiredMs),
              "retired_by": deployment.retiredBy or None, "reason": deployment.reason or None,
              "note": ended_note(deployment) or None, "validation": None}
    if deployment.HasField("validation"):
        answer["validation"] = MessageToDict(deployment.validation,
                                             always_print_fields_with_no_presence=True)
    return answer


def entry_json(entry: RepositoryEntry, serving_on: list[str] = (),
               candidate_on: list[str] = ()) -> dict:
    """One model instance: what was published, and every job's decisions about it.
    ``serving_on``: the jobs it serves on now as their model; ``candidate_on``: the jobs
    where it is the candidate (canary or shadow) now."""
    return {"key": entry_key(entry), "data_type": entry.dataType, "model_id": entry.modelId,
            "name": entry.name, "version": entry.version, "description": entry.description,
            "type": type_name(entry.modelType), "digest": entry.digest,
            "created_ms": entry.createdMs or None, "created": iso(entry.createdMs),
            "published_ms": entry.publishedMs or None, "published": iso(entry.publishedMs),
            "input_features": list(entry.inputFeatures), "class_labels": list(entry.classLabels),
            "quality_metrics": dict(sorted(entry.qualityMetrics.items())),
            "location": entry.location or None, "inline_bytes": entry.inlineBytes or None,
            "descriptor_id": entry.descriptorId, "descriptor_kept": bool(entry.descriptor),
            "has_validation": entry.hasValidation, "has_reference": entry.hasReference,
            "outcome": outcome_of(entry), "serving_on": sorted(serving_on),
            "candidate_on": sorted(candidate_on),
            "deployments": [deployment_json(d) for d in entry.deployments]}


def outcome_of(entry: RepositoryEntry) -> str:
    """One word for a version: SERVING somewhere (as a data type's model), else CANDIDATE
    somewhere (canary or shadow), RETIRED (served, stopped everywhere), the latest refusal
    (REFUSED, VALIDATION_FAILED), or PUBLISHED (no decision yet)."""
    if not entry.deployments:
        return "PUBLISHED"
    accepted = [d for d in entry.deployments if d.outcome == ACCEPTED]
    if any(not d.retiredMs and not d.role for d in accepted):
        return "SERVING"
    if any(not d.retiredMs for d in accepted):
        return "CANDIDATE"
    if accepted:
        return "RETIRED"
    return OUTCOMES.get(entry.deployments[-1].outcome, "UNKNOWN")


def candidates(repository: Repository, data_type: str) -> dict[str, tuple[RepositoryEntry, str]]:
    """Per job, the entry that is ``data_type``'s candidate there now and its role: its
    latest candidate deployment, unless that one ended."""
    latest: dict[str, tuple[int, RepositoryEntry, RepositoryEntry.Deployment]] = {}
    for entry in repository.history(data_type):
        for deployment in entry.deployments:
            if deployment.outcome != ACCEPTED or not deployment.role:
                continue
            known = latest.get(deployment.job)
            if known is None or deployment.deployedMs >= known[0]:
                latest[deployment.job] = (deployment.deployedMs, entry, deployment)
    return {job: (entry, deployment.role) for job, (_, entry, deployment) in sorted(latest.items())
            if not deployment.retiredMs}


class RepositoryView:
    """The repository folded from its topic's records; thread-safe (one thread ingests
    while others ask)."""

    def __init__(self):
        self._lock = threading.RLock()
        self._repository = Repository()
        self.messages = 0
        self.undecodable = 0
        self.last_message_ms: int | None = None

    def ingest(self, key, value: bytes | None) -> None:
        """Take one record of the topic; a tombstone (None) is skipped, since the repository
        forgets nothing, and an undecodable record is counted (``health()``)."""
        with self._lock:
            self.messages += 1
            self.last_message_ms = int(time.time() * 1000)
            try:
                entry = RepositoryEntry.FromString(value) if value else None
            except DecodeError:
                self.undecodable += 1
                return
            if entry is not None and entry.dataType:
                self._repository.add(entry)
            elif entry is not None:
                self.undecodable += 1

    def repository(self) -> Repository:
        """A copy of what was folded so far, to work on without the lock."""
        with self._lock:
            return Repository.fold(list(self._repository.entries.values()))

    def data_types(self) -> list[str]:
        with self._lock:
            return self._repository.data_types()

    def listing(self) -> dict:
        """Per data type: its latest version, how many versions, and which version serves
        on which job."""
        with self._lock:
            repository = self._repository
            data_types = {}
            for latest in repository.listing():
                serving = repository.serving(latest.dataType)
                candidate = candidates(repository, latest.dataType)
                data_types[latest.dataType] = {
                    "data_type": latest.dataType,
                    "versions": len(repository.history(latest.dataType)),
                    "latest": entry_json(latest, _jobs_serving(serving, latest),
                                         _jobs_candidate(candidate, latest)),
                    "serving": {job: {"version": e.version, "name": e.name, "model_id": e.modelId,
                                      "digest": e.digest} for job, e in serving.items()},
                    "candidates": {job: {"version": e.version, "name": e.name,
                                         "model_id": e.modelId, "digest": e.digest, "role": role}
                                   for job, (e, role) in candidate.items()}}
            return {"data_types": data_types, "count": len(data_types)}

    def history(self, data_type: str) -> dict | None:
        """Every version of ``data_type``, oldest first, with its decisions; None when the
        repository has none."""
        with self._lock:
            versions = self._repository.history(data_type)
            if not versions:
                return None
            serving = self._repository.serving(data_type)
            candidate = candidates(self._repository, data_type)
            return {"data_type": data_type,
                    "versions": [entry_json(e, _jobs_serving(serving, e), _jobs_candidate(candidate, e))
                                 for e in versions],
                    "serving": {job: e.version for job, e in serving.items()},
                    "candidates": {job: {"version": e.version, "role": role}
                                   for job, (e, role) in candidate.items()}}

    def show(self, data_type: str, version: str | None = None) -> dict | None:
        """One version (the latest without ``version``); None when there is no such one."""
        with self._lock:
            entry = self._repository.show(data_type, version)
            if entry is None:
                return None
            return entry_json(entry,
                              _jobs_serving(self._repository.serving(data_type), entry),
                              _jobs_candidate(candidates(self._repository, data_type), entry))

    def health(self) -> dict:
        with self._lock:
            return {"entries": len(self._repository.entries),
                    "data_types": len(self._repository.data_types()),
                    "messages": self.messages, "undecodable": self.undecodable,
                    "last_message_ms": self.last_message_ms}


def _jobs_serving(serving: dict[str, RepositoryEntry], entry: RepositoryEntry) -> list[str]:
    key = entry_key(entry)
    return [job for job, current in serving.items() if entry_key(current) == key]


def _jobs_candidate(candidate: dict[str, tuple[RepositoryEntry, str]],
                    entry: RepositoryEntry) -> list[str]:
    key = entry_key(entry)
    return [job for job, (current, _) in candidate.items() if entry_key(current) == key]


__all__ = ["PRIMARY", "RepositoryView", "candidates", "ended_note", "entry_json", "outcome_of",
           "role_label"]
