"""A bytewax dataflow serving the models, with bytewax's own Kafka connector.

    data topic --KafkaSource--> records --+
                                          +--> merge --> flat_map_batch("score") --KafkaSink--> results
    models topic --every worker-----------+

The data topic's partitions are the source's partitions, spread over the workers; the
models topic is a ``DynamicSource`` that every worker reads whole from the beginning (each
worker must know every model, as a broadcast would give it). Both streams meet in
``flat_map_batch``, which bytewax calls with each batch of items the worker has: it installs
the models in the order they come and scores the records in between, one model call per data
type per batch. ``flat_map_batch`` is stateless, so bytewax never moves its items to
another worker: models and records of one worker meet there. The table lives in the
process; with one worker per process (how Python code scales past the interpreter lock)
it is that worker's own.

Run as bytewax runs any dataflow, one process per worker, the settings as ``MODELSERVING_*``
variables; ``get_flow``'s argument is the most messages the source takes per poll::

    python -m bytewax.run "modelserving.bench.peers.bytewax_flow:get_flow(1000)" -i 0 -a "127.0.0.1:2101;127.0.0.1:2102"
    python -m bytewax.run "modelserving.bench.peers.bytewax_flow:get_flow(1000)" -i 1 -a "127.0.0.1:2101;127.0.0.1:2102"
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from bytewax import operators as op
from bytewax.connectors.kafka import KafkaSink, KafkaSinkMessage, KafkaSource
from bytewax.dataflow import Dataflow
from bytewax.inputs import DynamicSource, StatelessSourcePartition
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from jobs.kafka_config import confluent
from jobs.settings import Settings
from modelserving.bench.peers.scoring import (CONSUMER_CONFIG, PRODUCER_CONFIG, ModelTable, log,
                                              score, start)

@dataclass(frozen=True)
class ModelMessage:
    """A ``ModelDescriptor`` from the models topic, told apart from data records in the merge."""
    raw: bytes


class _ModelsPartition(StatelessSourcePartition[ModelMessage]):
    def __init__(self, config: dict, topic: str, worker_index: int):
        self._consumer = Consumer({**config, "group.id": f"bench-bytewax-models-{os.getpid()}-{worker_index}",
                                   "enable.auto.commit": False})
        partitions = self._consumer.list_topics(topic, timeout=30).topics[topic].partitions
        self._consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in sorted(partitions)])

    def next_batch(self) -> list[ModelMessage]:
        return [ModelMessage(m.value()) for m in self._consumer.consume(100, 0.001) if m.error() is None]

    def close(self) -> None:
        self._consumer.close()


class ModelsSource(DynamicSource[ModelMessage]):
    """The whole models topic on every worker."""

    def __init__(self, config: dict, topic: str):
        self._config, self._topic = config, topic

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _ModelsPartition:
        return _ModelsPartition(self._config, self._topic, worker_index)


class LoggedKafkaSource(KafkaSource):
    """bytewax's Kafka source, saying which worker process reads which partition."""

    def build_part(self, step_id, for_part, resume_state):
        log.info("process %s reads partition %s", os.getpid(), for_part)
        return super().build_part(step_id, for_part, resume_state)


class Scorer:
    """The ``flat_map_batch`` mapper: models installed in their order, records in between
    scored one batch per data type."""

    def __init__(self, table: ModelTable):
        self.table = table

    def __call__(self, items: list) -> list[KafkaSinkMessage]:
        results, raws = [], []
        for item in items:
            if isinstance(item, ModelMessage):
                results += score(self.table, raws)
                raws = []
                self.table.install(item.raw)
            else:
                raws.append(item.value)
        results += score(self.table, raws)
        return [KafkaSinkMessage(None, result) for result in results]


def build_flow(settings: Settings, batch: int = 1000) -> Dataflow:
    client = confluent(settings)
    brokers = client.pop("bootstrap.servers").split(",")
    flow = Dataflow("bench-bytewax")
    records = op.input("data", flow, LoggedKafkaSource(
        brokers, [settings.data_topic], tail=True, starting_offset=OFFSET_BEGINNING,
        add_config={**client, **CONSUMER_CONFIG}, batch_size=batch))
    models = op.input("models", flow, ModelsSource(
        {"bootstrap.servers": ",".join(brokers), **client, **CONSUMER_CONFIG}, settings.models_topic))
    scored = op.flat_map_batch("score", op.merge("merge", models, records),
                               Scorer(ModelTable(settings.resolved_model_dirs())))
    op.output("results", scored, KafkaSink(brokers, settings.results_topic,
                                           add_config={**client, **PRODUCER_CONFIG}))
    return flow


def get_flow(batch: int = 1000) -> Dataflow:
    """The dataflow ``python -m bytewax.run`` runs: settings from the environment, at most
    ``batch`` messages per poll of a data partition (the connector's default)."""
    _, settings = start("modelserving.bench.peers.bytewax_flow", [], lambda parser: None,
                        "bench-bytewax")
    return build_flow(settings, batch)
