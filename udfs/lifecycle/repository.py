"""The model repository: one ``RepositoryEntry`` per model instance, and views folded from them.

An entry says what was published (data type, id, name, version, digest, features, labels,
quality metrics, where the model is, the descriptor itself when small) and what each job
did with it (``Deployment``: accepted and when it served, or refused and why). Every
function here is pure: it returns a new entry and never touches its arguments.

On the topic: a job publishes the entry with its own deployments under
``topic_key(entry, job)``, so two jobs never overwrite each other's records in the
compacted topic; ``Repository.fold`` merges what it reads by ``entry_key`` (the model
instance, "<dataType>/<modelId>/<version>"), deployments of every job together.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

from protos import ModelDescriptor, RepositoryEntry, ValidationFigures
from udfs.lifecycle.digest import changed_reason
from udfs.models import model_id as descriptor_id

ACCEPTED = RepositoryEntry.ACCEPTED
REFUSED = RepositoryEntry.REFUSED
VALIDATION_FAILED = RepositoryEntry.VALIDATION_FAILED
#: Largest descriptor an entry keeps for rollback (inline models beyond it cannot be rolled
#: back to from the repository: publish them by location).
MAX_KEPT_DESCRIPTOR_BYTES = 1024 * 1024
#: Deployments an entry keeps, the latest ones: bounded however often a model comes back.
MAX_DEPLOYMENTS = 32
#: ``retiredBy`` of a model whose data type was withdrawn.
WITHDRAWN = "withdrawn"


class RollbackError(LookupError):
    """No entry to roll back to: the message says why."""


def entry_key(entry: RepositoryEntry) -> str:
    """"<dataType>/<modelId>/<version>": a model instance. Without a version, the digest
    (or the descriptor's id) stands in, so unversioned models do not overwrite each other."""
    version = entry.version or (f"sha256:{entry.digest[:16]}" if entry.digest
                                else f"id:{entry.descriptorId}")
    return f"{entry.dataType}/{entry.modelId}/{version}"


def topic_key(entry: RepositoryEntry, job: str) -> str:
    """The key a job publishes its view of ``entry`` under (see the module's docstring)."""
    return f"{entry_key(entry)}@{job}"


def entry_from_descriptor(descriptor: ModelDescriptor, raw: bytes | None = None, digest: str = "",
                          max_descriptor_bytes: int = MAX_KEPT_DESCRIPTOR_BYTES) -> RepositoryEntry:
    """The entry of a published descriptor (``raw``: its bytes as published, when at hand;
    ``digest``: ``udfs.lifecycle.digest.model_digest`` of it). No deployment yet."""
    raw = descriptor.SerializeToString() if raw is None else raw
    content = descriptor.WhichOneof("MessageContent")
    entry = RepositoryEntry(
        dataType=descriptor.dataType, modelId=descriptor.modelId, name=descriptor.name,
        version=descriptor.version, description=descriptor.description,
        modelType=descriptor.modeltype, digest=digest, createdMs=descriptor.publishedMs,
        publishedMs=descriptor.publishedMs, inputFeatures=descriptor.inputFeatures,
        classLabels=descriptor.classLabels, qualityMetrics=dict(descriptor.qualityMetrics),
        location=(descriptor.location if content == "location"
                  else descriptor.server.url if content == "server" else ""),
        inlineBytes=len(descriptor.data) if content == "data" else 0,
        descriptorId=descriptor_id(raw), hasValidation=descriptor.HasField("validation"),
        hasReference=descriptor.HasField("reference"))
    if len(raw) <= max_descriptor_bytes:
        entry.descriptor = raw
    return entry


def record_deployment(entry: RepositoryEntry, job: str, outcome: int, at_ms: int, reason: str = "",
                      figures: ValidationFigures | None = None, role: str = "") -> RepositoryEntry:
    """``entry`` with a new decision of ``job``: ACCEPTED (it serves from ``at_ms``; ``role``
    says as what when not as the data type's model, e.g. "canary 10%"), REFUSED or
    VALIDATION_FAILED (``reason``; ``figures`` of the gate when it had one)."""
    if outcome not in (ACCEPTED, REFUSED, VALIDATION_FAILED):
        raise ValueError(f"not a deployment outcome: {outcome}")
    updated = _copy(entry)
    deployment = updated.deployments.add(job=job, outcome=outcome, reason=reason, deployedMs=at_ms,
                                         role=role)
    if figures is not None:
        deployment.validation.CopyFrom(figures)
    _bound(updated)
    return updated


def record_retirement(entry: RepositoryEntry, job: str, at_ms: int,
                      retired_by: str = "", candidate: bool = False) -> RepositoryEntry:
    """``entry`` with its serving on ``job`` ended at ``at_ms`` (replaced by version
    ``retired_by``, or ``WITHDRAWN``): as the data type's model, or with ``candidate`` as its
    candidate (a deployment with a role); unchanged when it was not serving so there."""
    updated = _copy(entry)
    for deployment in reversed(updated.deployments):
        if (deployment.job == job and deployment.outcome == ACCEPTED
                and bool(deployment.role) == candidate):
            if not deployment.retiredMs:
                deployment.retiredMs = at_ms
                deployment.retiredBy = retired_by
            break
    return updated


def republication_refused(known: RepositoryEntry | None, descriptor: ModelDescriptor,
                          digest: str) -> str | None:
    """Why a descriptor by location may not serve again: ``known`` (its entry, from the
    repository) was first published with other files at the location than those of
    ``digest`` now. None when it may (not by location, not known, or the same files)."""
    if (known is None or not known.digest or not digest or digest == known.digest
            or descriptor.WhichOneof("MessageContent") != "location"):
        return None
    return changed_reason(descriptor.location, digest, known.digest)


def merge(older: RepositoryEntry, newer: RepositoryEntry) -> RepositoryEntry:
    """One entry of two records of the same model instance (``entry_key``): what was
    published last describes it, created is the first publication (unless the files
    changed: then it is another instance under the same name), and the deployments of both
    are kept, a later record of the same decision (same job and time) replacing it."""
    if newer.publishedMs < older.publishedMs:
        older, newer = newer, older
    merged = _copy(newer)
    merged.ClearField("deployments")
    if older.createdMs and (older.digest == newer.digest or not newer.digest):
        merged.createdMs = min(older.createdMs, newer.createdMs or older.createdMs)
        merged.digest = older.digest or newer.digest
    if not merged.descriptor and older.descriptor:
        merged.descriptor = older.descriptor
    decisions = {}
    for deployment in sorted(list(older.deployments) + list(newer.deployments),
                             key=lambda d: d.deployedMs):
        decisions[(deployment.job, deployment.deployedMs)] = deployment
    merged.deployments.extend(decisions.values())
    _bound(merged)
    return merged


def republished(entry: RepositoryEntry, now_ms: int) -> ModelDescriptor:
    """The descriptor of ``entry`` as published, stamped ``now_ms``: what a rollback sends.
    Raises ``RollbackError`` when the entry did not keep it."""
    if not entry.descriptor:
        raise RollbackError(f"{entry_key(entry)}: its descriptor was too large to keep in the "
                            f"repository; publish it again")
    descriptor = ModelDescriptor.FromString(entry.descriptor)
    descriptor.publishedMs = now_ms
    descriptor.ClearField("rollout")   # it comes back as the data type's model
    return descriptor


# -- views --------------------------------------------------------------------------------------

@dataclass
class Repository:
    """The repository as read from its topic: entries by ``entry_key``, merged."""

    entries: dict[str, RepositoryEntry] = field(default_factory=dict)

    @classmethod
    def fold(cls, records: Iterable[RepositoryEntry | bytes | None]) -> "Repository":
        """The repository of a stream of entries (or their bytes; None and b"" are
        tombstones of the topic, skipped: the repository forgets nothing)."""
        repository = cls()
        for record in records:
            repository.add(record)
        return repository

    def add(self, record: RepositoryEntry | bytes | None) -> None:
        if not record:
            return
        entry = RepositoryEntry.FromString(record) if isinstance(record, bytes) else record
        key = entry_key(entry)
        known = self.entries.get(key)
        self.entries[key] = _copy(entry) if known is None else merge(known, entry)

    def data_types(self) -> list[str]:
        return sorted({entry.dataType for entry in self.entries.values()})

    def history(self, data_type: str, model_id: str | None = None) -> list[RepositoryEntry]:
        """The versions of ``data_type`` (of one ``model_id`` when given), oldest first."""
        return sorted((e for e in self.entries.values() if e.dataType == data_type
                       and (model_id is None or e.modelId == model_id)),
                      key=lambda e: (e.createdMs, e.publishedMs, e.version))

    def latest(self, data_type: str, model_id: str | None = None) -> RepositoryEntry | None:
        """The last version published of ``data_type``."""
        versions = self.history(data_type, model_id)
        return versions[-1] if versions else None

    def listing(self) -> list[RepositoryEntry]:
        """The latest version of every data type, by data type."""
        return [self.latest(data_type) for data_type in self.data_types()]

    def show(self, data_type: str, version: str | None = None,
             model_id: str | None = None) -> RepositoryEntry | None:
        """One version of ``data_type`` (the latest published of that version, when several
        model ids have it); the latest version when ``version`` is None."""
        if version is None:
            return self.latest(data_type, model_id)
        matching = [e for e in self.history(data_type, model_id) if e.version == version]
        return matching[-1] if matching else None

    def serving(self, data_type: str) -> dict[str, RepositoryEntry]:
        """Per job, the entry that serves ``data_type`` there now: its latest acceptance as
        the data type's model (a candidate's deployment has a role), unless that one is
        retired."""
        latest: dict[str, tuple[int, RepositoryEntry, bool]] = {}
        for entry in self.history(data_type):
            for deployment in entry.deployments:
                if deployment.outcome != ACCEPTED or deployment.role:
                    continue
                known = latest.get(deployment.job)
                if known is None or deployment.deployedMs >= known[0]:
                    latest[deployment.job] = (deployment.deployedMs, entry,
                                              bool(deployment.retiredMs))
        return {job: entry for job, (_, entry, retired) in sorted(latest.items()) if not retired}

    def rollback_target(self, data_type: str, to_version: str | None = None,
                        job: str | None = None, model_id: str | None = None) -> RepositoryEntry:
        """The entry a rollback republishes: version ``to_version``, or else the version
        published before the one serving now (on ``job``, or the most recently deployed
        anywhere) that was accepted before. Raises ``RollbackError`` saying why there is none."""
        current = self._current(data_type, job)
        if to_version is not None:
            target = self.show(data_type, to_version, model_id)
            if target is None:
                raise RollbackError(f"data type '{data_type}' has no version '{to_version}' in "
                                    f"the repository")
            if not _accepted(target, job) and any(d.outcome != ACCEPTED for d in target.deployments):
                raise RollbackError(f"version '{to_version}' of data type '{data_type}' was never "
                                    f"accepted{_on(job)}: {_last_reason(target)}")
        else:
            if current is None:
                raise RollbackError(f"no model of data type '{data_type}' is serving{_on(job)}: "
                                    f"name the version to roll back to")
            older = [e for e in self.history(data_type, model_id)
                     if _created_before(e, current) and _accepted(e, job)]
            if not older:
                raise RollbackError(f"data type '{data_type}' has no accepted version before "
                                    f"'{current.version}'{_on(job)}")
            target = older[-1]
        if current is not None and entry_key(target) == entry_key(current):
            raise RollbackError(f"version '{target.version}' of data type '{data_type}' is the "
                                f"one serving{_on(job)}")
        if not target.descriptor:
            raise RollbackError(f"{entry_key(target)}: its descriptor was too large to keep in "
                                f"the repository; publish it again")
        return target

    def _current(self, data_type: str, job: str | None) -> RepositoryEntry | None:
        serving = self.serving(data_type)
        if job is not None:
            return serving.get(job)
        newest = [(max(d.deployedMs for d in e.deployments
                       if d.outcome == ACCEPTED and not d.role), e) for e in serving.values()]
        return max(newest, key=lambda pair: pair[0])[1] if newest else None


def _copy(entry: RepositoryEntry) -> RepositoryEntry:
    copied = RepositoryEntry()
    copied.CopyFrom(entry)
    return copied


def _bound(entry: RepositoryEntry) -> None:
    """Keep the latest MAX_DEPLOYMENTS deployments."""
    extra = len(entry.deployments) - MAX_DEPLOYMENTS
    if extra > 0:
        del entry.deployments[:extra]


def _accepted(entry: RepositoryEntry, job: str | None) -> bool:
    """Whether it served as the data type's model (not only as a candidate)."""
    return any(d.outcome == ACCEPTED and not d.role and (job is None or d.job == job)
               for d in entry.deployments)


def _created_before(entry: RepositoryEntry, other: RepositoryEntry) -> bool:
    return (entry.createdMs, entry.publishedMs, entry.version) < \
        (other.createdMs, other.publishedMs, other.version)


def _on(job: str | None) -> str:
    return f" on job '{job}'" if job else ""


def _last_reason(entry: RepositoryEntry) -> str:
    refused = [d for d in entry.deployments if d.outcome != ACCEPTED]
    if not refused:
        return "no decision recorded"
    last = refused[-1]
    return f"{RepositoryEntry.Outcome.Name(last.outcome)} by '{last.job}': {last.reason}"
