"""The Flink side of serving: state, metrics and side outputs around ``ModelServer``.

Two joins share everything but where the current model lives:
- keyed: records and models keyed by data type meet in a ``KeyedCoProcessFunction``; the
  model of a data type is in keyed state on the one subtask that owns that data type;
- broadcast: every model goes to every parallel instance and lives in broadcast state
  (a map data type -> descriptor); records are spread over all instances.
Both keep descriptor bytes in state (never live model objects) plus a short model id, and
a transient per-subtask cache of loaded models.
"""
from __future__ import annotations

import logging
import zlib

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
from udfs.models import parse_descriptor
from udfs.records import record_data_type
from udfs.serving import BAD_RECORD, NO_MODEL, SCORED, LoadedModel, ModelServer, Withdrawal, now_ms

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
#: Event time of the end-of-input flush timer: only the final watermark of a bounded input
#: reaches it (the Kafka jobs have no watermarks), so a finite stream never ends with records
#: still waiting for their processing-time timer.
END_OF_INPUT = 2 ** 62


def subtask_index(runtime_context: RuntimeContext) -> int:
    try:
        return runtime_context.get_index_of_this_subtask()
    except AttributeError:
        # PyFlink 2.2 in thread mode asks the Java RuntimeContext for getIndexOfThisSubtask,
        # which Flink 2 moved to its TaskInfo
        return runtime_context._runtime_context.getTaskInfo().getIndexOfThisSubtask()


def model_data_type(raw: bytes) -> str:
    """Key of a model descriptor: its data type; "" when it does not parse (it is
    dead-lettered by the join)."""
    try:
        return parse_descriptor(raw).dataType
    except ModelError:
        return ""


def spread_key(raw: bytes, keys: tuple[int, ...]) -> int:
    """Spreads the records of one data type over every parallel instance; a hash of the
    bytes keeps a record's key stable across restarts."""
    return keys[zlib.crc32(raw) % len(keys)]


def _rotate_left(value: int, bits: int) -> int:
    return ((value << bits) | (value >> (32 - bits))) & 0xFFFFFFFF


def key_group_of(key: int, max_parallelism: int) -> int:
    """Flink's key group of a PyFlink INT key: murmur3's mixing of the key's Java hashCode,
    modulo the maximum parallelism. PyFlink keys by a one-field Row, whose hashCode is
    key + 62; a job test checks the whole computation against Flink's own routing."""
    h = (key + 62) & 0xFFFFFFFF
    h = _rotate_left((h * 0xCC9E2D51) & 0xFFFFFFFF, 15)
    h = _rotate_left((h * 0x1B873593) & 0xFFFFFFFF, 13)
    h = (h * 5 + 0xE6546B64) & 0xFFFFFFFF
    h ^= 4
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & 0xFFFFFFFF
    h ^= h >> 16
    signed = h - (1 << 32) if h & 0x80000000 else h
    positive = -signed if signed != -(1 << 31) else 0
    return (signed if signed >= 0 else positive) % max_parallelism


def balanced_spread_keys(parallelism: int, per_instance: int, max_parallelism: int = 128) -> tuple[int, ...]:
    """Spreading keys that Flink routes evenly: ``per_instance`` keys for every parallel
    instance. Few keys mean full micro-batches (a batch is per key); keys picked blindly
    could leave an instance with none."""
    wanted = {index: [] for index in range(parallelism)}
    key = 0
    while any(len(keys) < per_instance for keys in wanted.values()):
        index = key_group_of(key, max_parallelism) * parallelism // max_parallelism
        if len(wanted[index]) < per_instance:
            wanted[index].append(key)
        key += 1
    return tuple(k for index in range(parallelism) for k in wanted[index])


class ServingMetrics:
    """Counts under the operator's ``modelserving`` group, in total and per data type
    (``modelserving.datatype.<type>.*``), plus the current model's version and age.

    Counts are kept in Python and exposed as gauges, read when a bundle ends: PyFlink
    (2.2, process mode) drops counter and distribution updates made while a timer fires,
    and micro-batches are mostly scored from their flush timer."""

    def __init__(self, runtime_context: RuntimeContext):
        self.group = runtime_context.get_metrics_group().add_group("modelserving")
        self.total = _Counters(self.group)
        self.bad_models = _Count(self.group, "dead_letters_models")
        self.models_loaded = _Count(self.group, "models_loaded")
        self._per_type: dict[str, _Counters] = {}

    def for_type(self, data_type: str) -> "_Counters":
        counters = self._per_type.get(data_type)
        if counters is None:
            counters = _Counters(self.group.add_group("datatype", data_type or "(none)"), per_type=True)
            self._per_type[data_type] = counters
        return counters

    def count(self, outcomes) -> None:
        """Count a batch's outcomes."""
        kinds: dict[tuple[str, str], list] = {}
        for outcome in outcomes:
            kinds.setdefault((outcome.data_type, outcome.kind), []).append(outcome)
        for (data_type, kind), same in kinds.items():
            self.total.count(kind, same)
            self.for_type(data_type).count(kind, same)


class _Count:
    """A monotonic count, exposed as a gauge."""

    def __init__(self, group, name: str):
        self.value = 0
        group.gauge(name, lambda: self.value)

    def inc(self, n: int = 1) -> None:
        self.value += n


class _Counters:
    def __init__(self, group, per_type: bool = False):
        self.scored = _Count(group, "records_scored")
        self.no_model = _Count(group, "records_no_model")
        self.bad_records = _Count(group, "dead_letters_records")
        self._by_kind = {SCORED: self.scored, NO_MODEL: self.no_model, BAD_RECORD: self.bad_records}
        self._micros_total = 0.0
        group.gauge("scoring_micros", lambda: int(self._micros_total / self.scored.value)
                    if self.scored.value else 0)   # mean model time per scored record
        self.model: LoadedModel | None = None
        if per_type:
            group.gauge("model_version", lambda: _numeric(self.model.info.version) if self.model else -1)
            group.gauge("model_age_seconds",
                        lambda: (now_ms() - self.model.since_ms) // 1000 if self.model else -1)

    def count(self, kind: str, outcomes) -> None:
        self._by_kind[kind].inc(len(outcomes))
        if kind == SCORED:
            self._micros_total += sum(outcome.micros for outcome in outcomes)


def _numeric(version: str) -> int:
    """Gauges are numbers: a version like "3" or "v3" reads 3, anything else -1."""
    digits = version.lstrip("vV")
    return int(digits) if digits.isdigit() else -1


class StatsPublisher:
    """Sends ModelStats snapshots to the compacted state topic from the Python worker.

    Statistics are snapshots (the last one per key wins), so at-least-once delivery is
    enough; they go through a plain Kafka producer because PyFlink's Kafka sink cannot set a
    record key from a Python element without a Java serializer. A failure to publish is
    logged and never fails serving."""

    RETRY_AFTER_MS = 30_000

    def __init__(self, settings):
        self.settings = settings
        self._producer = None
        self._failed_at = 0

    def publish(self, key: str, value: bytes) -> None:
        if not self.settings.state_topic:
            return
        try:
            if self._producer is None:
                if now_ms() - self._failed_at < self.RETRY_AFTER_MS:
                    return
                self._producer = self._connect()
            self._producer.send(self.settings.state_topic, key=key.encode(), value=value)
        except Exception as exc:  # statistics must never stop serving
            log.warning("publishing statistics to %s failed: %s", self.settings.state_topic, exc)
            self._failed_at, self._producer = now_ms(), None

    def _connect(self):
        from kafka import KafkaProducer

        known = set(KafkaProducer.DEFAULT_CONFIG)
        extra = {k.replace(".", "_"): v for k, v in self.settings.kafka_properties().items()
                 if k.replace(".", "_") in known}
        return KafkaProducer(bootstrap_servers=self.settings.bootstrap_servers, acks=1,
                             linger_ms=100, **extra)

    def close(self) -> None:
        if self._producer is not None:
            try:
                self._producer.close(timeout=5)
            except Exception as exc:
                log.warning("closing the statistics producer failed: %s", exc)


class ServingJoin:
    """What both joins do with a record and with a model, whatever their state looks like."""

    def __init__(self, settings):
        self.settings = settings
        self.server: ModelServer | None = None

    def open_serving(self, runtime_context: RuntimeContext) -> None:
        log.setLevel(self.settings.log_level)  # the worker's root logger forwards to Flink's log
        self.subtask = subtask_index(runtime_context)
        self.job = self.settings.job_name
        self.publisher = StatsPublisher(self.settings)
        self.stats = runtime_context.get_map_state(MapStateDescriptor(MODEL_STATS, Types.STRING(), BYTES))
        self.stats_timer = runtime_context.get_state(ValueStateDescriptor("stats-timer", Types.LONG()))
        self.server = ModelServer(model_dirs=self.settings.model_dirs,
                                  max_model_bytes=self.settings.max_model_bytes,
                                  max_inline_model_bytes=self.settings.max_inline_model_bytes,
                                  data_topic=self.settings.data_topic,
                                  models_topic=self.settings.models_topic, subtask=self.subtask)
        self.metrics = ServingMetrics(runtime_context)

        self.batch_max_size = max(1, self.settings.batch_max_size)
        self.pending = (runtime_context.get_list_state(ListStateDescriptor(PENDING_RECORDS, BYTES))
                        if self.batch_max_size > 1 else None)
        # key -> the records in its list state: scoring a batch reads them from here, sparing a
        # state read (a round trip to the JVM); a key's state is read once after (re)start
        self._pending_copy: dict = {}
        self._pending_read: set = set()
        self._flush_due: dict = {}        # key -> processing time of its registered flush timer
        self._end_timers: set = set()     # keys whose end-of-input timer is registered

    def close(self):
        if self.server is not None:
            self.server.close()
            self.publisher.close()

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
        scored when it is full, when its wait is over, or before a model change (keyed)."""
        if self.pending is None:
            yield from self.serve_batch(ctx, self.data_type_in(key, raw), self.part_of(key), [raw])
            return
        batch = self._pending_records(key)
        self.pending.add(raw)
        batch.append(raw)
        if len(batch) >= self.batch_max_size:
            yield from self.flush(ctx, key)
            return
        if key not in self._flush_due:
            timers = ctx.timer_service()
            due = timers.current_processing_time() + self.settings.batch_max_wait_ms
            timers.register_processing_time_timer(due)
            self._flush_due[key] = due
        if key not in self._end_timers:
            ctx.timer_service().register_event_time_timer(END_OF_INPUT)
            self._end_timers.add(key)

    def flush(self, ctx, key):
        """Score everything pending for ``key``: one batch per data type, in arrival order."""
        if self.pending is None:
            return
        raws = self._pending_records(key)
        if not raws:
            return
        self._pending_copy[key] = []
        self.pending.clear()
        by_type: dict[str, list[bytes]] = {}
        for raw in raws:
            by_type.setdefault(self.data_type_in(key, raw), []).append(raw)
        part = self.part_of(key)
        for data_type, batch in by_type.items():
            for start in range(0, len(batch), self.batch_max_size):
                yield from self.serve_batch(ctx, data_type, part,
                                            batch[start:start + self.batch_max_size])

    def _pending_records(self, key) -> list[bytes]:
        if key not in self._pending_read:   # first use since (re)start: records restored?
            self._pending_copy[key] = list(self.pending.get() or ())
            self._pending_read.add(key)
        return self._pending_copy.setdefault(key, [])

    def serve_batch(self, ctx, data_type: str, part: int, raws: list[bytes]):
        """Yield the records' results, and dead letters on the side output; keep statistics."""
        model, error = None, None
        if data_type:
            model_id, stored_descriptor = self.model_lookup(ctx, data_type)
            try:
                model = self.server.current(data_type, model_id, stored_descriptor)
            except ModelError as exc:
                error = exc
        outcomes = self.server.serve(raws, model, error)
        self.metrics.count(outcomes)
        for outcome in outcomes:
            if outcome.is_dead_letter:
                yield DEAD_LETTERS, outcome.payload
            else:
                yield outcome.payload
        if data_type:
            self.metrics.for_type(data_type).model = model
            self.track(ctx, data_type, part, model, outcomes)

    # -- statistics ---------------------------------------------------------------------

    def track(self, ctx, data_type: str, part: int, model: LoadedModel | None, outcomes=()) -> None:
        """Update this key's statistics of ``data_type``; publish at once on a model change,
        else when the periodic timer fires."""
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
        self.publisher.publish(statistics.stats_key(stats.job, stats.dataType, stats.part),
                               statistics.stamped(stats, self.subtask))

    def on_timer(self, timestamp, ctx):
        key = ctx.get_current_key()
        if ctx.time_domain() == TimeDomain.EVENT_TIME:      # the end of a bounded input
            self._end_timers.discard(key)
            yield from self.flush(ctx, key)
            return
        due = self._flush_due.get(key)
        if self.pending is not None and (due is None or due <= timestamp):
            # (due is None after a restore: flushing early is harmless, losing a timer is not)
            self._flush_due.pop(key, None)
            yield from self.flush(ctx, key)
        stats_due = self.stats_timer.value()
        if stats_due is not None and stats_due <= timestamp:
            self.stats_timer.clear()
            for _, raw in self.stats.items():
                self.publish(ModelStats.FromString(raw))

    def accept_model(self, raw: bytes, report: bool = True):
        """Build a model from a descriptor; a bad one is dead-lettered (when ``report``) and
        None returned, so the caller leaves the serving model in place."""
        try:
            return self.server.build(raw), None
        except ModelError as exc:
            if report:
                log.warning("model rejected: %s", exc)
                self.metrics.bad_models.inc()
                return None, self.server.model_dead_letter(raw, exc)
            return None, None

    def installed(self, data_type: str, model: LoadedModel | Withdrawal) -> None:
        """Swap the cache after the state was updated, and say so."""
        if isinstance(model, Withdrawal):
            self.server.install(data_type, None)
            self.metrics.for_type(data_type).model = None
            log.info("model withdrawn for data type '%s' (subtask %d)", data_type, self.subtask)
            return
        replaced = self.server.install(data_type, model)
        self.metrics.models_loaded.inc()
        self.metrics.for_type(data_type).model = model
        if replaced is not None:
            log.info("loaded %s, replacing %s (subtask %d)", model.info, replaced.info, self.subtask)
        else:
            log.info("loaded %s (subtask %d)", model.info, self.subtask)


class KeyedServing(ServingJoin, KeyedCoProcessFunction):
    """Input 1: record bytes, input 2: descriptor bytes, both keyed by data type."""

    def open(self, runtime_context: RuntimeContext):
        self.open_serving(runtime_context)
        self.model_id = runtime_context.get_state(ValueStateDescriptor("model-id", Types.STRING()))
        self.descriptor = runtime_context.get_state(ValueStateDescriptor("model-descriptor", BYTES))

    def model_lookup(self, ctx, data_type):
        return self.model_id.value(), self.descriptor.value

    def data_type_in(self, key, raw):
        return key

    def part_of(self, key):
        return statistics.KEYED_PART

    def process_element1(self, raw, ctx):
        yield from self.on_record(ctx, ctx.get_current_key(), raw)

    def process_element2(self, raw, ctx):
        data_type = ctx.get_current_key()
        # records that arrived before this model are scored by the model they arrived under
        yield from self.flush(ctx, data_type)
        model, dead_letter = self.accept_model(raw)
        if model is None:
            yield DEAD_LETTERS, dead_letter
            return
        if isinstance(model, Withdrawal):
            self.model_id.clear()
            self.descriptor.clear()
        else:
            self.model_id.update(model.info.model_id)
            self.descriptor.update(model.raw)
        self.installed(data_type, model)
        self.track(ctx, data_type, statistics.KEYED_PART, None if isinstance(model, Withdrawal) else model)


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
        yield from self.on_record(ctx, ctx.get_current_key(), raw)

    def process_broadcast_element(self, raw, ctx):
        model, dead_letter = self.accept_model(raw, report=self.subtask == 0)
        if model is None:
            if dead_letter is not None:
                yield DEAD_LETTERS, dead_letter
            return
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
