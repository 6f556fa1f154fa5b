"""The scoring function both joins share: record bytes in, result or dead-letter bytes out.

``ModelServer`` knows nothing of Flink. A Flink function owns the state (the descriptor bytes
of the current model per data type) and hands it over; the server keeps only a transient
cache of loaded models, rebuilt lazily from those bytes after a restore.
"""
from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterable, Sequence

from protos import DeadLetter, ServingResult, SpeculativeModelStats, SpeculativeOutcome
from udfs.candidates import CandidateChange, rollout_change
from udfs.errors import ModelError, ModelUnavailable, RecordError, RecordTooLarge, ResultTooLarge
from udfs.failures import FailureLog, describe as describe_failure
from udfs.lifecycle.digest import model_digest
from udfs.lifecycle.validation import raise_if_failed, validate_descriptor
from udfs.models import VECTOR_TYPES, ModelInfo, describe, load_request, parse_descriptor
from udfs.records import ParsedRecord, feature_row, parse_record, to_batch
from udfs.runtimes import load_model
from udfs.runtimes.base import ModelRuntime
from udfs.runtimes.endpoints import ModelServers
from udfs.speculative import (ANSWERED, MAX_BUDGET_MS, TIMED_OUT, Candidate, SetChange,
                              SpeculativePlan, Speculator, decide, member_key, plan_of)

log = logging.getLogger("modelserving")

SCORED = "scored"
NO_MODEL = "no_model"
BAD_RECORD = "bad_record"
INTERNAL_ERROR = "internal_error"   # the project's own code failed on the record

#: Defaults of the settings ``dead_letter_max_raw_bytes`` and ``max_result_bytes``.
DEAD_LETTER_MAX_RAW_BYTES = 64 * 1024
MAX_RESULT_BYTES = 1024 * 1024
MAX_RECORD_BYTES = 1024 * 1024
#: Partition or offset of an input the serving function does not know (see README, Bad input).
UNKNOWN = -1


@dataclass
class LoadedModel:
    info: ModelInfo
    raw: bytes                    # the descriptor bytes, as kept in Flink state
    runtime: ModelRuntime
    since_ms: int


@dataclass(frozen=True)
class Withdrawal:
    info: ModelInfo


@dataclass(frozen=True)
class Outcome:
    kind: str                     # SCORED, NO_MODEL, BAD_RECORD or INTERNAL_ERROR
    payload: bytes                # ServingResult bytes, or DeadLetter bytes for the last two
    data_type: str
    micros: float = 0.0

    @property
    def is_dead_letter(self) -> bool:
        return self.kind in (BAD_RECORD, INTERNAL_ERROR)


def now_ms() -> int:
    return int(time.time() * 1000)


class ModelServer:
    """Per-subtask model cache plus the parse → score → serialize path."""

    def __init__(self, *, model_dirs: Sequence[str | Path] = (), max_model_bytes: int,
                 data_topic: str, models_topic: str, subtask: int = 0,
                 max_inline_model_bytes: int | None = None,
                 dead_letter_max_raw_bytes: int = DEAD_LETTER_MAX_RAW_BYTES,
                 max_result_bytes: int = MAX_RESULT_BYTES,
                 max_record_bytes: int = MAX_RECORD_BYTES, failures: FailureLog | None = None,
                 model_servers: ModelServers | None = None,
                 speculative_max_budget_ms: int = MAX_BUDGET_MS):
        self.model_dirs = tuple(Path(d).expanduser().resolve() for d in model_dirs)
        self.max_model_bytes = max_model_bytes
        self.max_inline_model_bytes = max_inline_model_bytes or max_model_bytes
        self.data_topic = data_topic
        self.models_topic = models_topic
        self.subtask = subtask
        self.dead_letter_max_raw_bytes = dead_letter_max_raw_bytes
        self.max_result_bytes = max_result_bytes
        self.max_record_bytes = max_record_bytes
        self.failures = failures or FailureLog(log)
        self.model_servers = model_servers or ModelServers()
        self.speculative_max_budget_ms = speculative_max_budget_ms
        self.speculator = Speculator()
        # cache key (a data type, or ``member_key`` of one of its models) -> loaded model
        self._cache: dict[str, LoadedModel] = {}
        self._broken: dict[str, tuple[str, ModelError]] = {}   # cache key -> (model id, error)
        self._plans: dict[str, SpeculativePlan] = {}           # set id -> parsed set

    # -- models -----------------------------------------------------------------------------

    def build(self, raw: bytes) -> LoadedModel | Withdrawal | SetChange | CandidateChange:
        """Check and load a descriptor without touching what is serving; raises ModelError.

        A loaded model gets its digest (``ModelInfo.digest``, on every result it scores) and
        passes its descriptor's validation gate, if it has one, before it is returned: a
        model that misses it is closed and refused (``ValidationFailed``, with the figures)."""
        descriptor = parse_descriptor(raw)
        if descriptor.HasField("rollout"):
            return rollout_change(descriptor, self.build)
        if descriptor.WhichOneof("MessageContent") == "speculative":
            return plan_of(descriptor, raw, self.speculative_max_budget_ms)
        info = describe(descriptor, raw)
        if descriptor.withdraw:
            return Withdrawal(info)
        request = load_request(descriptor, self.model_dirs, self.max_model_bytes,
                               self.max_inline_model_bytes, self.model_servers)
        model = LoadedModel(info=info, raw=raw, runtime=load_model(request), since_ms=0)
        try:
            self._gate(descriptor, model)
        except BaseException:
            _close_quietly(model)
            raise
        model.since_ms = now_ms()
        return model

    def _gate(self, descriptor, model: LoadedModel) -> None:
        """Put the digest of a freshly loaded model on its info, then run its validation
        gate (``udfs.lifecycle.validation``); a refusal carries the digest too."""
        digest = model_digest(descriptor, self.model_dirs)
        model.info = replace(model.info, digest=digest)
        try:
            raise_if_failed(validate_descriptor(descriptor, model.runtime), descriptor)
        except ModelError as exc:
            exc.digest = digest
            raise

    def install(self, key: str, model: LoadedModel | None) -> LoadedModel | None:
        """Make ``model`` current under ``key`` (a data type, or one of its models' ``member_key``;
        None withdraws); close the replaced one unless another key still serves it, and not
        before it finishes a speculative batch it may still be scoring."""
        old = self._cache.pop(key, None)
        self._broken.pop(key, None)
        if model is not None:
            self._cache[key] = model
        if old is not None and all(kept is not old for kept in self._cache.values()):
            self.speculator.retire(old.runtime, lambda: _close_quietly(old))
        return old

    def keys_of(self, data_type: str) -> list[str]:
        """The cache keys of ``data_type``'s models (itself and its members)."""
        prefix = member_key(data_type, "")
        return [key for key in self._cache if key == data_type or key.startswith(prefix)]

    def plan(self, raw: bytes, set_id: str) -> SpeculativePlan:
        """The speculative set kept in state as ``raw``, parsed once per subtask."""
        plan = self._plans.get(set_id)
        if plan is None:
            change = self.build(raw)
            if not isinstance(change, SetChange) or change.plan is None:
                raise ModelError("the speculative set in state is not a set")
            if len(self._plans) >= 256:   # sets of data types come and go: stay bounded
                self._plans.clear()
            plan = self._plans[set_id] = change.plan
        return plan

    def current(self, data_type: str, model_id: str | None,
                stored_descriptor: Callable[[], bytes | None]) -> LoadedModel | None:
        """The model serving ``data_type`` according to state, loading it after a restore.

        ``model_id`` is the id kept in state; a cache entry with another id is stale. A stored
        model that fails to load raises its ModelError (remembered, so it is not retried for
        every record).
        """
        if not model_id:
            if data_type in self._cache:
                self.install(data_type, None)
            return None
        cached = self._cache.get(data_type)
        if cached is not None and cached.info.model_id == model_id:
            return cached
        broken = self._broken.get(data_type)
        if broken is not None and broken[0] == model_id:
            raise broken[1]
        raw = stored_descriptor()
        try:
            if raw is None:
                raise ModelError(f"model {model_id} is in state without its descriptor")
            model = self.build(raw)
            if not isinstance(model, LoadedModel):
                raise ModelError(f"what is stored as a model is not one ({type(model).__name__})")
        except ModelError as exc:
            self._broken[data_type] = (model_id, exc)
            log.error("model restored from state for %s failed to load: %s",
                      _readable(data_type), exc)
            raise
        log.info("restored %s from state", model.info)
        self.install(data_type, model)
        return model

    def dead_letter(self, kind: int, raw: bytes, source_topic: str, reason: str,
                    error: BaseException | str, data_type: str = "", model_name: str = "",
                    model_version: str = "") -> bytes:
        """DeadLetter bytes of any input: ``raw`` cut to ``dead_letter_max_raw_bytes``, with
        the whole input's size and SHA-256, so a dead letter is bounded whatever came in.
        ``error``: the exception, or the name of its type when only that is known."""
        raw = bytes(raw or b"")
        limit = self.dead_letter_max_raw_bytes
        return DeadLetter(kind=kind, raw=raw[:limit], rawSize=len(raw),
                          rawSha256=hashlib.sha256(raw).hexdigest(), rawTruncated=len(raw) > limit,
                          exceptionType=error if isinstance(error, str) else type(error).__name__,
                          sourceTopic=source_topic,
                          reason=reason, dataType=data_type, modelName=model_name,
                          modelVersion=model_version, atMs=now_ms(), subtask=self.subtask,
                          sourcePartition=UNKNOWN, sourceOffset=UNKNOWN).SerializeToString()

    def model_dead_letter(self, raw: bytes, error: ModelError) -> bytes:
        return self.dead_letter(DeadLetter.BAD_MODEL, raw, self.models_topic, str(error), error,
                                error.data_type, error.name, error.version)

    def internal_model_dead_letter(self, raw: bytes, error: Exception, where: str) -> bytes:
        """A descriptor the project's own code failed on: logged (rate-limited), dead-lettered."""
        self.failures.failed(where, error)
        return self.internal_letter(raw, self.models_topic,
                                    f"internal error {where}: {describe_failure(error)}",
                                    type(error).__name__)

    def internal_error(self, raw: bytes, error: Exception, where: str, data_type: str = "",
                       model: LoadedModel | None = None) -> Outcome:
        """A record the project's own code failed on: logged (rate-limited), dead-lettered."""
        self.failures.failed(where, error)
        data_type = data_type if isinstance(data_type, str) else ""
        letter = self.internal_letter(raw, self.data_topic,
                                      f"internal error {where}: {describe_failure(error)}",
                                      type(error).__name__, data_type, model)
        return Outcome(INTERNAL_ERROR, letter, data_type)

    def relayed_internal_error(self, raw: bytes, where: str, failure: str, model: bool = False) -> bytes:
        """The dead letter of an input another operator failed on and logged (a key selector,
        which cannot emit one): ``failure`` is its description, "Type: message"."""
        return self.internal_letter(raw, self.models_topic if model else self.data_topic,
                                    f"internal error {where}: {failure}",
                                    failure.partition(":")[0] or "Exception")

    def internal_letter(self, raw: bytes, source_topic: str, reason: str, exception_type: str,
                        data_type: str = "", model: LoadedModel | None = None) -> bytes:
        """An INTERNAL_ERROR dead letter; never raises: when the full one cannot be built (our
        own code failing again on this input), one with the reason and what can be had of the
        input's bytes."""
        try:
            return self.dead_letter(DeadLetter.INTERNAL_ERROR, raw, source_topic, reason,
                                    exception_type, data_type, model.info.name if model else "",
                                    model.info.version if model else "")
        except Exception:
            raw = raw if isinstance(raw, (bytes, bytearray)) else b""
            limit = self.dead_letter_max_raw_bytes
            return DeadLetter(kind=DeadLetter.INTERNAL_ERROR, raw=bytes(raw[:limit]),
                              rawSize=len(raw), rawSha256=hashlib.sha256(raw).hexdigest(),
                              rawTruncated=len(raw) > limit, exceptionType=exception_type,
                              sourceTopic=source_topic, reason=reason, atMs=now_ms(),
                              subtask=self.subtask, sourcePartition=UNKNOWN,
                              sourceOffset=UNKNOWN).SerializeToString()

    def close(self) -> None:
        self.speculator.close()
        for model in {id(model): model for model in self._cache.values()}.values():
            _close_quietly(model)
        self._cache.clear()

    # -- records ----------------------------------------------------------------------------

    def serve(self, raws: Iterable[bytes], model: LoadedModel | None,
              model_error: ModelError | None = None, observe=None) -> list[Outcome]:
        """Score records of one data type with ``model`` as one batch, in input order.
        ``observe(batch, predictions)``, when given, sees every scored batch (drift counts).

        Never raises: a record the project's own code fails on becomes an INTERNAL_ERROR
        dead letter, and a batch the model fails on is scored again record by record, so
        only the records that fail alone are dead-lettered."""
        outcomes: list[Outcome | None] = []
        rows: list[list[float]] = []
        scored: list[tuple[int, ParsedRecord]] = []
        for raw in raws:
            data_type = ""
            try:
                record = parse_record(raw)
                data_type = record.data_type
                if model_error is not None:
                    raise RecordError(f"the model serving data type '{record.data_type}' could "
                                      f"not be loaded: {model_error}")
                if model is None:
                    outcomes.append(Outcome(NO_MODEL, self._no_model(record), record.data_type))
                    continue
                rows.append(feature_row(record, model.runtime.input_names,
                                        exact=model.info.model_type in VECTOR_TYPES))
                scored.append((len(outcomes), record))
                outcomes.append(None)
            except RecordError as exc:
                log.debug("record refused: %s", exc)
                outcomes.append(self._bad_record(raw, exc, model, data_type))
            except Exception as exc:  # a bug of ours on this record must not stop the job
                outcomes.append(self.internal_error(raw, exc, "parsing a record", data_type, model))
        if rows:
            try:
                self._score(model, rows, scored, outcomes, observe)
            except ModelUnavailable as exc:   # the server failed, not a record: no one-by-one
                for position, record in scored:
                    outcomes[position] = self._bad_record(record.raw, exc, model, record.data_type)
            except Exception as exc:
                if len(rows) == 1:
                    position, record = scored[0]
                    outcomes[position] = self._failed(record, exc, model)
                else:   # find the record(s) it failed on: the others keep their results
                    log.warning("%s failed to score a batch of %d, scoring its records one by "
                                "one: %s", model.info, len(rows), describe_failure(exc))
                    for row, (position, record) in zip(rows, scored):
                        try:
                            self._score(model, [row], [(position, record)], outcomes, observe)
                        except Exception as single:
                            outcomes[position] = self._failed(record, single, model)
        return outcomes  # type: ignore[return-value]

    def _failed(self, record: ParsedRecord, exc: Exception, model: LoadedModel) -> Outcome:
        """A record the model failed on alone: a RecordError is the record's fault, anything
        else an internal error of the runtime."""
        if isinstance(exc, RecordError):
            return self._bad_record(record.raw, exc, model, record.data_type)
        return self.internal_error(record.raw, exc, f"scoring with {model.info}",
                                   record.data_type, model)

    def _score(self, model: LoadedModel, rows, scored, outcomes, observe=None) -> None:
        """Score ``rows`` and fill the outcomes of ``scored``; raises when the model fails
        (nothing is filled then). A record whose result cannot be built or serialized is an
        internal error of that record alone (the batch is not scored again)."""
        started = time.perf_counter()
        batch = to_batch(rows, model.runtime.input_names)
        predictions = list(model.runtime.score(batch))
        if len(predictions) != len(rows):
            raise RuntimeError(f"{model.info} returned {len(predictions)} predictions for "
                               f"{len(rows)} records")
        if observe is not None:
            observe(batch, predictions)
        micros = (time.perf_counter() - started) * 1e6 / len(rows)
        shared: dict[tuple, bytes] = {}
        filled = []
        for (position, record), prediction in zip(scored, predictions):
            try:   # the model is done: a failure from here on is ours, and this record's only
                common = shared.get(prediction.class_labels)
                if common is None:
                    common = shared[prediction.class_labels] = self._batch_fields(
                        model, prediction.class_labels, micros)
                payload = ServingResult(
                    dataType=record.data_type, recordId=record.record_id, recordTs=record.ts,
                    score=prediction.value, label=prediction.label,
                    probabilities=prediction.probabilities).SerializeToString() + common
                outcome = self._bounded(payload, record, model, micros)
            except Exception as exc:
                outcome = self.internal_error(record.raw, exc, "serializing a result",
                                              record.data_type, model)
            filled.append((position, outcome))
        for position, outcome in filled:
            outcomes[position] = outcome

    def _batch_fields(self, model: LoadedModel, class_labels, micros: float) -> bytes:
        """The fields every result of a batch shares, serialized once for the batch: a
        protobuf message's serialized fields may come in any order, and concatenated
        serializations parse as one message, so each record only serializes its own fields
        and appends these."""
        info = model.info
        return ServingResult(status=ServingResult.SCORED, modelName=info.name,
                             modelVersion=info.version, modelType=info.model_type,
                             modelId=info.declared_id, modelDigest=info.digest,
                             classLabels=class_labels, scoringMicros=micros, servedMs=now_ms(),
                             subtask=self.subtask).SerializeToString()

    def _bounded(self, payload: bytes, record: ParsedRecord, model: LoadedModel,
                 micros: float) -> Outcome:
        """The result, or a dead letter when it is larger than ``max_result_bytes``."""
        if len(payload) > self.max_result_bytes:
            error = ResultTooLarge(f"result too large ({len(payload)} bytes > "
                                   f"{self.max_result_bytes})")
            return self._bad_record(record.raw, error, model, record.data_type)
        return Outcome(SCORED, payload, record.data_type, micros)

    # -- speculative execution --------------------------------------------------------------

    def serve_speculative(self, raws: Iterable[bytes], plan: SpeculativePlan,
                          members: Sequence[tuple[str, LoadedModel | None, str]],
                          started: float | None = None
                          ) -> tuple[list[Outcome], list[SpeculativeModelStats]]:
        """Score records of one data type with every model of ``plan`` at once and decide
        each record's answer (``udfs.speculative``). ``members``: per model of the set, in
        order, (its id, the loaded model or None, why there is none). Returns the outcomes
        in input order and the batch's figures per model. Never raises.

        A record no model answered within the budget is dead-lettered as MODEL_UNAVAILABLE
        with what each model did; one that every answering model refused, as BAD_RECORD."""
        started = time.perf_counter() if started is None else started
        outcomes: list[Outcome | None] = []
        parsed: list[tuple[int, ParsedRecord]] = []
        for raw in raws:
            try:
                record = parse_record(raw)
                parsed.append((len(outcomes), record))
                outcomes.append(None)
            except RecordError as exc:
                outcomes.append(self._bad_record(raw, exc, None, ""))
            except Exception as exc:
                outcomes.append(self.internal_error(raw, exc, "parsing a record"))
        tally = [SpeculativeModelStats(modelId=model_id,
                                       modelName=model.info.name if model else "",
                                       modelVersion=model.info.version if model else "")
                 for model_id, model, _ in members]
        if not parsed:
            return outcomes, tally   # type: ignore[return-value]
        records = [record for _, record in parsed]
        try:
            answers = self.speculator.run(
                [(model_id, model.runtime if model else None,
                  (lambda model=model: self._predict(model, records)) if model else None,
                  reason) for model_id, model, reason in members], plan.budget_ms, started)
        except Exception as exc:   # our own code: the records are dead-lettered, never lost
            for position, record in parsed:
                outcomes[position] = self.internal_error(record.raw, exc, "speculative scoring",
                                                         record.data_type)
            return outcomes, tally   # type: ignore[return-value]
        waited = int((time.perf_counter() - started) * 1e6)
        loaded = [model for _, model, _ in members]
        for index, (position, record) in enumerate(parsed):
            try:
                outcomes[position] = self._decided(record, index, plan, answers, loaded, tally,
                                                   waited, len(records))
            except Exception as exc:
                outcomes[position] = self.internal_error(record.raw, exc, "deciding a speculative "
                                                         "result", record.data_type)
        return outcomes, tally   # type: ignore[return-value]

    def _predict(self, model: LoadedModel, records: Sequence[ParsedRecord]) -> list:
        """In the model's own thread: its prediction per record, or the reason (a string)
        why the record does not fit the model."""
        exact = model.info.model_type in VECTOR_TYPES
        answers: list = []
        rows, fitting = [], []
        for index, record in enumerate(records):
            try:
                rows.append(feature_row(record, model.runtime.input_names, exact=exact))
                fitting.append(index)
                answers.append(None)
            except RecordError as exc:
                answers.append(str(exc))
        if rows:
            predictions = list(model.runtime.score(to_batch(rows, model.runtime.input_names)))
            if len(predictions) != len(rows):
                raise RuntimeError(f"{model.info} returned {len(predictions)} predictions for "
                                   f"{len(rows)} records")
            for index, prediction in zip(fitting, predictions):
                answers[index] = prediction
        return answers

    def _decided(self, record: ParsedRecord, index: int, plan: SpeculativePlan, answers,
                 loaded: list[LoadedModel | None], tally: list[SpeculativeModelStats],
                 waited_micros: int, batch_size: int) -> Outcome:
        candidates, answered, timed_out, failed, refusals = [], [], [], [], []
        for rank, answer in enumerate(answers):
            figures = tally[rank]
            value = answer.predictions[index] if answer.status == ANSWERED else None
            if value is not None and not isinstance(value, str):
                candidates.append(Candidate(rank, answer.model_id, value))
                answered.append(answer.model_id)
                figures.answered += 1
                figures.totalMillis += answer.millis
                figures.maxMillis = max(figures.maxMillis, answer.millis)
            elif answer.status == TIMED_OUT:
                timed_out.append(answer.model_id)
                figures.timeouts += 1
            else:
                why = value if isinstance(value, str) else answer.reason
                (refusals if isinstance(value, str) else failed).append(f"{answer.model_id}: {why}")
                figures.failures += 1
        winner = decide(plan.decider, candidates)
        if winner is None:
            what = [f"{model_id}: no answer within {plan.budget_ms} ms" for model_id in timed_out]
            what += failed + refusals
            if refusals and not timed_out and not failed:
                error: RecordError = RecordError(f"no model of the speculative set could score "
                                                 f"the record: {'; '.join(what)}")
            else:
                error = ModelUnavailable(f"no model of the speculative set of data type "
                                         f"'{plan.data_type}' answered: {'; '.join(what)}")
            return self._bad_record(record.raw, error, None, record.data_type)
        tally[winner.rank].wins += 1
        model = loaded[winner.rank]
        prediction = winner.prediction
        micros = answers[winner.rank].millis * 1000 / batch_size
        outcome = SpeculativeOutcome(decider=plan.decider, budgetMs=plan.budget_ms,
                                     answered=answered, timedOut=timed_out,
                                     failed=failed + refusals, waitedMicros=waited_micros)
        payload = ServingResult(
            dataType=record.data_type, recordId=record.record_id, recordTs=record.ts,
            score=prediction.value, label=prediction.label,
            probabilities=prediction.probabilities,
            speculative=outcome).SerializeToString() + self._batch_fields(
                model, prediction.class_labels, micros)
        return self._bounded(payload, record, model, micros)

    def oversized(self, raw: bytes) -> Outcome | None:
        """The dead letter of a record over ``max_record_bytes``, else None: checked on
        arrival, so no such record ever waits in state for its batch."""
        if len(raw) <= self.max_record_bytes:
            return None
        error = RecordTooLarge(f"record too large ({len(raw)} bytes > max_record_bytes "
                               f"{self.max_record_bytes})")
        return self._bad_record(raw, error, None, "")

    def _no_model(self, record: ParsedRecord) -> bytes:
        return ServingResult(status=ServingResult.NO_MODEL, dataType=record.data_type,
                             recordId=record.record_id, recordTs=record.ts, servedMs=now_ms(),
                             subtask=self.subtask).SerializeToString()

    def _bad_record(self, raw: bytes, error: RecordError, model: LoadedModel | None,
                    data_type: str) -> Outcome:
        kind = (DeadLetter.MODEL_UNAVAILABLE if isinstance(error, ModelUnavailable)
                else DeadLetter.BAD_RECORD)
        letter = self.dead_letter(kind, raw, self.data_topic, str(error), error,
                                  data_type, model.info.name if model else "",
                                  model.info.version if model else "")
        return Outcome(BAD_RECORD, letter, data_type)


def _readable(key: str) -> str:
    """A cache key as a log line names it."""
    data_type, _, declared = key.partition(member_key("", ""))
    return f"data type '{data_type}'" + (f" (model '{declared}')" if declared else "")


def _close_quietly(model: LoadedModel) -> None:
    try:
        model.runtime.close()
    except Exception as exc:  # closing an old model must never break serving the new one
        log.warning("closing %s failed: %s", model.info, exc)
