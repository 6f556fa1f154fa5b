"""The Flink side of serving: state, metrics and side outputs around ``ModelServer``.

Two joins share everything but where the current model lives:
- keyed: records and models keyed by data type meet in a ``KeyedCoProcessFunction``; the
  model of a data type is in keyed state on the one subtask that owns that data type;
- broadcast: every model goes to every parallel instance and lives in broadcast state
  (a map data type -> descriptor); records are spread over all instances.
Both keep descriptor bytes in state (never live model objects) plus a short model id, and
a transient per-subtask cache of loaded models. Keys, metrics, micro-batching and the
statistics producer have modules of their own next to this one.

State names and the output tag are part of savepoints and of the jobs' wiring: renaming
one makes a savepoint unreadable.

No record and no model can restart the job: whatever the project's own code raises while
serving a batch or handling a model (anything but the RecordError/ModelError that bad input
raises) becomes an INTERNAL_ERROR dead letter, is counted in ``internal_errors`` and logged
with its stack trace (at most once a minute per kind of failure). A failure the input
survives (statistics, metrics, batching and flushing) is counted and logged the same way,
and the record is still served. Every path a record or a model takes through a join catches
what it raises: parsing, scoring, building and serializing results, metrics, statistics and
their publishing, batching and its timers, building and installing models (a model that
fails to install leaves the state, and so the previous model, in place). What arrives under
a failure key (the keyed job's key selector failed, see ``udfs.flink.keys``) is
dead-lettered. Behind all of these, every entry point Flink calls (``process_element*``,
``on_timer``) goes through ``last_line``, which stops whatever a path would still let through.
"""
from __future__ import annotations

import logging

from pyflink.common import Types
from pyflink.datastream import (
    KeyedBroadcastProcessFunction,
    KeyedCoProcessFunction,
    OutputTag,
    RuntimeContext,
)
from pyflink.datastream import TimeDomain
from pyflink.datastream.state import ListStateDescriptor, MapStateDescriptor, ValueStateDescriptor

from protos import ModelStats
from udfs import statistics
from udfs.errors import ModelError
from udfs.failures import FailureLog
from udfs.flink.batching import MicroBatcher
from udfs.flink.keys import ModelDataType, RecordDataType, key_failure, subtask_index
from udfs.flink.metrics import ServingMetrics
from udfs.flink.publishing import StatsPublisher
from udfs.records import record_data_type
from udfs.serving import INTERNAL_ERROR, LoadedModel, ModelServer, Outcome, Withdrawal

log = logging.getLogger("modelserving")

BYTES = Types.PRIMITIVE_ARRAY(Types.BYTE())
DEAD_LETTERS = OutputTag("dead-letters", BYTES)

#: Broadcast state of the broadcast join: data type -> descriptor bytes, data type -> model id.
MODEL_DESCRIPTORS = MapStateDescriptor("model-descriptors", Types.STRING(), BYTES)
MODEL_IDS = MapStateDescriptor("model-ids", Types.STRING(), Types.STRING())
#: Keyed state of both joins: data type -> ModelStats bytes (the key's share of the statistics).
MODEL_STATS = "model-stats"
#: Keyed state of both joins when micro-batching: records received, not yet scored. They are
#: in Flink state (not a Python list) so a checkpoint taken while they wait still holds them.
PENDING_RECORDS = "pending-records"
#: Keyed state of both joins: processing time of the next statistics publication.
STATS_TIMER = "stats-timer"
#: Keyed state of the keyed join: the current model's id and descriptor bytes.
MODEL_ID = "model-id"
MODEL_DESCRIPTOR = "model-descriptor"


class ServingJoin:
    """What both joins do with a record and with a model, whatever their state looks like."""

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
                                  failures=self.failures)
        self.metrics = ServingMetrics(runtime_context, self.failures)
        self.batcher: MicroBatcher | None = None
        if self.settings.batch_max_size > 1:
            pending = runtime_context.get_list_state(ListStateDescriptor(PENDING_RECORDS, BYTES))
            self.batcher = MicroBatcher(pending, self.settings.batch_max_size,
                                        self.settings.batch_max_wait_ms)

    def close(self):
        if self.server is not None:
            self.server.close()
            self.publisher.close()

    def last_line(self, outputs, raw: bytes | None = None, model: bool = False, report: bool = True):
        """Yield ``outputs``, the outputs of one element (or timer). Every path under it
        catches what it raises; should an exception escape all the same (a path added later
        without its guard), this is where it stops before Flink: logged and counted, and the
        record or model dead-lettered (at worst answered twice, never a restart of the job)."""
        try:
            yield from outputs
        except Exception as exc:
            if raw is None:
                self.survived("handling a timer", exc)
            elif model:
                letter = self.model_failed(raw, exc, "handling a model", report)
                if letter is not None:
                    yield DEAD_LETTERS, letter
            else:
                yield from self.answer([self.server.internal_error(raw, exc, "handling a record")])

    def survived(self, where: str, exc: Exception, data_type: str = "") -> None:
        """A failure of our own code that serving goes on after (statistics, metrics,
        batching): logged (rate-limited, with its stack trace), counted in
        ``internal_errors``. Never raises."""
        self.failures.failed(where, exc)
        self.metrics.internal_error(data_type if isinstance(data_type, str) else "")

    # -- records ------------------------------------------------------------------------

    def model_lookup(self, ctx, data_type: str):
        """(model id, descriptor loader) of ``data_type`` as the join's state has them."""
        raise NotImplementedError

    def data_type_in(self, key, raw: bytes) -> str:
        """Data type of a pending record of ``key``."""
        raise NotImplementedError

    def part_of(self, key) -> int:
        raise NotImplementedError

    def on_record(self, ctx, key, raw: bytes):
        """Score the record now (batching off), or add it to the key's pending batch, which is
        scored when it is full, when its wait is over, or before a model change (keyed).
        A record under a failure key (its key selector failed) is dead-lettered."""
        failure = key_failure(key)
        if failure is not None:
            letter = self.server.relayed_internal_error(raw, RecordDataType.where, failure)
            yield from self.answer([Outcome(INTERNAL_ERROR, letter, "")])
            return
        oversized = self.server.oversized(raw)
        if oversized is not None:
            yield from self.answer([oversized])
            return
        if self.batcher is None:
            yield from self.serve_pending(ctx, key, [raw])
            return
        try:
            raws = self.batcher.add(key, raw, ctx.timer_service())
        except Exception as exc:
            # score what is pending now, this record included: never lost (at worst, when
            # even taking the batch fails, answered twice)
            raws = self.taken_after_failure(key, "batching a record", exc)
            if not any(pending is raw for pending in raws):
                raws = raws + [raw]
        yield from self.serve_pending(ctx, key, raws)

    def flush(self, ctx, key):
        """Score everything pending for ``key``."""
        if self.batcher is not None:
            try:
                raws = self.batcher.take(key)
            except Exception as exc:   # they stay pending, for the next flush
                self.survived("flushing a batch before a model change", exc)
                return
            yield from self.serve_pending(ctx, key, raws)

    def taken_after_failure(self, key, where: str, exc: Exception) -> list[bytes]:
        """Taking a batch of ``key`` failed with ``exc``: everything pending for ``key``, taken
        the plain way, with a new flush timer for the next record; [] when that fails too
        (the records stay pending, for the next flush or the end of the input)."""
        self.survived(where, exc)
        try:
            self.batcher.forget_timer(key)
            return self.batcher.take(key)
        except Exception as again:
            self.survived(where, again)
            return []

    def serve_pending(self, ctx, key, raws: list[bytes]):
        """Score records of ``key``: one batch per data type, in arrival order. Never raises:
        a record whose data type cannot be read is an internal error of that record."""
        if not raws:
            return
        part = self.part_of(key)
        typed = []
        for raw in raws:
            try:
                typed.append((self.data_type_in(key, raw), raw))
            except Exception as exc:
                yield from self.answer([self.server.internal_error(raw, exc, "reading the data "
                                                                   "type of a record")])
        for data_type, pairs in self.batches(typed):
            yield from self.serve_batch(ctx, data_type, part, [raw for _, raw in pairs])

    def batches(self, typed: list[tuple[str, bytes]]) -> list[tuple[str, list]]:
        """(data type, [(data type, raw)]) batches of ``typed``; one record a batch when
        forming batches fails."""
        try:
            if self.batcher is not None:
                return list(self.batcher.batches(typed, lambda pair: pair[0]))
        except Exception as exc:
            self.survived("forming batches", exc)
        return [(data_type, [(data_type, raw)]) for data_type, raw in typed]

    def serve_batch(self, ctx, data_type: str, part: int, raws: list[bytes]):
        """Yield the records' results, and dead letters on the side output; keep statistics.
        Never raises: records the job's own code fails on become INTERNAL_ERROR dead letters."""
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
        yield from self.answer(outcomes)
        if data_type:
            try:
                self.metrics.for_type(data_type).model = model
            except Exception as exc:
                self.survived("updating the metrics", exc, data_type)
            self.track(ctx, data_type, part, model, outcomes)

    def answer(self, outcomes: list[Outcome]):
        """Count ``outcomes`` and yield them: results, and dead letters on the side output."""
        self.metrics.count(outcomes)
        for outcome in outcomes:
            if outcome.is_dead_letter:
                yield DEAD_LETTERS, outcome.payload
            else:
                yield outcome.payload

    # -- statistics ---------------------------------------------------------------------

    def track(self, ctx, data_type: str, part: int, model: LoadedModel | None, outcomes=()) -> None:
        """Update this key's statistics of ``data_type``; publish at once on a model change,
        else when the periodic timer fires. Never raises: statistics must not stop serving."""
        try:
            self._track(ctx, data_type, part, model, outcomes)
        except Exception as exc:
            self.survived("keeping statistics", exc, data_type)

    def _track(self, ctx, data_type: str, part: int, model: LoadedModel | None, outcomes) -> None:
        raw = self.stats.get(data_type)
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
        """Flush the key's batch when its wait is over, or at the end of a bounded input;
        publish the statistics when they are due. Never raises: when flushing fails, what is
        pending is taken the plain way and scored (flushing early is harmless)."""
        key = ctx.get_current_key()
        if ctx.time_domain() == TimeDomain.EVENT_TIME:      # the end of a bounded input
            if self.batcher is not None:
                try:
                    raws = self.batcher.on_end_of_input(key)
                except Exception as exc:
                    raws = self.taken_after_failure(key, "flushing a batch at the end of input", exc)
                yield from self.serve_pending(ctx, key, raws)
            return
        if self.batcher is not None:
            try:
                raws = self.batcher.on_processing_timer(key, timestamp)
            except Exception as exc:
                raws = self.taken_after_failure(key, "flushing a batch", exc)
            yield from self.serve_pending(ctx, key, raws)
        try:
            stats_due = self.stats_timer.value()
            if stats_due is not None and stats_due <= timestamp:
                self.stats_timer.clear()
                for _, raw in self.stats.items():
                    self.publish(ModelStats.FromString(raw))
        except Exception as exc:
            self.survived("publishing statistics", exc)

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
    """Input 1: record bytes, input 2: descriptor bytes, both keyed by data type."""

    def open(self, runtime_context: RuntimeContext):
        self.open_serving(runtime_context)
        self.model_id = runtime_context.get_state(ValueStateDescriptor(MODEL_ID, Types.STRING()))
        self.descriptor = runtime_context.get_state(ValueStateDescriptor(MODEL_DESCRIPTOR, BYTES))

    def model_lookup(self, ctx, data_type):
        return self.model_id.value(), self.descriptor.value

    def data_type_in(self, key, raw):
        return key

    def part_of(self, key):
        return statistics.KEYED_PART

    def process_element1(self, raw, ctx):
        yield from self.last_line(self.on_record(ctx, ctx.get_current_key(), raw), raw)

    def process_element2(self, raw, ctx):
        yield from self.last_line(self.on_model(raw, ctx), raw, model=True)

    def on_model(self, raw, ctx):
        """Install a model (or withdrawal) of the current key, or dead-letter it."""
        data_type = ctx.get_current_key()
        failure = key_failure(data_type)
        if failure is not None:   # its key selector failed, and logged it
            self.metrics.internal_error()
            yield DEAD_LETTERS, self.server.relayed_internal_error(raw, ModelDataType.where,
                                                                   failure, model=True)
            return
        # records that arrived before this model are scored by the model they arrived under
        yield from self.flush(ctx, data_type)
        model, dead_letter = self.accept_model(raw)
        if model is None:
            yield DEAD_LETTERS, dead_letter
            return
        previous = None
        try:
            previous = self.model_id.value(), self.descriptor.value()
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
    """Input: record bytes keyed by a spreading key; broadcast input: descriptor bytes.

    Every instance loads every model; only instance 0 reports a bad model, so one bad model
    makes one dead letter whatever the parallelism. A broadcast element has no current key,
    so records pending in a micro-batch when a model changes are scored by the new model
    (they arrived at most ``batch_max_wait_ms`` earlier; the two inputs have no order anyway)."""

    def open(self, runtime_context: RuntimeContext):
        self.open_serving(runtime_context)

    def model_lookup(self, ctx, data_type):
        ids = ctx.get_broadcast_state(MODEL_IDS)
        model_id = ids.get(data_type) if ids.contains(data_type) else None
        descriptors = ctx.get_broadcast_state(MODEL_DESCRIPTORS)
        return model_id, lambda: descriptors.get(data_type)

    def data_type_in(self, key, raw):
        return record_data_type(raw)

    def part_of(self, key):
        return key

    def process_element(self, raw, ctx):
        yield from self.last_line(self.on_record(ctx, ctx.get_current_key(), raw), raw)

    def process_broadcast_element(self, raw, ctx):
        yield from self.last_line(self.on_model(raw, ctx), raw, model=True, report=self.subtask == 0)

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
