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

from protos import DeadLetter, ModelStats
from udfs import statistics
from udfs.errors import ModelError
from udfs.failures import FailureLog
from udfs.flink.batches import BYTES, by_data_type, chunks, positions
from udfs.flink.keys import ModelDataType, key_failure, subtask_index
from udfs.flink.metrics import ServingMetrics
from udfs.flink.publishing import StatsPublisher
from udfs.runtimes.endpoints import ModelServers
from udfs.serving import INTERNAL_ERROR, LoadedModel, ModelServer, Outcome, Withdrawal

log = logging.getLogger("modelserving")

DEAD_LETTERS = OutputTag("dead-letters", BYTES)


def dead_letters_of(serving: DataStream) -> DataStream:
    """The join's dead letters as the JVM emits them (bytes). PyFlink's ``get_side_output``
    appends a Python identity map, a second embedded interpreter in the serving task: in
    thread mode two thread states then share one OS thread, and the first
    ``PyGILState_Ensure`` there (any pybind11 module's import, e.g. onnxruntime) waits for
    the interpreter lock its own thread holds, forever (docs/benchmarks/README.md)."""
    return DataStream(serving._j_data_stream.getSideOutput(DEAD_LETTERS.get_java_output_tag()))

def stored_bytes(state) -> bytes | None:
    """A bytes ``ValueState``'s value, None when empty. In thread mode PyFlink 2.2 converts
    an empty bytes state as if it held an array and raises TypeError instead of returning
    None (a map state's ``get`` of a missing key likewise: ask ``contains`` first)."""
    try:
        return state.value()
    except TypeError:
        return None


#: Broadcast state of the broadcast join: data type -> descriptor bytes, data type -> model id.
MODEL_DESCRIPTORS = MapStateDescriptor("model-descriptors", Types.STRING(), BYTES)
MODEL_IDS = MapStateDescriptor("model-ids", Types.STRING(), Types.STRING())
#: Keyed state of both joins: data type -> ModelStats bytes (the key's share of the statistics).
MODEL_STATS = "model-stats"
#: Keyed state of both joins: processing time of the next statistics publication.
STATS_TIMER = "stats-timer"
#: Where a batch under a failure key failed (its split by data type or its key selector).
KEYING_A_BATCH = "splitting or keying a batch"
#: Keyed state of the keyed join: the current model's id and descriptor bytes.
MODEL_ID = "model-id"
MODEL_DESCRIPTOR = "model-descriptor"


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
        self.stats = runtime_context.get_map_state(MapStateDescriptor(MODEL_STATS, Types.STRING(), BYTES))
        self.stats_timer = runtime_context.get_state(ValueStateDescriptor(STATS_TIMER, Types.LONG()))
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
                                  model_servers=ModelServers.from_settings(self.settings))
        self.metrics = ServingMetrics(runtime_context, self.failures)

    def close(self):
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
            for piece in chunks(indexes, self.settings.batch_max_size):
                for index, outcome in zip(piece, self.serve_batch(
                        ctx, data_type, part, [records[index] for index in piece])):
                    outcomes[index] = outcome
        yield from self.answer(outcomes, where)

    def serve_batch(self, ctx, data_type: str, part: int, raws: list[bytes]) -> list[Outcome]:
        """The records' outcomes, in order; keeps statistics. Never raises: records the job's
        own code fails on become INTERNAL_ERROR dead letters."""
        model, error = None, None
        try:
            if data_type:
                model_id, stored_descriptor = self.model_lookup(ctx, data_type)
                try:
                    model = self.server.current(data_type, model_id, stored_descriptor)
                except ModelError as exc:
                    error = exc
            outcomes = self.server.serve(raws, model, error)
        except Exception as exc:   # ModelServer.serve never raises; the lookup might
            outcomes = [self.server.internal_error(raw, exc, "serving a batch", data_type, model)
                        for raw in raws]
        if data_type:
            try:
                self.metrics.for_type(data_type).model = model
            except Exception as exc:
                self.survived("updating the metrics", exc, data_type)
            self.track(ctx, data_type, part, model, outcomes)
        return outcomes

    def answer(self, outcomes: list[Outcome], where: list[tuple[int, int]]):
        """Count ``outcomes`` and yield them: one batch of results, and dead letters on the
        side output, each stamped with its input's position."""
        self.metrics.count(outcomes)
        results = []
        for outcome, (partition, offset) in zip(outcomes, where):
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

    def track(self, ctx, data_type: str, part: int, model: LoadedModel | None, outcomes=()) -> None:
        """Update this key's statistics of ``data_type``; publish at once on a model change,
        else when the periodic timer fires. Never raises: statistics must not stop serving."""
        try:
            self._track(ctx, data_type, part, model, outcomes)
        except Exception as exc:
            self.survived("keeping statistics", exc, data_type)

    def _track(self, ctx, data_type: str, part: int, model: LoadedModel | None, outcomes) -> None:
        raw = self.stats.get(data_type) if self.stats.contains(data_type) else None
        stats = ModelStats.FromString(raw) if raw else statistics.new_stats(self.job, data_type, part, self.subtask)
        changed = statistics.is_change(stats, model)
        if changed:
            if stats.hasModel:
                self.publish(stats)  # the replaced model's final figures, for the history
            statistics.follow_model(stats, model)
        statistics.count(stats, outcomes)
        self.stats.put(data_type, stats.SerializeToString())
        if changed:
            self.publish(stats)
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
        """Publish the statistics when they are due. Never raises."""
        try:
            stats_due = self.stats_timer.value()
            if stats_due is not None and stats_due <= timestamp:
                self.stats_timer.clear()
                for _, raw in self.stats.items():
                    self.publish(ModelStats.FromString(raw))
        except Exception as exc:
            self.survived("publishing statistics", exc)
        return ()

    # -- models -------------------------------------------------------------------------

    def accept_model(self, raw: bytes, report: bool = True):
        """Build a model from a descriptor; a bad one is dead-lettered (when ``report``) and
        None returned, so the caller leaves the serving model in place."""
        try:
            return self.server.build(raw), None
        except ModelError as exc:
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

    def installed(self, data_type: str, model: LoadedModel | Withdrawal) -> None:
        """Swap the cache after the state was updated, and say so. Raises only when the swap
        fails (the caller restores the state); the metrics and the log line cannot fail it."""
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
        self.descriptor = runtime_context.get_state(ValueStateDescriptor(MODEL_DESCRIPTOR, BYTES))

    def model_lookup(self, ctx, data_type):
        return self.model_id.value(), lambda: stored_bytes(self.descriptor)

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
        """Install a model (or withdrawal) of the current key, or dead-letter it."""
        data_type = ctx.get_current_key()
        failure = key_failure(data_type)
        if failure is not None:   # its key selector failed, and logged it
            self.metrics.internal_error()
            yield DEAD_LETTERS, self.server.relayed_internal_error(raw, ModelDataType.where,
                                                                   failure, model=True)
            return
        model, dead_letter = self.accept_model(raw)
        if model is None:
            yield DEAD_LETTERS, dead_letter
            return
        previous = None
        try:
            previous = self.model_id.value(), stored_bytes(self.descriptor)
            self.install_keyed(data_type, model)
        except Exception as exc:
            self.restore_keyed(data_type, previous)
            yield DEAD_LETTERS, self.model_failed(raw, exc, "installing a model")
            return
        self.track(ctx, data_type, statistics.KEYED_PART, None if isinstance(model, Withdrawal) else model)

    def install_keyed(self, data_type: str, model):
        if isinstance(model, Withdrawal):
            self.model_id.clear()
            self.descriptor.clear()
        else:
            self.model_id.update(model.info.model_id)
            self.descriptor.update(model.raw)
        self.installed(data_type, model)

    def restore_keyed(self, data_type: str, previous) -> None:
        """Put back the state a failed installation changed: the previous model goes on
        serving (the cache follows the state's model id, reloading it when it must)."""
        if previous is None:
            return
        try:
            for state, value in zip((self.model_id, self.descriptor), previous):
                if value is None:
                    state.clear()
                else:
                    state.update(value)
        except Exception as exc:
            self.survived("restoring the model state", exc, data_type)


class BroadcastServing(ServingJoin, KeyedBroadcastProcessFunction):
    """Input: record batches (``RECORD_BATCH``) keyed by a spreading key; broadcast input:
    models topic messages (``MODEL_MESSAGE``).

    Every instance loads every model; only instance 0 reports a bad model, so one bad model
    makes one dead letter whatever the parallelism."""

    def open(self, runtime_context: RuntimeContext):
        self.open_serving(runtime_context)

    def model_lookup(self, ctx, data_type):
        ids = ctx.get_broadcast_state(MODEL_IDS)
        model_id = ids.get(data_type) if ids.contains(data_type) else None
        descriptors = ctx.get_broadcast_state(MODEL_DESCRIPTORS)
        return model_id, lambda: descriptors.get(data_type)

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
        """Install a model (or withdrawal) on this instance; instance 0 dead-letters a bad one."""
        model, dead_letter = self.accept_model(raw, report=self.subtask == 0)
        if model is None:
            if dead_letter is not None:
                yield DEAD_LETTERS, dead_letter
            return
        previous = None
        try:
            previous = self.broadcast_entry(ctx, model.info.data_type)
            self.install_broadcast(ctx, model)
        except Exception as exc:
            self.restore_broadcast(ctx, model, previous)
            dead_letter = self.model_failed(raw, exc, "installing a model", self.subtask == 0)
            if dead_letter is not None:
                yield DEAD_LETTERS, dead_letter

    def broadcast_entry(self, ctx, data_type: str):
        """(model id, descriptor) of ``data_type`` in broadcast state, (None, None) if none."""
        ids, descriptors = ctx.get_broadcast_state(MODEL_IDS), ctx.get_broadcast_state(MODEL_DESCRIPTORS)
        if not ids.contains(data_type):
            return None, None
        return ids.get(data_type), descriptors.get(data_type)

    def install_broadcast(self, ctx, model):
        data_type = model.info.data_type
        ids, descriptors = ctx.get_broadcast_state(MODEL_IDS), ctx.get_broadcast_state(MODEL_DESCRIPTORS)
        if isinstance(model, Withdrawal):
            if ids.contains(data_type):
                ids.remove(data_type)
                descriptors.remove(data_type)
        else:
            ids.put(data_type, model.info.model_id)
            descriptors.put(data_type, model.raw)
        self.installed(data_type, model)

    def restore_broadcast(self, ctx, model, previous) -> None:
        """Put back the broadcast state a failed installation changed (see ``restore_keyed``)."""
        if previous is None:
            return
        try:
            data_type = model.info.data_type
            ids, descriptors = ctx.get_broadcast_state(MODEL_IDS), ctx.get_broadcast_state(MODEL_DESCRIPTORS)
            model_id, descriptor = previous
            if model_id is None:
                if ids.contains(data_type):
                    ids.remove(data_type)
                if descriptors.contains(data_type):
                    descriptors.remove(data_type)
            else:
                ids.put(data_type, model_id)
                descriptors.put(data_type, descriptor)
        except Exception as exc:
            self.survived("restoring the model state", exc)
