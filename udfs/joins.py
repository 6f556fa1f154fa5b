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
from pyflink.datastream.state import MapStateDescriptor, ValueStateDescriptor

from protos import ModelStats
from udfs import statistics
from udfs.errors import ModelError
from udfs.models import parse_descriptor
from udfs.records import record_data_type
from udfs.serving import BAD_RECORD, NO_MODEL, SCORED, LoadedModel, ModelServer, Withdrawal, now_ms

log = logging.getLogger("modelserving")

BYTES = Types.PRIMITIVE_ARRAY(Types.BYTE())
KEYED_BYTES = Types.TUPLE([Types.STRING(), BYTES])
SPREAD_BYTES = Types.TUPLE([Types.INT(), Types.STRING(), BYTES])
DEAD_LETTERS = OutputTag("dead-letters", BYTES)

#: Broadcast state of the broadcast join: data type -> descriptor bytes, data type -> model id.
MODEL_DESCRIPTORS = MapStateDescriptor("model-descriptors", Types.STRING(), BYTES)
MODEL_IDS = MapStateDescriptor("model-ids", Types.STRING(), Types.STRING())
#: Keyed state of both joins: data type -> ModelStats bytes (the key's share of the statistics).
MODEL_STATS = "model-stats"


def keyed_record(raw: bytes) -> tuple[str, bytes]:
    """(data type, raw bytes) of a record; "" for records that do not parse (they dead-letter later)."""
    return record_data_type(raw), raw


def keyed_model(raw: bytes) -> tuple[str, bytes]:
    """(data type, raw bytes) of a model descriptor; "" when it does not parse."""
    try:
        return parse_descriptor(raw).dataType, raw
    except ModelError:
        return "", raw


def spread_record(raw: bytes, spread: int) -> tuple[int, str, bytes]:
    """(spreading key, data type, raw bytes): the key spreads records of one data type over
    every parallel instance; a hash of the bytes keeps it stable across restarts."""
    return zlib.crc32(raw) % spread, record_data_type(raw), raw


class ServingMetrics:
    """Counters under the operator's ``modelserving`` group, in total and per data type
    (``modelserving.datatype.<type>.*``), plus the current model's version and age."""

    def __init__(self, runtime_context: RuntimeContext):
        self.group = runtime_context.get_metrics_group().add_group("modelserving")
        self.total = _Counters(self.group)
        self.bad_models = self.group.counter("dead_letters_models")
        self.models_loaded = self.group.counter("models_loaded")
        self._per_type: dict[str, _Counters] = {}

    def for_type(self, data_type: str) -> "_Counters":
        counters = self._per_type.get(data_type)
        if counters is None:
            counters = _Counters(self.group.add_group("datatype", data_type or "(none)"), gauges=True)
            self._per_type[data_type] = counters
        return counters

    def count(self, outcome) -> None:
        self.total.count(outcome)
        self.for_type(outcome.data_type).count(outcome)


class _Counters:
    def __init__(self, group, gauges: bool = False):
        self.scored = group.counter("records_scored")
        self.no_model = group.counter("records_no_model")
        self.bad_records = group.counter("dead_letters_records")
        self.scoring_micros = group.distribution("scoring_micros")
        self._by_kind = {SCORED: self.scored, NO_MODEL: self.no_model, BAD_RECORD: self.bad_records}
        self.model: LoadedModel | None = None
        if gauges:
            group.gauge("model_version", lambda: _numeric(self.model.info.version) if self.model else -1)
            group.gauge("model_age_seconds",
                        lambda: (now_ms() - self.model.since_ms) // 1000 if self.model else -1)

    def count(self, outcome) -> None:
        self._by_kind[outcome.kind].inc()
        if outcome.kind == SCORED:
            self.scoring_micros.update(int(outcome.micros))


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
        self.subtask = runtime_context.get_index_of_this_subtask()
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

    def close(self):
        if self.server is not None:
            self.server.close()
            self.publisher.close()

    def serve_record(self, ctx, data_type: str, part: int, raw: bytes, model_id, stored_descriptor):
        """Yield the record's result, or its dead letter on the side output; keep statistics."""
        model, error = None, None
        if data_type:
            try:
                model = self.server.current(data_type, model_id, stored_descriptor)
            except ModelError as exc:
                error = exc
        outcomes = self.server.serve((raw,), model, error)
        for outcome in outcomes:
            self.metrics.count(outcome)
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
        self.stats_timer.clear()
        for _, raw in self.stats.items():
            self.publish(ModelStats.FromString(raw))
        yield from ()

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
    """Input 1: (data type, record bytes); input 2: (data type, descriptor bytes)."""

    def open(self, runtime_context: RuntimeContext):
        self.open_serving(runtime_context)
        self.model_id = runtime_context.get_state(ValueStateDescriptor("model-id", Types.STRING()))
        self.descriptor = runtime_context.get_state(ValueStateDescriptor("model-descriptor", BYTES))

    def process_element1(self, value, ctx):
        data_type, raw = value
        yield from self.serve_record(ctx, data_type, statistics.KEYED_PART, raw,
                                     self.model_id.value() if data_type else None,
                                     self.descriptor.value)

    def process_element2(self, value, ctx):
        data_type, raw = value
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
    """Input: (spreading key, data type, record bytes); broadcast input: descriptor bytes.

    Every instance loads every model; only instance 0 reports a bad model, so one bad model
    makes one dead letter whatever the parallelism."""

    def open(self, runtime_context: RuntimeContext):
        self.open_serving(runtime_context)

    def process_element(self, value, ctx):
        part, data_type, raw = value
        ids = ctx.get_broadcast_state(MODEL_IDS)
        model_id = ids.get(data_type) if data_type and ids.contains(data_type) else None
        descriptors = ctx.get_broadcast_state(MODEL_DESCRIPTORS)
        yield from self.serve_record(ctx, data_type, part, raw, model_id,
                                     lambda: descriptors.get(data_type))

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
