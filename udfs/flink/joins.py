"""The Flink side of serving: state, metrics and side outputs around ``ModelServer``.

Two joins share everything but where the current model lives:
- keyed: records and models keyed by data type meet in a ``KeyedCoProcessFunction``; the
  model of a data type is in keyed state on the one subtask that owns that data type;
- broadcast: every model goes to every parallel instance and lives in broadcast state
  (a map data type -> descriptor); records are spread over all instances.
Both keep descriptor bytes in state (never live model objects) plus a short model id, and
a transient per-subtask cache of loaded models. Records arrive in batches formed on Flink's
JVM side (``udfs.flink.batches``) and each batch is answered with one batch of results; keys,
metrics and the statistics producer have modules of their own next to this one.

State names and the output tag are part of savepoints and of the jobs' wiring: renaming
one makes a savepoint unreadable.

No record and no model can restart the job: whatever the project's own code raises while
serving a batch or handling a model (anything but the RecordError/ModelError that bad input
raises) becomes an INTERNAL_ERROR dead letter, is counted in ``internal_errors`` and logged
with its stack trace (at most once a minute per kind of failure). A failure the input
survives (statistics, metrics) is counted and logged the same way, and the record is still
served. Every path a record or a model takes through a join catches what it raises: parsing,
scoring, building and serializing results, metrics, statistics and their publishing, its
timer, building and installing models (a model that fails to install leaves the state, and
so the previous model, in place). What arrives under a failure key (the keyed job's split or
key selector failed, see ``udfs.flink.keys``) is dead-lettered. Behind all of these, every
entry point Flink calls (``process_element*``, ``on_timer``) goes through ``last_line``,
which stops whatever a path would still let through.

Every dead letter names its input's Kafka partition and offset (``sourcePartition``,
``sourceOffset``), which arrive with the batch or the model.

Every decision about a model (accepted, refused, retired by a successor or a withdrawal) is
recorded in the model repository (``udfs.flink.model_repository``): kept in state with the
models and published to the repository topic through the statistics' producer (by instance
0 alone in the broadcast join). Recording never fails serving: a failure is survived.
"""
from __future__ import annotations

import logging

from pyflink.common import Row, Types
from pyflink.datastream import (
    DataStream,
    KeyedBroadcastProcessFunction,
    KeyedCoProcessFunction,
    OutputTag,
    RuntimeContext,
)
from pyflink.datastream.state import MapStateDescriptor, ValueStateDescriptor

import time

from protos import DeadLetter, ModelDescriptor, ModelStats, ModelType
from udfs import statistics
from udfs.candidates import (ABORT, ABORTED, DEPLOY, PROMOTE, PROMOTED, CandidateChange,
                             Candidacy, beside, candidate_key, role_of)
from udfs.errors import ModelError, ModelRejected
from udfs.models import model_id as digest_id, parse_descriptor
from udfs.failures import FailureLog
from udfs.flink.batches import BYTES, by_data_type, chunks, positions
from udfs.flink.keys import ModelDataType, key_failure, subtask_index
from udfs.flink.metrics import ServingMetrics
from udfs.flink.model_repository import EntriesOf, RepositoryRecorder
from udfs.lifecycle.repository import WITHDRAWN
from udfs.flink.overlap import FLUSH_AT_MS, POLL_MS, BatchesInFlight, PendingBatch
from udfs.flink.publishing import StatsPublisher
from udfs.flink.state_bytes import StateBytes, broadcast_states
from udfs.runtimes.endpoints import ModelServers
from udfs.serving import INTERNAL_ERROR, LoadedModel, ModelServer, Outcome, Withdrawal, now_ms
from udfs.speculative import SetChange, SpeculativePlan, member_key

log = logging.getLogger("modelserving")

DEAD_LETTERS = OutputTag("dead-letters", BYTES)
#: The results of candidate models in shadow mode (``udfs.candidates``), one per record.
SHADOW_RESULTS = OutputTag("shadow-results", BYTES)


def dead_letters_of(serving: DataStream) -> DataStream:
    """The join's dead letters as the JVM emits them (bytes). PyFlink's ``get_side_output``
    appends a Python identity map, a second embedded interpreter in the serving task: in
    thread mode two thread states then share one OS thread, and the first
    ``PyGILState_Ensure`` there (any pybind11 module's import, e.g. onnxruntime) waits for
    the interpreter lock its own thread holds, forever (docs/benchmarks/README.md)."""
    return DataStream(serving._j_data_stream.getSideOutput(DEAD_LETTERS.get_java_output_tag()))


def shadow_results_of(serving: DataStream) -> DataStream:
    """The join's shadow results (bytes), taken on the JVM side like ``dead_letters_of``."""
    return DataStream(serving._j_data_stream.getSideOutput(SHADOW_RESULTS.get_java_output_tag()))


#: Keyed state of the keyed join, per data type: modelId -> descriptor bytes and -> model id
#: of its models published with a modelId, and its speculative set's descriptor bytes.
KEYED_MODEL_SLOTS = "model-slots"
KEYED_MODEL_SLOT_IDS = "model-slot-ids"
KEYED_SPECULATIVE_SET = "speculative-set"
#: ``track``'s model argument when a batch says nothing of the data type's own model.
UNCHANGED = object()
#: Keyed state of both joins: data type -> ModelStats bytes (the key's share of the statistics).
MODEL_STATS = "model-stats"
#: Keyed state of both joins: processing time of the next statistics publication.
STATS_TIMER = "stats-timer"
#: Where a batch under a failure key failed (its split by data type or its key selector).
KEYING_A_BATCH = "splitting or keying a batch"
#: Keyed state of both joins: batch id -> ``PendingBatch`` bytes of the batches awaiting their
#: model server (``udfs.flink.overlap``).
EXTERNAL_PENDING = "external-pending"
#: Keyed state of the keyed join: the current model's id and descriptor bytes.
MODEL_ID = "model-id"
MODEL_DESCRIPTOR = "model-descriptor"
#: Keyed state of the keyed join, per data type: ``entry_key`` -> the job's repository entry
#: of that model (``udfs.flink.model_repository``; the broadcast join's is broadcast state).
REPOSITORY_ENTRIES = "repository-entries"
#: Where recording a model in the repository failed (survived).
RECORDING = "recording a model in the repository"
#: Keyed state of the keyed join: the data type's candidate (``CandidateSlot`` bytes); the
#: broadcast join's is broadcast state (``BroadcastStates.candidates``).
KEYED_CANDIDATE = "candidate-slot"


class ServingJoin:
    """What both joins do with a batch of records and with a model, whatever their state
    looks like."""

    def __init__(self, settings, stats_producer: dict):
        """``stats_producer``: kafka-python ``KafkaProducer`` arguments for the statistics,
        computed by the job on the client (``jobs.kafka_config.kafka_python``)."""
        self.settings = settings
        self.stats_producer = stats_producer
        self.server: ModelServer | None = None

    def open_serving(self, runtime_context: RuntimeContext) -> None:
        log.setLevel(self.settings.log_level)  # the worker's root logger forwards to Flink's log
        self.subtask = subtask_index(runtime_context)
        self.job = self.settings.job_name
        self.publisher = StatsPublisher(self.settings.state_topic, self.stats_producer)
        self.recorder = RepositoryRecorder(self.job, self.publish_entry)
        self.state_bytes = StateBytes.of(self.settings)
        self.stats = self.state_bytes.map(
            runtime_context.get_map_state(self.state_bytes.map_descriptor(MODEL_STATS)))
        self.stats_timer = runtime_context.get_state(ValueStateDescriptor(STATS_TIMER, Types.LONG()))
        self.pending = self.state_bytes.map(
            runtime_context.get_map_state(self.state_bytes.map_descriptor(EXTERNAL_PENDING)))
        limit = self.settings.model_server_batches_in_flight
        self.in_flight = BatchesInFlight(limit) if limit > 1 else None
        self.failures = FailureLog(log)
        self.server = ModelServer(model_dirs=self.settings.model_dirs,
                                  max_model_bytes=self.settings.max_model_bytes,
                                  max_inline_model_bytes=self.settings.max_inline_model_bytes,
                                  data_topic=self.settings.data_topic,
                                  models_topic=self.settings.models_topic, subtask=self.subtask,
                                  dead_letter_max_raw_bytes=self.settings.dead_letter_max_raw_bytes,
                                  max_result_bytes=self.settings.max_result_bytes,
                                  max_record_bytes=self.settings.max_record_bytes,
                                  failures=self.failures,
                                  model_servers=ModelServers.from_settings(self.settings),
                                  speculative_max_budget_ms=self.settings.speculative_max_budget_ms)
        self.metrics = ServingMetrics(runtime_context, self.failures)
        # data type -> its speculative set (None: none), read from state once per subtask and
        # then kept up to date by the models this subtask installs: no state read per batch
        self.sets: dict[str, SpeculativePlan | None] = {}
        # data type -> its candidate (None: none), the same way
        self.candidacies: dict[str, Candidacy | None] = {}
        self.shadow: list[bytes] = []   # shadow results of the batch being served

    def close(self):
        if self.in_flight is not None:
            self.in_flight.close()
        if self.server is not None:
            self.server.close()
            self.publisher.close()

    def last_line(self, outputs, batch=None, model=None, report: bool = True):
        """Yield ``outputs``, the outputs of one batch, model or timer. Every path under it
        catches what it raises; should an exception escape all the same (a path added later
        without its guard), this is where it stops before Flink: logged and counted, and the
        batch's records or the model dead-lettered (at worst answered twice, never a restart
        of the job)."""
        try:
            yield from outputs
        except Exception as exc:
            if model is not None:
                letter = self.model_failed(model, exc, "handling a model", report)
                if letter is not None:
                    yield DEAD_LETTERS, letter
            elif batch is not None:
                partition, offsets, records = batch
                yield from self.answer([self.server.internal_error(raw, exc, "handling a batch")
                                        for raw in records], positions(partition, offsets))
            else:
                self.survived("handling a timer", exc)

    def survived(self, where: str, exc: Exception, data_type: str = "") -> None:
        """A failure of our own code that serving goes on after (statistics, metrics):
        logged (rate-limited, with its stack trace), counted in ``internal_errors``. Never
        raises."""
        self.failures.failed(where, exc)
        self.metrics.internal_error(data_type if isinstance(data_type, str) else "")

    # -- records ------------------------------------------------------------------------

    def model_lookup(self, ctx, data_type: str):
        """(model id, descriptor loader) of ``data_type`` as the join's state has them."""
        raise NotImplementedError

    def speculative_lookup(self, ctx, data_type: str) -> bytes | None:
        """The speculative set's descriptor bytes of ``data_type``, None when it has none."""
        raise NotImplementedError

    def member_lookup(self, ctx, data_type: str, declared_id: str):
        """(model id, descriptor loader) of ``data_type``'s model published as ``declared_id``."""
        raise NotImplementedError

    def candidate_lookup(self, ctx, data_type: str) -> bytes | None:
        """The ``CandidateSlot`` bytes of ``data_type``'s candidate, None when it has none."""
        raise NotImplementedError

    def data_types(self, key, records) -> dict[str, list[int]]:
        """Indexes of ``records`` per data type, in arrival order."""
        raise NotImplementedError

    def part_of(self, key) -> int:
        raise NotImplementedError

    def on_batch(self, ctx, key, partition: int, offsets, records):
        """Answer a batch: results (one batch) in the records' order, dead letters one by
        one. Records too large are dead-lettered unread; the others are scored per data type
        in pieces of at most ``batch_max_size``. A batch under a failure key (its split or key
        selector failed) is dead-lettered."""
        started = time.perf_counter()   # a speculative budget counts from here
        where = positions(partition, offsets)
        failure = key_failure(key)
        if failure is not None:
            yield from self.answer([Outcome(INTERNAL_ERROR, self.server.relayed_internal_error(
                raw, KEYING_A_BATCH, failure), "") for raw in records], where)
            return
        outcomes: list[Outcome | None] = [self.server.oversized(raw) for raw in records]
        servable = [raw if outcome is None else b"" for raw, outcome in zip(records, outcomes)]
        part = self.part_of(key)
        try:
            groups = self.data_types(key, servable)
        except Exception as exc:
            groups = {}
            for index, raw in enumerate(records):
                if outcomes[index] is None:
                    outcomes[index] = self.server.internal_error(
                        raw, exc, "reading the data type of a record")
        for data_type, indexes in groups.items():
            indexes = [index for index in indexes if outcomes[index] is None]
            for index, outcome in zip(indexes, self.serve_group(
                    ctx, data_type, part, [records[index] for index in indexes], started,
                    [where[index] for index in indexes])):
                outcomes[index] = outcome
        yield from self.answer(outcomes, where)
        if self.shadow:
            shadow, self.shadow = self.shadow, []
            for result in shadow:
                yield SHADOW_RESULTS, result
        if self.in_flight is not None and self.in_flight.count(key) > self.in_flight.limit:
            yield from self.collect(ctx, key, oldest=True)   # back-pressure: wait for the oldest

    def serve_group(self, ctx, data_type: str, part: int, raws: list[bytes],
                    started: float, where: list[tuple[int, int]]) -> list[Outcome | None]:
        """The outcomes of a batch's records of one data type, in order: speculatively, all
        at once, when the data type has a speculative set, else with its model in pieces of
        at most ``batch_max_size``; None for records whose piece awaits its model server
        (``defer``). Never raises."""
        plan = None
        try:
            if data_type:
                plan = self.speculative_plan(ctx, data_type)
        except Exception as exc:
            return [self.server.internal_error(raw, exc, "reading the speculative set", data_type)
                    for raw in raws]
        if plan is not None:
            return self.serve_speculative(ctx, data_type, part, raws, plan, started)
        candidacy = None
        try:
            if data_type:
                candidacy = self.candidacy(ctx, data_type)
        except Exception as exc:
            self.survived("reading the candidate model", exc, data_type)
        outcomes: list[Outcome | None] = []
        for piece in chunks(list(range(len(raws))), self.settings.batch_max_size):
            if candidacy is not None:
                outcomes.extend(self.serve_beside(ctx, data_type, part, [raws[i] for i in piece],
                                                  candidacy))
            else:
                outcomes.extend(self.serve_batch(ctx, data_type, part, [raws[i] for i in piece],
                                                 [where[i] for i in piece]))
        return outcomes

    def candidacy(self, ctx, data_type: str) -> Candidacy | None:
        if data_type in self.candidacies:
            return self.candidacies[data_type]
        raw = self.candidate_lookup(ctx, data_type)
        candidacy = self.candidacies[data_type] = Candidacy.of(raw) if raw else None
        return candidacy

    def serve_beside(self, ctx, data_type: str, part: int, raws: list[bytes],
                     candidacy: Candidacy) -> list[Outcome]:
        """The records' outcomes with a candidate beside the primary (``udfs.candidates``):
        the primary scores them all, the candidate its share (canary) or all (shadow, its
        results kept for the shadow output). Synchronous, also for EXTERNAL models. Never
        raises."""
        primary, error, candidate = None, None, None
        try:
            model_id, stored_descriptor = self.model_lookup(ctx, data_type)
            try:
                primary = self.server.current(data_type, model_id, stored_descriptor)
            except ModelError as exc:
                error = exc
            outcomes, drift = self.scored(raws, primary, error, self.reference_of(primary))
            try:
                candidate = self.server.current(candidate_key(data_type), candidacy.model_id,
                                                candidacy.descriptor)
            except ModelError as exc:   # logged once by current(); the primary answers
                candidate = None
            serve = (lambda chosen: self.server.serve(chosen, candidate)) if candidate else None
            batch = beside(candidacy, raws, outcomes, serve)
        except Exception as exc:
            return [self.server.internal_error(raw, exc, "serving a batch beside a candidate",
                                               data_type, primary) for raw in raws]
        self.shadow.extend(batch.shadow)
        try:
            self.metrics.for_type(data_type).model = primary
        except Exception as exc:
            self.survived("updating the metrics", exc, data_type)
        self.track(ctx, data_type, part, primary, batch.primary_served, drift=drift,
                   beside=(candidacy, candidate, batch.figures))
        return batch.outcomes

    def speculative_plan(self, ctx, data_type: str) -> SpeculativePlan | None:
        if data_type in self.sets:
            return self.sets[data_type]
        raw = self.speculative_lookup(ctx, data_type)
        plan = self.sets[data_type] = self.server.plan(raw, digest_id(raw)) if raw else None
        return plan

    def serve_speculative(self, ctx, data_type: str, part: int, raws: list[bytes],
                          plan: SpeculativePlan, started: float) -> list[Outcome]:
        """Every model of ``plan`` scores the records at once (``ModelServer.serve_speculative``);
        a model of the set that is not installed, or fails to load, is reported as failed.
        Never raises."""
        try:
            members = []
            for declared in plan.models:
                model_id, stored_descriptor = self.member_lookup(ctx, data_type, declared)
                if not model_id:
                    members.append((declared, None, f"no model '{declared}' is installed"))
                    continue
                try:
                    members.append((declared, self.server.current(
                        member_key(data_type, declared), model_id, stored_descriptor), ""))
                except ModelError as exc:
                    members.append((declared, None, f"failed to load: {exc}"))
            outcomes, tally = self.server.serve_speculative(raws, plan, members, started)
        except Exception as exc:   # ModelServer.serve_speculative never raises; the lookups might
            return [self.server.internal_error(raw, exc, "serving a speculative batch", data_type)
                    for raw in raws]
        try:
            self.metrics.speculative(data_type, tally)
        except Exception as exc:
            self.survived("updating the metrics", exc, data_type)
        self.track(ctx, data_type, part, UNCHANGED, outcomes, (plan, tally))
        return outcomes

    def serve_batch(self, ctx, data_type: str, part: int, raws: list[bytes],
                    where: list[tuple[int, int]] = ()) -> list[Outcome | None]:
        """The records' outcomes, in order, or Nones when they await an EXTERNAL model's
        server (``defer``); keeps statistics. Never raises: records the job's own code fails
        on become INTERNAL_ERROR dead letters."""
        model, error = None, None
        try:
            if data_type:
                model_id, stored_descriptor = self.model_lookup(ctx, data_type)
                try:
                    model = self.server.current(data_type, model_id, stored_descriptor)
                except ModelError as exc:
                    error = exc
            if (self.in_flight is not None and model is not None and where
                    and model.info.model_type == ModelType.EXTERNAL):
                self.defer(ctx, PendingBatch(data_type, part, model.info.model_id, tuple(raws),
                                             tuple(where)), model)
                return [None] * len(raws)
            outcomes, drift = self.scored(raws, model, error, self.reference_of(model))
        except Exception as exc:   # ModelServer.serve never raises; the lookup might
            outcomes, drift = [self.server.internal_error(raw, exc, "serving a batch", data_type,
                                                          model) for raw in raws], None
        if data_type:
            try:
                self.metrics.for_type(data_type).model = model
            except Exception as exc:
                self.survived("updating the metrics", exc, data_type)
            self.track(ctx, data_type, part, model, outcomes, drift=drift)
        return outcomes

    def reference_of(self, model):
        """The reference distribution published with ``model``, for its drift; None when it
        has none or it cannot be read (drift is then not measured, serving goes on)."""
        try:
            return statistics.reference_of(model)
        except Exception as exc:
            self.survived("reading a model's reference distribution", exc)
            return None

    def scored(self, raws, model, error, reference):
        """``ModelServer.serve``'s outcomes and, when ``reference`` is given, what drift needs
        of the batch: (model id, reference, [(features, predictions)]). Safe in any thread."""
        if reference is None:
            return self.server.serve(raws, model, error), None
        observed = []
        outcomes = self.server.serve(raws, model, error,
                                     observe=lambda batch, predictions: observed.append(
                                         (batch, predictions)))
        return outcomes, (model.info.model_id, reference, observed)

    # -- batches awaiting their model server (udfs.flink.overlap) -------------------------

    def defer(self, ctx, batch: PendingBatch, model) -> None:
        """Call the model server from the pool; the batch waits in keyed state until
        ``collect`` answers it. Its model counts as serving from now (statistics)."""
        key = ctx.get_current_key()
        batch_id = self.in_flight.new_id(self.subtask)
        self.pending.put(batch_id, batch.encode())
        reference = self.reference_of(model)
        self.in_flight.submit(key, batch_id,
                              lambda: self.scored(batch.raws, model, None, reference))
        timers = ctx.timer_service()
        timers.register_processing_time_timer(timers.current_processing_time() + POLL_MS)
        timers.register_event_time_timer(FLUSH_AT_MS)
        try:
            self.metrics.for_type(batch.data_type).model = model
        except Exception as exc:
            self.survived("updating the metrics", exc, batch.data_type)
        self.track(ctx, batch.data_type, batch.part, model)

    def collect(self, ctx, key, oldest: bool = False, every: bool = False):
        """Answer the current key's batches whose server answered, oldest first: with
        ``oldest`` after waiting for the oldest, with ``every`` after waiting for all. A batch
        in state without a call (restored from a checkpoint) is called again. Looks again in
        ``POLL_MS`` while any remain. Never raises."""
        try:
            waiting = False
            for position, batch_id in enumerate(sorted(self.pending.keys())):
                future = self.in_flight.future(key, batch_id)
                batch = None
                if future is None:
                    batch = PendingBatch.decode(self.pending.get(batch_id))
                    future = self.resubmit(ctx, key, batch_id, batch)
                if every or (oldest and position == 0):
                    future.result()   # serve() never raises; it ends within its timeouts
                if not future.done():
                    waiting = True
                    continue
                batch = batch or PendingBatch.decode(self.pending.get(batch_id))
                self.pending.remove(batch_id)
                self.in_flight.forget(key, batch_id)
                outcomes, drift = future.result()
                self.track(ctx, batch.data_type, batch.part, UNCHANGED, outcomes, drift=drift)
                yield from self.answer(outcomes, list(batch.where))
            if waiting:
                timers = ctx.timer_service()
                timers.register_processing_time_timer(timers.current_processing_time() + POLL_MS)
        except Exception as exc:
            self.survived("answering batches that awaited their model server", exc)

    def resubmit(self, ctx, key, batch_id: str, batch: PendingBatch):
        """A batch restored from a checkpoint: call its data type's model as the restored
        state has it (the one it was sent to, unless a newer one was installed before the
        checkpoint)."""
        model, error = None, None
        model_id, stored_descriptor = self.model_lookup(ctx, batch.data_type)
        try:
            model = self.server.current(batch.data_type, model_id, stored_descriptor)
        except ModelError as exc:
            error = exc
        reference = self.reference_of(model)
        return self.in_flight.submit(key, batch_id,
                                     lambda: self.scored(batch.raws, model, error, reference))

    def answer(self, outcomes: list[Outcome | None], where: list[tuple[int, int]]):
        """Count ``outcomes`` and yield them: one batch of results, and dead letters on the
        side output, each stamped with its input's position."""
        self.metrics.count([outcome for outcome in outcomes if outcome is not None])
        results = []
        for outcome, (partition, offset) in zip(outcomes, where):
            if outcome is None:   # awaits its model server
                continue
            if outcome.is_dead_letter:
                yield DEAD_LETTERS, self.positioned(outcome.payload, partition, offset)
            else:
                results.append(outcome.payload)
        if results:
            yield Row(results)

    def positioned(self, letter: bytes, partition: int, offset: int) -> bytes:
        """A dead letter with its input's Kafka position; as it was when that fails."""
        try:
            stamped = DeadLetter.FromString(letter)
            stamped.sourcePartition, stamped.sourceOffset = partition, offset
            return stamped.SerializeToString()
        except Exception as exc:
            self.survived("stamping a dead letter's position", exc)
            return letter

    # -- statistics ---------------------------------------------------------------------

    def track(self, ctx, data_type: str, part: int, model, outcomes=(), speculative=None,
              drift=None, beside=None) -> None:
        """Update this key's statistics of ``data_type``; publish at once on a model change,
        else when the periodic timer fires. ``model``: the data type's own model, or
        ``UNCHANGED``; ``speculative``: (set, its figures for the batch) when it was scored
        speculatively; ``drift``: what ``scored`` observed for the drift figures; ``beside``:
        (candidacy, candidate model, ``BesideFigures``) when it was served beside a
        candidate. Never raises: statistics must not stop serving."""
        try:
            self._track(ctx, data_type, part, model, outcomes, speculative, drift, beside)
        except Exception as exc:
            self.survived("keeping statistics", exc, data_type)

    def _track(self, ctx, data_type: str, part: int, model, outcomes, speculative, drift,
               beside) -> None:
        raw = self.stats.get(data_type) if self.stats.contains(data_type) else None
        stats = ModelStats.FromString(raw) if raw else statistics.new_stats(self.job, data_type, part, self.subtask)
        changed = model is not UNCHANGED and statistics.is_change(stats, model)
        if changed:
            if stats.hasModel:
                self.publish(stats)  # the replaced model's final figures, for the history
            statistics.follow_model(stats, model)
        if speculative:
            plan, tally = speculative
            changed = statistics.follow_set(stats, plan) or changed
            statistics.count_speculative(stats, tally, outcomes)
        else:
            if outcomes and stats.HasField("speculative"):   # served by one model again
                changed = statistics.follow_set(stats, None) or changed
            statistics.count(stats, outcomes)
        candidate_gone = False
        if beside is not None:
            candidacy, candidate, figures = beside
            changed = statistics.follow_candidate(stats, candidacy, candidate) or changed
            statistics.count_candidate(stats, figures, sum(1 for o in outcomes if o.kind == "scored"))
        elif outcomes and stats.HasField("candidate"):   # its candidate is gone
            candidate_gone = statistics.follow_candidate(stats, None, None)
            changed = changed or candidate_gone
        if drift is not None and stats.hasModel and stats.modelId == drift[0]:
            if statistics.count_drift(stats, drift[1], drift[2], self.settings.drift_threshold):
                log.warning("model drift for data type '%s' (%s v%s): %s", data_type,
                            stats.modelName, stats.modelVersion, statistics.drift_line(stats))
                changed = True
        self.stats.put(data_type, stats.SerializeToString())
        if changed:
            self.publish(stats)
        if drift is not None or beside is not None or candidate_gone:
            try:   # (a new model resets its drift: ServingMetrics' model setter)
                counters = self.metrics.for_type(data_type)
                if drift is not None:
                    counters.drift(stats)
                counters.candidate(stats)
            except Exception as exc:
                self.survived("updating the metrics", exc, data_type)
        if self.settings.stats_interval_ms > 0 and self.stats_timer.value() is None:
            timers = ctx.timer_service()
            due = timers.current_processing_time() + self.settings.stats_interval_ms
            timers.register_processing_time_timer(due)
            self.stats_timer.update(due)

    def publish(self, stats: ModelStats) -> None:
        """Publish a snapshot; never raises."""
        try:
            self.publisher.publish(statistics.stats_key(stats.job, stats.dataType, stats.part),
                                   statistics.stamped(stats, self.subtask))
        except Exception as exc:   # the publisher catches Kafka's failures; this is for ours
            self.survived("publishing statistics", exc, _data_type_of(stats))

    def on_timer(self, timestamp, ctx):
        yield from self.last_line(self.timer(timestamp, ctx))

    def timer(self, timestamp, ctx):
        """Answer the batches whose model server answered (all of them at the end of a
        bounded input), and publish the statistics when they are due. Never raises."""
        if self.in_flight is not None:
            yield from self.collect(ctx, ctx.get_current_key(), every=timestamp >= FLUSH_AT_MS)
        try:
            stats_due = self.stats_timer.value()
            if stats_due is not None and stats_due <= timestamp:
                self.stats_timer.clear()
                for _, raw in self.stats.items():
                    self.publish(ModelStats.FromString(raw))
        except Exception as exc:
            self.survived("publishing statistics", exc)

    # -- models -------------------------------------------------------------------------

    def accept_model(self, raw: bytes, ctx, report: bool = True):
        """Build a model from a descriptor; a bad one is recorded in the repository,
        dead-lettered (when ``report``) and None returned, so the caller leaves the serving
        model in place."""
        try:
            return self.server.build(raw), None
        except ModelError as exc:
            self.record_refusal(ctx, raw, exc, report)
            if not report:
                return None, None
            try:
                log.warning("model rejected: %s", exc)
                self.metrics.bad_models.inc()
                return None, self.server.model_dead_letter(raw, exc)
            except Exception as again:
                return None, self.model_failed(raw, again, "dead-lettering a model")
        except Exception as exc:   # a bug of ours on this descriptor must not stop the job
            return None, self.model_failed(raw, exc, "building a model", report)

    def model_store(self, ctx, data_type: str) -> "ModelStore":
        """Where this join keeps ``data_type``'s models (in the keyed join: the current key's)."""
        raise NotImplementedError

    def publish_entry(self, key: str, value: bytes) -> None:
        """Publish a repository entry (``RepositoryRecorder`` calls it); never raises."""
        self.publisher.publish(key, value, topic=self.settings.repository_topic)

    def record_refusal(self, ctx, raw: bytes, error: ModelError, publish: bool) -> None:
        """Record a refused descriptor in its data type's repository entries (and publish the
        entry when ``publish``). What is not a descriptor naming a data type is not a model of
        the repository; without a repository topic nothing is recorded. Never raises."""
        if not self.settings.repository_topic:
            return
        try:
            descriptor = parse_descriptor(raw)
        except ModelError:
            return
        try:
            self.recorder.refused(self.model_store(ctx, descriptor.dataType).entries(),
                                  descriptor, raw, error, now_ms(), publish)
        except Exception as exc:
            self.survived(RECORDING, exc, descriptor.dataType)

    def record_switch(self, store: "ModelStore", data_type: str, own, previous, publish: bool):
        """Record that ``own`` (a model, or None: withdrawn) replaced the data type's model
        ``previous`` ((model id, descriptor bytes) before the change, from the state's
        snapshot). Never raises."""
        if not self.settings.repository_topic:
            return
        try:
            previous_id, previous_raw = previous
            at_ms = own.since_ms if own is not None else now_ms()
            self.recorder.switched(store.entries(), own, previous_id, previous_raw, at_ms,
                                   publish)
        except Exception as exc:
            self.survived(RECORDING, exc, data_type)

    def record_candidate(self, store: "ModelStore", data_type: str, change, previous: bytes | None,
                         publish: bool) -> None:
        """Record what became of the data type's candidate: ``change`` (a ``CandidateChange``,
        or None when a withdrawal of the data type ended it) and the candidate ``previous``
        (``CandidateSlot`` bytes before it, or None). Never raises."""
        if not self.settings.repository_topic:
            return
        try:
            at_ms = now_ms()
            entries = store.entries()
            if previous is not None:
                ended = Candidacy.of(previous)
                if change is None:
                    ended_by = WITHDRAWN
                elif change.action == DEPLOY:
                    ended_by = change.model.info.version or change.model.info.name
                else:
                    ended_by = PROMOTED if change.action == PROMOTE else ABORTED
                self.recorder.candidate_ended(entries, ended.model_id, ended.descriptor(), at_ms,
                                              ended_by, publish)
            if change is not None and change.action == DEPLOY:
                self.recorder.candidate_deployed(entries, change.model, role_of(change.rollout),
                                                 change.model.since_ms, publish)
        except Exception as exc:
            self.survived(RECORDING, exc, data_type)

    def model_failed(self, raw: bytes, exc: Exception, where: str, report: bool = True):
        """An internal error while handling a model: counted, and its dead letter (when
        ``report``: one instance of the broadcast join reports for all), else None."""
        if report:
            self.metrics.internal_error()
            return self.server.internal_model_dead_letter(raw, exc, where)
        self.failures.failed(where, exc)
        return None

    def on_message(self, message, ctx, report: bool = True):
        """Handle one models-topic message (partition, offset, descriptor bytes): its outputs
        are dead letters only, each stamped with the message's position."""
        partition, offset, raw = message[0], message[1], message[2]
        for tag, letter in self.last_line(self.on_model(raw, ctx), model=raw, report=report):
            yield tag, self.positioned(letter, partition, offset)

    def on_model(self, raw: bytes, ctx):
        raise NotImplementedError

    def install_descriptor(self, store: "ModelStore", data_type: str, model):
        """Apply an accepted descriptor to the state, then to the cache: a model (it becomes
        the data type's own model, and under its modelId one of its named models), a
        withdrawal (of the named model; without a modelId, of every model and the speculative
        set of the data type), or a speculative set change. Returns what the data type's own
        model now is: the model, None, or UNCHANGED. Raises when the state or the swap fails
        (the caller restores the state)."""
        if isinstance(model, CandidateChange):
            return self.change_candidate(store, data_type, model)
        if isinstance(model, SetChange):
            self.sets.pop(data_type, None)   # read again from state by the next batch
            if model.plan is None:
                store.clear_set()
                log.info("speculative serving ended for data type '%s' (subtask %d)", data_type,
                         self.subtask)
            else:
                store.put_set(model.plan.raw)
                log.info("%s takes over (subtask %d)", model.plan, self.subtask)
            return UNCHANGED
        declared = model.info.declared_id
        if isinstance(model, Withdrawal):
            if not declared:
                self.sets.pop(data_type, None)
                self.candidacies.pop(data_type, None)
                store.clear_all()
                store.clear_candidate()
                self.server.install(candidate_key(data_type), None)
                for key in self.server.keys_of(data_type):
                    self.server.install(key, None)
                self.installed(data_type, model)
                return None
            own = store.own_declared_id()
            store.remove_slot(declared)
            self.server.install(member_key(data_type, declared), None)
            if own != declared:
                log.info("model '%s' withdrawn for data type '%s' (subtask %d)", declared,
                         data_type, self.subtask)
                return UNCHANGED
            store.clear_own()
            self.installed(data_type, model)
            return None
        store.put_own(model.info.model_id, model.raw)
        if declared:
            store.put_slot(declared, model.info.model_id, model.raw)
            self.server.install(member_key(data_type, declared), model)
        self.installed(data_type, model)
        return model

    def change_candidate(self, store: "ModelStore", data_type: str, change: CandidateChange):
        """Deploy, promote or abort the data type's candidate (``udfs.candidates``). A
        promotion installs the candidate as the data type's model (and under its modelId as
        one of its named models), serving from now. Raises ModelRejected when there is no
        candidate to promote or abort."""
        key = candidate_key(data_type)
        self.candidacies.pop(data_type, None)   # read again from state by the next batch
        if change.action == DEPLOY:
            store.put_candidate(change.slot())
            self.server.install(key, change.model)
            log.info("%s is the candidate (%s) beside the serving model (subtask %d)",
                     change.model.info, role_of(change.rollout), self.subtask)
            return UNCHANGED
        raw = store.candidate_raw()
        if raw is None:
            verb = "promote" if change.action == PROMOTE else "abort"
            raise ModelRejected(f"data type '{data_type}' has no candidate model to {verb}",
                                data_type=data_type)
        if change.action == ABORT:
            store.clear_candidate()
            self.server.install(key, None)
            log.info("candidate of data type '%s' aborted (subtask %d)", data_type, self.subtask)
            return UNCHANGED
        candidacy = Candidacy.of(raw)
        model = self.server.current(key, candidacy.model_id, candidacy.descriptor)
        model.since_ms = now_ms()   # it serves the data type from now (the same object: the
        store.put_own(model.info.model_id, model.raw)   # cache must not close it below)
        declared = model.info.declared_id
        if declared:
            store.put_slot(declared, model.info.model_id, model.raw)
            self.server.install(member_key(data_type, declared), model)
        self.installed(data_type, model)
        store.clear_candidate()
        self.server.install(key, None)
        return model

    def installed(self, data_type: str, model: LoadedModel | Withdrawal) -> None:
        """Swap the data type's own model in the cache after the state was updated, and say
        so. Raises only when the swap fails; the metrics and the log line cannot fail it."""
        replaced = self.server.install(data_type, None if isinstance(model, Withdrawal) else model)
        try:
            if isinstance(model, Withdrawal):
                self.metrics.for_type(data_type).model = None
                log.info("model withdrawn for data type '%s' (subtask %d)", data_type, self.subtask)
                return
            self.metrics.models_loaded.inc()
            self.metrics.for_type(data_type).model = model
            if replaced is not None:
                log.info("loaded %s, replacing %s (subtask %d)", model.info, replaced.info, self.subtask)
            else:
                log.info("loaded %s (subtask %d)", model.info, self.subtask)
        except Exception as exc:
            self.survived("updating the metrics", exc, data_type)

    def apply_model(self, store: "ModelStore", data_type: str, raw: bytes, model, report: bool):
        """Install an accepted descriptor and record the change of the data type's model in
        the repository (published when ``report``); when installing fails, put the state back
        (the previous model goes on serving) and return the internal error's dead letter (or
        None)."""
        snapshot = None
        try:
            snapshot = store.snapshot(_declared_of(model, store))
            own = self.install_descriptor(store, data_type, model)
        except Exception as exc:
            self.sets.pop(data_type, None)
            self.candidacies.pop(data_type, None)
            if snapshot is not None:
                try:
                    store.restore(snapshot)
                except Exception as again:
                    self.survived("restoring the model state", again, data_type)
            if isinstance(exc, ModelError):   # the descriptor's fault (nothing to promote)
                return UNCHANGED, self.refused(raw, exc, report)
            return UNCHANGED, self.model_failed(raw, exc, "installing a model", report)
        if isinstance(model, CandidateChange):
            self.record_candidate(store, data_type, model, snapshot[-1], report)
        elif snapshot[-1] is not None and isinstance(model, Withdrawal) and not _declared_of(model, store):
            self.record_candidate(store, data_type, None, snapshot[-1], report)
        if own is not UNCHANGED:
            self.record_switch(store, data_type, own, snapshot[:2], report)
        return own, None

    def refused(self, raw: bytes, error: ModelError, report: bool):
        """A refused descriptor's dead letter (when ``report``), counted; else None."""
        if not report:
            return None
        log.warning("model rejected: %s", error)
        self.metrics.bad_models.inc()
        return self.server.model_dead_letter(raw, error)


def _declared_of(model, store: "ModelStore") -> str:
    """The modelId of the named model installing ``model`` may change."""
    if isinstance(model, CandidateChange):
        raw = store.candidate_raw() if model.action == PROMOTE else None
        return ModelDescriptor.FromString(Candidacy.of(raw).descriptor()).modelId if raw else ""
    return "" if isinstance(model, SetChange) else model.info.declared_id


class ModelStore:
    """Where a join keeps one data type's models: its own model (id and descriptor), its named
    models (modelId -> id and descriptor), its speculative set, and its repository entries
    (``entries``). ``snapshot``/``restore`` cover what installing one descriptor changes,
    except the named models a full withdrawal removes (and the entries, recorded only once
    the installation succeeded)."""

    def own_declared_id(self) -> str:
        raw = self.own_descriptor()
        return ModelDescriptor.FromString(raw).modelId if raw else ""

    def snapshot(self, declared: str):
        """What installing a descriptor may change; the candidate comes last."""
        slot = self.slot(declared) if declared else (None, None)
        return (self.own_id(), self.own_descriptor(), declared, slot, self.set_raw(),
                self.candidate_raw())

    def restore(self, snapshot) -> None:
        own_id, own_raw, declared, (slot_id, slot_raw), set_raw, candidate_raw = snapshot
        if candidate_raw is None:
            self.clear_candidate()
        else:
            self.put_candidate(candidate_raw)
        if own_id is None:
            self.clear_own()
        else:
            self.put_own(own_id, own_raw)
        if declared:
            if slot_id is None:
                self.remove_slot(declared)
            else:
                self.put_slot(declared, slot_id, slot_raw)
        if set_raw is None:
            self.clear_set()
        else:
            self.put_set(set_raw)


def _data_type_of(stats) -> str:
    try:
        return stats.dataType
    except Exception:
        return ""


class KeyedServing(ServingJoin, KeyedCoProcessFunction):
    """Input 1: batches of records of one data type (``DATA_TYPE_BATCH``), input 2: models
    topic messages (``MODEL_MESSAGE``), both keyed by data type."""

    def open(self, runtime_context: RuntimeContext):
        self.open_serving(runtime_context)
        self.model_id = runtime_context.get_state(ValueStateDescriptor(MODEL_ID, Types.STRING()))
        coding = self.state_bytes
        self.descriptor = coding.value(runtime_context.get_state(coding.value_descriptor(MODEL_DESCRIPTOR)))
        self.slots = coding.map(runtime_context.get_map_state(coding.map_descriptor(KEYED_MODEL_SLOTS)))
        self.slot_ids = runtime_context.get_map_state(
            MapStateDescriptor(KEYED_MODEL_SLOT_IDS, Types.STRING(), Types.STRING()))
        self.speculative_set = coding.value(
            runtime_context.get_state(coding.value_descriptor(KEYED_SPECULATIVE_SET)))
        self.entries = coding.map(
            runtime_context.get_map_state(coding.map_descriptor(REPOSITORY_ENTRIES)))
        self.candidate = coding.value(
            runtime_context.get_state(coding.value_descriptor(KEYED_CANDIDATE)))
        self.store = KeyedModelStore(self)

    def model_store(self, ctx, data_type):
        return self.store

    def model_lookup(self, ctx, data_type):
        return self.model_id.value(), lambda: self.descriptor.value()

    def speculative_lookup(self, ctx, data_type):
        return self.speculative_set.value()

    def candidate_lookup(self, ctx, data_type):
        return self.candidate.value()

    def member_lookup(self, ctx, data_type, declared_id):
        if not self.slot_ids.contains(declared_id):
            return None, None
        return self.slot_ids.get(declared_id), lambda: self.slots.get(declared_id)

    def data_types(self, key, records):
        return {key: list(range(len(records)))}

    def part_of(self, key):
        return statistics.KEYED_PART

    def process_element1(self, batch, ctx):
        partition, offsets, records = batch[1], batch[2], batch[3]
        yield from self.last_line(self.on_batch(ctx, ctx.get_current_key(), partition, offsets,
                                                records), (partition, offsets, records))

    def process_element2(self, message, ctx):
        yield from self.on_message(message, ctx)

    def on_model(self, raw, ctx):
        """Install a model, withdrawal or speculative set of the current key, or dead-letter it."""
        data_type = ctx.get_current_key()
        failure = key_failure(data_type)
        if failure is not None:   # its key selector failed, and logged it
            self.metrics.internal_error()
            yield DEAD_LETTERS, self.server.relayed_internal_error(raw, ModelDataType.where,
                                                                   failure, model=True)
            return
        model, dead_letter = self.accept_model(raw, ctx)
        if model is None:
            yield DEAD_LETTERS, dead_letter
            return
        own, dead_letter = self.apply_model(self.store, data_type, raw, model, report=True)
        if dead_letter is not None:
            yield DEAD_LETTERS, dead_letter
        elif own is not UNCHANGED:
            self.track(ctx, data_type, statistics.KEYED_PART, own)


class KeyedModelStore(ModelStore):
    """The keyed join's state of the current key (its data type)."""

    def __init__(self, join: KeyedServing):
        self.join = join

    def own_id(self):
        return self.join.model_id.value()

    def own_descriptor(self):
        return self.join.descriptor.value()

    def put_own(self, model_id, raw):
        self.join.model_id.update(model_id)
        self.join.descriptor.update(raw)

    def clear_own(self):
        self.join.model_id.clear()
        self.join.descriptor.clear()

    def slot(self, declared):
        if not self.join.slot_ids.contains(declared):
            return None, None
        return self.join.slot_ids.get(declared), self.join.slots.get(declared)

    def put_slot(self, declared, model_id, raw):
        self.join.slot_ids.put(declared, model_id)
        self.join.slots.put(declared, raw)

    def remove_slot(self, declared):
        if self.join.slot_ids.contains(declared):
            self.join.slot_ids.remove(declared)
            self.join.slots.remove(declared)

    def set_raw(self):
        return self.join.speculative_set.value()

    def put_set(self, raw):
        self.join.speculative_set.update(raw)

    def clear_set(self):
        self.join.speculative_set.clear()

    def clear_all(self):
        self.clear_own()
        self.join.slots.clear()
        self.join.slot_ids.clear()
        self.clear_set()

    def candidate_raw(self):
        return self.join.candidate.value()

    def put_candidate(self, raw):
        self.join.candidate.update(raw)

    def clear_candidate(self):
        self.join.candidate.clear()

    def entries(self):
        return self.join.entries


class BroadcastServing(ServingJoin, KeyedBroadcastProcessFunction):
    """Input: record batches (``RECORD_BATCH``) keyed by a spreading key; broadcast input:
    models topic messages (``MODEL_MESSAGE``).

    Every instance loads every model; only instance 0 reports a bad model, so one bad model
    makes one dead letter whatever the parallelism."""

    def open(self, runtime_context: RuntimeContext):
        self.open_serving(runtime_context)
        self.states = broadcast_states(self.state_bytes)

    def broadcast_bytes(self, ctx, descriptor):
        return self.state_bytes.map(ctx.get_broadcast_state(descriptor))

    def model_lookup(self, ctx, data_type):
        ids = ctx.get_broadcast_state(self.states.ids)
        model_id = ids.get(data_type) if ids.contains(data_type) else None
        descriptors = self.broadcast_bytes(ctx, self.states.descriptors)
        return model_id, lambda: descriptors.get(data_type)

    def speculative_lookup(self, ctx, data_type):
        sets = self.broadcast_bytes(ctx, self.states.sets)
        return sets.get(data_type) if sets.contains(data_type) else None

    def candidate_lookup(self, ctx, data_type):
        candidates = self.broadcast_bytes(ctx, self.states.candidates)
        return candidates.get(data_type) if candidates.contains(data_type) else None

    def model_store(self, ctx, data_type):
        return BroadcastModelStore(self, ctx, data_type)

    def member_lookup(self, ctx, data_type, declared_id):
        key, ids = member_key(data_type, declared_id), ctx.get_broadcast_state(self.states.slot_ids)
        if not ids.contains(key):
            return None, None
        return ids.get(key), lambda: self.broadcast_bytes(ctx, self.states.slots).get(key)

    def data_types(self, key, records):
        return by_data_type(records)

    def part_of(self, key):
        return key

    def process_element(self, batch, ctx):
        partition, offsets, records = batch[0], batch[1], batch[2]
        yield from self.last_line(self.on_batch(ctx, ctx.get_current_key(), partition, offsets,
                                                records), (partition, offsets, records))

    def process_broadcast_element(self, message, ctx):
        yield from self.on_message(message, ctx, report=self.subtask == 0)

    def on_model(self, raw, ctx):
        """Install a model, withdrawal or speculative set on this instance; instance 0
        dead-letters a bad one."""
        report = self.subtask == 0
        model, dead_letter = self.accept_model(raw, ctx, report=report)
        if model is None:
            if dead_letter is not None:
                yield DEAD_LETTERS, dead_letter
            return
        data_type = (model.data_type if isinstance(model, (SetChange, CandidateChange))
                     else model.info.data_type)
        _, dead_letter = self.apply_model(BroadcastModelStore(self, ctx, data_type), data_type, raw,
                                          model, report)
        if dead_letter is not None:
            yield DEAD_LETTERS, dead_letter


class BroadcastModelStore(ModelStore):
    """The broadcast join's state of one data type."""

    def __init__(self, join: BroadcastServing, ctx, data_type: str):
        self.data_type = data_type
        states = join.states
        self.ids = ctx.get_broadcast_state(states.ids)
        self.descriptors = join.broadcast_bytes(ctx, states.descriptors)
        self.slot_ids = ctx.get_broadcast_state(states.slot_ids)
        self.slots = join.broadcast_bytes(ctx, states.slots)
        self.sets = join.broadcast_bytes(ctx, states.sets)
        self.candidates = join.broadcast_bytes(ctx, states.candidates)
        self.join, self.ctx = join, ctx

    def own_id(self):
        return self.ids.get(self.data_type) if self.ids.contains(self.data_type) else None

    def own_descriptor(self):
        return self.descriptors.get(self.data_type) if self.descriptors.contains(self.data_type) else None

    def put_own(self, model_id, raw):
        self.ids.put(self.data_type, model_id)
        self.descriptors.put(self.data_type, raw)

    def clear_own(self):
        _remove(self.ids, self.data_type)
        _remove(self.descriptors, self.data_type)

    def slot(self, declared):
        key = member_key(self.data_type, declared)
        if not self.slot_ids.contains(key):
            return None, None
        return self.slot_ids.get(key), self.slots.get(key)

    def put_slot(self, declared, model_id, raw):
        key = member_key(self.data_type, declared)
        self.slot_ids.put(key, model_id)
        self.slots.put(key, raw)

    def remove_slot(self, declared):
        key = member_key(self.data_type, declared)
        _remove(self.slot_ids, key)
        _remove(self.slots, key)

    def set_raw(self):
        return self.sets.get(self.data_type) if self.sets.contains(self.data_type) else None

    def put_set(self, raw):
        self.sets.put(self.data_type, raw)

    def clear_set(self):
        _remove(self.sets, self.data_type)

    def clear_all(self):
        self.clear_own()
        prefix = member_key(self.data_type, "")
        for key in [key for key in self.slot_ids.keys() if key.startswith(prefix)]:
            _remove(self.slot_ids, key)
            _remove(self.slots, key)
        self.clear_set()

    def candidate_raw(self):
        return (self.candidates.get(self.data_type) if self.candidates.contains(self.data_type)
                else None)

    def put_candidate(self, raw):
        self.candidates.put(self.data_type, raw)

    def clear_candidate(self):
        _remove(self.candidates, self.data_type)

    def entries(self):
        """The data type's entries in the broadcast state of every data type's entries."""
        return EntriesOf(self.join.broadcast_bytes(self.ctx, self.join.states.entries),
                         member_key(self.data_type, ""))


def _remove(state, key: str) -> None:
    if state.contains(key):
        state.remove(key)
