"""Speculative execution: several models of one data type score the same batch concurrently,
and a decider picks each record's answer among those that came within the latency budget.

Nothing here knows Flink. The budget counts from the moment the batch reaches the join (the
JVM's batching wait comes before it); the join waits at most that long, then decides with
what it has, so a model that hangs delays no result beyond the budget plus the slack of
building the results (``DECISION_SLACK_MS`` is what the documentation promises; the tests
and the benchmark measure it).

Each model scores on its own thread (one per model: onnxruntime, TensorFlow and the HTTP
calls of EXTERNAL models release the interpreter lock while they work), one batch at a time:
a model still busy with an earlier batch when a new one starts is counted as timed out for
the new one rather than queued, so a hanging model costs one thread, not a growing queue.
"""
from __future__ import annotations

import hashlib
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Sequence

from protos import ModelDescriptor, SpeculativeSet
from udfs.errors import ModelRejected
from udfs.models import MAX_MODEL_ID_CHARS
from udfs.runtimes.base import Prediction

log = logging.getLogger("modelserving")

PREFERRED, CONSENSUS, CONFIDENCE = (SpeculativeSet.PREFERRED, SpeculativeSet.CONSENSUS,
                                    SpeculativeSet.CONFIDENCE)
#: What a result may come after the budget: building the batch's results and the thread
#: hand-over (documented; measured by the benchmark's speculative run).
DECISION_SLACK_MS = 20
#: The longest budget a set may ask for unless the job's settings say otherwise.
MAX_BUDGET_MS = 10_000
MAX_SET_MODELS = 16

ANSWERED, TIMED_OUT, FAILED = "answered", "timed out", "failed"


def member_key(data_type: str, model_id: str) -> str:
    """The model cache's key of a data type's model named ``model_id`` (the data type alone
    keys the model that serves it without speculation)."""
    return f"{data_type}\x1f{model_id}"


@dataclass(frozen=True)
class SpeculativePlan:
    """A validated speculative set of one data type, as kept in state (``raw``)."""

    data_type: str
    models: tuple[str, ...]
    budget_ms: int
    decider: int
    raw: bytes
    set_id: str

    @property
    def decider_name(self) -> str:
        return SpeculativeSet.Decider.Name(self.decider)

    def __str__(self) -> str:
        return (f"speculative set for data type '{self.data_type}' ({self.decider_name}, "
                f"{self.budget_ms} ms: {', '.join(self.models)})")


@dataclass(frozen=True)
class SetChange:
    """A speculative descriptor: the new set of ``data_type``, or None to end speculation."""

    data_type: str
    plan: SpeculativePlan | None


def plan_of(descriptor: ModelDescriptor, raw: bytes, max_budget_ms: int = MAX_BUDGET_MS) -> SetChange:
    """Validate a descriptor whose content is a speculative set; raises ModelRejected."""
    data_type = descriptor.dataType
    chosen = descriptor.speculative
    who = dict(name=descriptor.name, version=descriptor.version, data_type=data_type)
    if descriptor.withdraw or not chosen.models:
        return SetChange(data_type, None)
    models = tuple(chosen.models)
    if len(models) > MAX_SET_MODELS:
        raise ModelRejected(f"a speculative set may name at most {MAX_SET_MODELS} models, "
                            f"not {len(models)}", **who)
    for model in models:
        if not model or len(model) > MAX_MODEL_ID_CHARS:
            raise ModelRejected(f"speculative set model ids must be 1-{MAX_MODEL_ID_CHARS} "
                                f"characters ({model[:40]!r})", **who)
    if len(set(models)) != len(models):
        raise ModelRejected(f"a speculative set names a model twice ({', '.join(models)})", **who)
    if not 0 < chosen.budgetMs <= max_budget_ms:
        raise ModelRejected(f"speculative budgetMs must be between 1 and {max_budget_ms} "
                            f"(speculative_max_budget_ms), not {chosen.budgetMs}", **who)
    if chosen.decider not in SpeculativeSet.Decider.values():
        raise ModelRejected(f"unknown speculative decider {chosen.decider} (known: "
                            f"{', '.join(SpeculativeSet.Decider.keys())})", **who)
    return SetChange(data_type, SpeculativePlan(
        data_type=data_type, models=models, budget_ms=chosen.budgetMs, decider=chosen.decider,
        raw=raw, set_id=hashlib.sha256(raw).hexdigest()[:16]))


@dataclass
class Answer:
    """One model's part in one batch: per record its prediction (None where it has none)."""

    model_id: str
    status: str = TIMED_OUT
    predictions: list[Prediction | None] = field(default_factory=list)
    millis: float = 0.0        # batch start to the model's answer
    reason: str = ""


@dataclass(frozen=True)
class Candidate:
    """One model's answer to one record, in set order (``rank``)."""

    rank: int
    model_id: str
    prediction: Prediction


def decide(decider: int, candidates: Sequence[Candidate]) -> Candidate | None:
    """The winning answer of one record, None when no model answered. ``candidates`` come in
    set order; every tie goes to the earlier listed model."""
    if not candidates:
        return None
    if decider == CONSENSUS:
        votes: dict[str, list[Candidate]] = {}
        for candidate in candidates:
            votes.setdefault(_vote(candidate.prediction), []).append(candidate)
        # most votes first, then the earliest listed voter (dicts keep first-vote order)
        return max(votes.values(), key=lambda voters: (len(voters), -voters[0].rank))[0]
    if decider == CONFIDENCE:
        confident = [c for c in candidates if c.prediction.probabilities]
        if confident:
            return max(confident, key=lambda c: (_confidence(c.prediction), -c.rank))
    return candidates[0]


def _vote(prediction: Prediction) -> str:
    """What a model answered, for voting: the class label, or the regression value to six
    significant digits (answers that close agree)."""
    return prediction.label if prediction.label else f"{prediction.value:.6g}"


def _confidence(prediction: Prediction) -> float:
    finite = [p for p in prediction.probabilities if p == p]   # NaN never wins
    return max(finite) if finite else float("-inf")


class Speculator:
    """Runs one batch on every model of a set at once and waits at most the budget."""

    def __init__(self):
        self._lock = threading.Lock()
        self._executors: dict[int, ThreadPoolExecutor] = {}   # id(runtime) -> its thread
        self._running: dict[int, Future] = {}

    def run(self, jobs: Sequence[tuple[str, object, Callable[[], list[Prediction | None]] | None, str]],
            budget_ms: int, started: float | None = None) -> list[Answer]:
        """``jobs``: per model of the set, in order, (model id, runtime, scoring call, reason
        it cannot run). The call scores the whole batch in the model's thread. Returns one
        Answer per job once all answered or the budget (from ``started``) ran out."""
        started = time.perf_counter() if started is None else started
        answers: list[Answer] = []
        pending: list[tuple[Answer, Future]] = []
        for model_id, runtime, call, reason in jobs:
            answer = Answer(model_id)
            answers.append(answer)
            if call is None:
                answer.status, answer.reason = FAILED, reason
                continue
            key = id(runtime)
            with self._lock:
                busy = self._running.get(key)
                if busy is not None and not busy.done():
                    answer.reason = "still scoring an earlier batch"
                    continue
                executor = self._executors.get(key)
                if executor is None:
                    executor = self._executors[key] = ThreadPoolExecutor(
                        1, thread_name_prefix=f"speculative-{model_id[:20]}")
                future = executor.submit(_timed, call, started)
                self._running[key] = future
            pending.append((answer, future))
        deadline = started + budget_ms / 1000
        for answer, future in pending:
            remaining = deadline - time.perf_counter()
            try:
                predictions, millis = future.result(timeout=max(remaining, 0))
            except TimeoutError:
                answer.reason = f"no answer within {budget_ms} ms"
                continue
            except Exception as exc:   # the model failed on the batch
                answer.status, answer.reason = FAILED, f"{type(exc).__name__}: {exc}"
                continue
            answer.status, answer.predictions, answer.millis = ANSWERED, predictions, millis
        return answers

    def retire(self, runtime, close: Callable[[], None]) -> None:
        """Close ``runtime`` once it is no longer scoring (at once when idle), and drop its
        thread."""
        key = id(runtime)
        with self._lock:
            future = self._running.pop(key, None)
            executor = self._executors.pop(key, None)
        if executor is not None:
            executor.shutdown(wait=False)
        if future is not None and not future.done():
            future.add_done_callback(lambda _: close())
        else:
            close()

    def close(self) -> None:
        with self._lock:
            executors, self._executors, self._running = list(self._executors.values()), {}, {}
        for executor in executors:
            executor.shutdown(wait=False, cancel_futures=True)


def _timed(call: Callable[[], list], started: float) -> tuple[list, float]:
    predictions = call()
    return predictions, (time.perf_counter() - started) * 1000
