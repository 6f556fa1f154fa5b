"""A data type's candidate model beside its primary one: canary and shadow (blue-green).

A descriptor with a ``rollout`` (DEPLOY) does not replace the data type's model: its model
becomes the *candidate*. In CANARY mode the candidate answers a share of the records,
chosen by record id (``udfs.lifecycle.routing``, so a record goes the same way on every
subtask, restart and replay); in SHADOW mode it scores every record and its results go to
the shadow topic, while the results topic gets the primary's only. PROMOTE makes the
candidate the data type's model, ABORT drops it.

The primary scores every record in both modes, so each record the candidate scores is also
compared with the primary's answer (agreement, score difference): in canary mode that costs
the candidate's share on top of what serving alone costs. A record the candidate fails on is
answered by the primary (the candidate never makes a record worse) and counted as one of
its failures; a candidate that cannot be loaded leaves every record to the primary.

Like every model, a candidate lives in the joins' state as descriptor bytes (a
``CandidateSlot``: the descriptor without its rollout, which is exactly what promotion
installs, and the rollout) and in the per-subtask cache under ``candidate_key``. Nothing
here imports pyflink.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from google.protobuf.message import DecodeError

from protos import CandidateSlot, DataRecord, ModelDescriptor, Rollout, ServingResult
from udfs.errors import ModelError, ModelRejected
from udfs.lifecycle.routing import ShadowComparison, goes_to_candidate
from udfs.runtimes.base import Prediction

DEPLOY, PROMOTE, ABORT = Rollout.DEPLOY, Rollout.PROMOTE, Rollout.ABORT
CANARY, SHADOW = Rollout.CANARY, Rollout.SHADOW
#: ``retiredBy`` of a candidate's deployment that became the data type's model, or was dropped.
PROMOTED, ABORTED = "promoted", "aborted"


def candidate_key(data_type: str) -> str:
    """The model cache's key of ``data_type``'s candidate (apart from its own model's and
    from its named models', ``udfs.speculative.member_key``)."""
    return f"{data_type}\x1ecandidate"


def role_of(rollout: Rollout) -> str:
    """How the repository names a candidate's deployment: "canary 10%" or "shadow"."""
    if rollout.mode == SHADOW:
        return "shadow"
    return f"canary {rollout.share * 100:g}%"


@dataclass(frozen=True)
class CandidateChange:
    """A descriptor with a rollout: DEPLOY carries its model (built from the descriptor
    without the rollout), PROMOTE and ABORT none."""

    data_type: str
    action: int
    rollout: Rollout
    model: object = None   # udfs.serving.LoadedModel for DEPLOY

    def slot(self) -> bytes:
        """What the join's state keeps of a deployed candidate."""
        return CandidateSlot(modelId=self.model.info.model_id, descriptor=self.model.raw,
                             rollout=self.rollout, sinceMs=self.model.since_ms).SerializeToString()


def without_rollout(descriptor: ModelDescriptor) -> bytes:
    """The descriptor as its model would be published alone: what a candidate serves as,
    and what its promotion installs (same id, digest and repository entry)."""
    plain = ModelDescriptor()
    plain.CopyFrom(descriptor)
    plain.ClearField("rollout")
    return plain.SerializeToString()


def rollout_change(descriptor: ModelDescriptor, build: Callable[[bytes], object]) -> CandidateChange:
    """Check a descriptor with a rollout; for DEPLOY, ``build`` its model (the
    descriptor without the rollout: policies and validation gate as for any model).
    Raises ModelRejected for what cannot be a rollout."""
    rollout = descriptor.rollout
    who = dict(name=descriptor.name, version=descriptor.version, data_type=descriptor.dataType)
    if rollout.action not in (DEPLOY, PROMOTE, ABORT):
        raise ModelRejected(f"unknown rollout action {rollout.action}", **who)
    if descriptor.withdraw:
        raise ModelRejected("a withdrawal cannot be rolled out: withdraw the model, or ABORT "
                            "the candidate", **who)
    if rollout.action != DEPLOY:
        return CandidateChange(descriptor.dataType, rollout.action, rollout)
    if rollout.mode not in (CANARY, SHADOW):
        raise ModelRejected(f"unknown rollout mode {rollout.mode}", **who)
    if rollout.mode == CANARY and not 0.0 < rollout.share <= 1.0:
        raise ModelRejected(f"a canary's share lies in (0, 1], not {rollout.share!r}", **who)
    if descriptor.WhichOneof("MessageContent") == "speculative":
        raise ModelRejected("a speculative set cannot be a candidate: roll out its models", **who)
    model = build(without_rollout(descriptor))
    if not hasattr(model, "runtime"):
        raise ModelRejected("a candidate must be a model", **who)
    return CandidateChange(descriptor.dataType, DEPLOY, rollout, model)


@dataclass(frozen=True)
class Candidacy:
    """A data type's candidate as the join's state has it (parsed once per subtask)."""

    model_id: str
    mode: int
    share: float
    since_ms: int
    slot: bytes

    @classmethod
    def of(cls, slot: bytes) -> "Candidacy":
        try:
            parsed = CandidateSlot.FromString(slot)
        except (DecodeError, ValueError) as exc:
            raise ModelError(f"the candidate in state is not a CandidateSlot ({exc})") from None
        return cls(parsed.modelId, parsed.rollout.mode, parsed.rollout.share, parsed.sinceMs, slot)

    def descriptor(self) -> bytes:
        return CandidateSlot.FromString(self.slot).descriptor

    @property
    def shadow(self) -> bool:
        return self.mode == SHADOW

    def chooses(self, raws: list[bytes]) -> list[int]:
        """Positions of the records the candidate scores: all in shadow mode, else those of
        its share by record id (the record's bytes when it has no id)."""
        if self.shadow:
            return list(range(len(raws)))
        return [i for i, raw in enumerate(raws)
                if goes_to_candidate(_record_key(raw), self.share, self.model_id)]


def _record_key(raw: bytes) -> str | bytes:
    try:
        return DataRecord.FromString(raw).id or raw
    except (DecodeError, ValueError):
        return raw


@dataclass
class BesideFigures:
    """What one batch served beside a candidate adds to the candidate's statistics."""

    records: int = 0       # records it answered (canary) or scored (shadow)
    failures: int = 0      # records it could not score
    comparison: ShadowComparison = field(default_factory=ShadowComparison)


@dataclass
class BesideBatch:
    """A batch served by a primary and its candidate."""

    outcomes: list            # what the join answers, in record order
    primary_served: list      # the outcomes the primary answered (its statistics)
    shadow: list[bytes]       # the candidate's results, for the shadow topic
    figures: BesideFigures


def beside(candidacy: Candidacy, raws: list[bytes], primary_outcomes: list,
           candidate_serve: Callable[[list[bytes]], list] | None) -> BesideBatch:
    """Combine the primary's outcomes of ``raws`` (all of them) with the candidate's:
    ``candidate_serve`` scores the records it is given with the candidate (None: the
    candidate could not be loaded, so the primary answers every record)."""
    chosen = candidacy.chooses(raws)
    figures = BesideFigures()
    if candidate_serve is None:
        figures.failures = len(chosen)
        return BesideBatch(list(primary_outcomes), list(primary_outcomes), [], figures)
    candidate_outcomes = candidate_serve([raws[i] for i in chosen]) if chosen else []
    outcomes = list(primary_outcomes)
    taken = set()
    shadow = []
    for position, theirs in zip(chosen, candidate_outcomes):
        ours = primary_outcomes[position]
        if theirs.kind != "scored":
            if ours is not None and ours.kind == "scored":
                figures.failures += 1   # the primary could: the candidate failed this record
            continue
        figures.records += 1
        if candidacy.shadow:
            shadow.append(theirs.payload)
        else:
            outcomes[position] = theirs
            taken.add(position)
        if ours is not None and ours.kind == "scored":
            figures.comparison.add(prediction_of(ours.payload), prediction_of(theirs.payload))
    primary_served = [o for i, o in enumerate(primary_outcomes) if i not in taken]
    return BesideBatch(outcomes, primary_served, shadow, figures)


def prediction_of(result: bytes) -> Prediction:
    """A scored ServingResult as the prediction it reports."""
    parsed = ServingResult.FromString(result)
    return Prediction(value=parsed.score, label=parsed.label,
                      probabilities=tuple(parsed.probabilities),
                      class_labels=tuple(parsed.classLabels))
