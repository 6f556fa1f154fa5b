"""The joins' records in the model repository (``udfs.lifecycle.repository``).

A join records a decision whenever it makes one: a model accepted (ACCEPTED, serving from
the moment it was loaded), refused (REFUSED, or VALIDATION_FAILED with the gate's figures),
and the data type's model retired when another replaces it or it is withdrawn (its
``retiredMs`` is the successor's ``deployedMs``). Each record is the job's whole view of that
model instance, published under ``topic_key(entry, job)``: the topic is compacted by that
key, so the latest record must carry every earlier decision of the job about it.

That is why the entries live in the join's state too, per data type, keyed by
``entry_key``: a model that comes back (a rollback) keeps its earlier deployments and its
creation time, and a restore from a checkpoint puts the entries back with the models they
describe. State keeps them without the descriptor bytes (the serving model's are in state
already, and a decision about any other arrives with them); at most ``KEPT_PER_DATA_TYPE``
per data type, the most recently decided.

``RepositoryRecorder`` works on any map of a data type's entries (``get``, ``put``,
``remove``, ``contains``, ``items``) and a publishing function, so it runs without Flink.
"""
from __future__ import annotations

from typing import Callable

from protos import ModelDescriptor, RepositoryEntry
from udfs.errors import ModelError, ValidationFailed
from udfs.lifecycle.digest import digest_bytes
from udfs.lifecycle.repository import (ACCEPTED, MAX_KEPT_DESCRIPTOR_BYTES, REFUSED,
                                       VALIDATION_FAILED, WITHDRAWN, entry_from_descriptor,
                                       entry_key, merge, record_deployment, record_retirement,
                                       topic_key)

#: Entries a join keeps in state per data type.
KEPT_PER_DATA_TYPE = 16


class RepositoryRecorder:
    """Records one job's decisions in its entries (state) and publishes them (when asked:
    one instance of the broadcast join publishes for all)."""

    def __init__(self, job: str, publish: Callable[[str, bytes], None]):
        self.job = job
        self.publish = publish

    def refused(self, entries, descriptor: ModelDescriptor, raw: bytes, error: ModelError,
                at_ms: int, publish: bool) -> RepositoryEntry | None:
        """A descriptor refused with ``error``; None when it is not a model (a speculative
        set, a withdrawal) or names no data type."""
        content = descriptor.WhichOneof("MessageContent")
        if not descriptor.dataType or descriptor.withdraw or content == "speculative":
            return None
        digest = getattr(error, "digest", "") or (digest_bytes(descriptor.data)
                                                   if content == "data" else "")
        failed = isinstance(error, ValidationFailed) and error.outcome is not None
        entry = self._known(entries, entry_from_descriptor(descriptor, raw, digest))
        entry = record_deployment(entry, self.job, VALIDATION_FAILED if failed else REFUSED,
                                  at_ms, reason=str(error),
                                  figures=error.outcome.figures() if failed else None)
        self._keep(entries, entry, publish)
        return entry

    def switched(self, entries, model, previous_id: str | None, previous_raw: bytes | None,
                 at_ms: int, publish: bool) -> list[RepositoryEntry]:
        """The data type's own model became ``model`` (a ``LoadedModel``; None: withdrawn)
        in place of the one with id ``previous_id`` (descriptor ``previous_raw``): the
        previous one retires, the new one is accepted. The same descriptor again changes
        nothing. Returns the entries recorded."""
        if model is not None and previous_id == model.info.model_id:
            return []
        recorded = []
        accepted = None
        if model is not None:
            accepted = entry_from_descriptor(ModelDescriptor.FromString(model.raw), model.raw,
                                             model.info.digest)
        if previous_id:
            retired = self._retire(entries, previous_id, previous_raw, at_ms,
                                   _version_of(accepted) if accepted else WITHDRAWN, publish)
            recorded += [retired] if retired is not None else []
        if accepted is not None:
            entry = record_deployment(self._known(entries, accepted), self.job, ACCEPTED, at_ms)
            self._keep(entries, entry, publish)
            recorded.append(entry)
        return recorded

    def candidate_deployed(self, entries, model, role: str, at_ms: int,
                           publish: bool) -> RepositoryEntry:
        """``model`` became its data type's candidate (``role``: "canary 10%", "shadow")."""
        entry = entry_from_descriptor(ModelDescriptor.FromString(model.raw), model.raw,
                                      model.info.digest)
        entry = record_deployment(self._known(entries, entry), self.job, ACCEPTED, at_ms, role=role)
        self._keep(entries, entry, publish)
        return entry

    def candidate_ended(self, entries, candidate_id: str, candidate_raw: bytes, at_ms: int,
                        ended_by: str, publish: bool) -> RepositoryEntry | None:
        """The candidate of id ``candidate_id`` stopped being one: ``ended_by`` "promoted",
        "aborted", "withdrawn" or the candidate version that replaced it."""
        return self._retire(entries, candidate_id, candidate_raw, at_ms, ended_by, publish,
                            candidate=True)

    def _retire(self, entries, previous_id: str, previous_raw: bytes | None, at_ms: int,
                retired_by: str, publish: bool, candidate: bool = False) -> RepositoryEntry | None:
        """The serving model's (or ``candidate``'s) entry, retired; None when the job has no
        entry of it (it was accepted before the job kept a repository)."""
        serving = [RepositoryEntry.FromString(stored) for _, stored in list(entries.items())]
        serving = [entry for entry in serving if entry.descriptorId == previous_id]
        if not serving:
            return None
        entry = serving[0]
        if previous_raw and len(previous_raw) <= MAX_KEPT_DESCRIPTOR_BYTES:
            entry.descriptor = previous_raw
        retired = record_retirement(entry, self.job, at_ms, retired_by, candidate=candidate)
        self._keep(entries, retired, publish)
        return retired

    def _known(self, entries, entry: RepositoryEntry) -> RepositoryEntry:
        """``entry`` with what the job already recorded of the same model instance."""
        key = entry_key(entry)
        if not entries.contains(key):
            return entry
        return merge(RepositoryEntry.FromString(entries.get(key)), entry)

    def _keep(self, entries, entry: RepositoryEntry, publish: bool) -> None:
        """Store ``entry`` without its descriptor (forgetting the least recently decided
        beyond ``KEPT_PER_DATA_TYPE``) and publish it with its descriptor."""
        key = entry_key(entry)
        stripped = RepositoryEntry()
        stripped.CopyFrom(entry)
        stripped.ClearField("descriptor")
        entries.put(key, stripped.SerializeToString())
        kept = [(k, _last_decision(RepositoryEntry.FromString(v))) for k, v in entries.items()]
        if len(kept) > KEPT_PER_DATA_TYPE:
            kept.sort(key=lambda pair: pair[1])
            for old, _ in kept[:len(kept) - KEPT_PER_DATA_TYPE]:
                if old != key:
                    entries.remove(old)
        if publish:
            self.publish(topic_key(entry, self.job), entry.SerializeToString())


class EntriesOf:
    """One data type's entries in a map of every data type's (the broadcast join's state),
    whose keys are ``prefix`` (the data type's) + ``entry_key``."""

    def __init__(self, state, prefix: str):
        self.state, self.prefix = state, prefix

    def contains(self, key: str) -> bool:
        return self.state.contains(self.prefix + key)

    def get(self, key: str) -> bytes:
        return self.state.get(self.prefix + key)

    def put(self, key: str, raw: bytes) -> None:
        self.state.put(self.prefix + key, raw)

    def remove(self, key: str) -> None:
        self.state.remove(self.prefix + key)

    def items(self):
        return [(key[len(self.prefix):], raw) for key, raw in self.state.items()
                if key.startswith(self.prefix)]


def _version_of(entry: RepositoryEntry) -> str:
    """How a successor is named in ``retiredBy``: its version, else its name."""
    return entry.version or entry.name


def _last_decision(entry: RepositoryEntry) -> int:
    return max([entry.publishedMs] + [max(d.deployedMs, d.retiredMs) for d in entry.deployments])
