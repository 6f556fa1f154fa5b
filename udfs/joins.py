"""The Flink side of serving: state, metrics and side outputs around ``ModelServer``.

The keyed join keeps, per data type (the key), the current model's descriptor bytes and id
in checkpointed keyed state. Records and models of one data type meet on one subtask.
"""
from __future__ import annotations

import logging

from pyflink.common import Types
from pyflink.datastream import KeyedCoProcessFunction, OutputTag, RuntimeContext
from pyflink.datastream.state import ValueStateDescriptor

from udfs.errors import ModelError
from udfs.models import parse_descriptor
from udfs.records import record_data_type
from udfs.serving import BAD_RECORD, NO_MODEL, SCORED, LoadedModel, ModelServer, Withdrawal

log = logging.getLogger("modelserving")

BYTES = Types.PRIMITIVE_ARRAY(Types.BYTE())
KEYED_BYTES = Types.TUPLE([Types.STRING(), BYTES])
DEAD_LETTERS = OutputTag("dead-letters", BYTES)


def keyed_record(raw: bytes) -> tuple[str, bytes]:
    """(data type, raw bytes) of a record; "" for records that do not parse (they dead-letter later)."""
    return record_data_type(raw), raw


def keyed_model(raw: bytes) -> tuple[str, bytes]:
    """(data type, raw bytes) of a model descriptor; "" when it does not parse."""
    try:
        return parse_descriptor(raw).dataType, raw
    except ModelError:
        return "", raw


class ServingMetrics:
    """Counters every join reports, under the operator's ``modelserving`` group."""

    def __init__(self, runtime_context: RuntimeContext):
        group = runtime_context.get_metrics_group().add_group("modelserving")
        self.scored = group.counter("records_scored")
        self.no_model = group.counter("records_no_model")
        self.bad_records = group.counter("dead_letters_records")
        self.bad_models = group.counter("dead_letters_models")
        self.models_loaded = group.counter("models_loaded")
        self.scoring_micros = group.distribution("scoring_micros")
        self._by_kind = {SCORED: self.scored, NO_MODEL: self.no_model, BAD_RECORD: self.bad_records}

    def count(self, outcome) -> None:
        self._by_kind[outcome.kind].inc()
        if outcome.kind == SCORED:
            self.scoring_micros.update(int(outcome.micros))


def model_server(settings, runtime_context: RuntimeContext) -> ModelServer:
    return ModelServer(model_dirs=settings.model_dirs, max_model_bytes=settings.max_model_bytes,
                       data_topic=settings.data_topic, models_topic=settings.models_topic,
                       subtask=runtime_context.get_index_of_this_subtask())


class KeyedServing(KeyedCoProcessFunction):
    """Input 1: (data type, record bytes); input 2: (data type, descriptor bytes)."""

    def __init__(self, settings):
        self.settings = settings
        self.server: ModelServer | None = None

    def open(self, runtime_context: RuntimeContext):
        self.server = model_server(self.settings, runtime_context)
        self.metrics = ServingMetrics(runtime_context)
        self.model_id = runtime_context.get_state(ValueStateDescriptor("model-id", Types.STRING()))
        self.descriptor = runtime_context.get_state(ValueStateDescriptor("model-descriptor", BYTES))

    def close(self):
        if self.server is not None:
            self.server.close()

    def process_element1(self, value, ctx):
        data_type, raw = value
        model, error = None, None
        if data_type:
            try:
                model = self.server.current(data_type, self.model_id.value(), self.descriptor.value)
            except ModelError as exc:
                error = exc
        for outcome in self.server.serve((raw,), model, error):
            self.metrics.count(outcome)
            if outcome.is_dead_letter:
                yield DEAD_LETTERS, outcome.payload
            else:
                yield outcome.payload

    def process_element2(self, value, ctx):
        data_type, raw = value
        try:
            model = self.server.build(raw)
        except ModelError as exc:
            log.warning("model rejected: %s", exc)
            self.metrics.bad_models.inc()
            yield DEAD_LETTERS, self.server.model_dead_letter(raw, exc)
            return
        if isinstance(model, Withdrawal):
            self.server.install(data_type, None)
            self.model_id.clear()
            self.descriptor.clear()
            log.info("model withdrawn for data type '%s'", data_type)
            return
        replaced = self.server.install(data_type, model)
        self.model_id.update(model.info.model_id)
        self.descriptor.update(model.raw)
        self.metrics.models_loaded.inc()
        log.info("%s %s", "replaced by" if replaced else "loaded", model.info)


__all__ = ["BYTES", "DEAD_LETTERS", "KEYED_BYTES", "KeyedServing", "LoadedModel", "keyed_model",
           "keyed_record"]
