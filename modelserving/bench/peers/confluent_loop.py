"""A plain confluent-kafka (librdkafka) loop: the fastest Python peer one can write by hand.

Per turn: ``consume(num_messages=N)`` from the data topic (in the consumer group, so N
copies of this process share the partitions), the records grouped by data type and scored
as one batch per model, results handed to a librdkafka producer (``produce`` and
``poll(0)``: librdkafka batches and sends them in its own thread). Every process keeps the
whole model table: a second consumer, outside the group, is assigned every partition of the
models topic from the beginning, and is drained without waiting before each turn.

    python -m modelserving.bench.peers.confluent_loop --bootstrap-servers 127.0.0.1:9092 \
        --data-topic d --models-topic m --results-topic r --model-dirs var/models

Options of its own: ``--batch`` (messages per consume, default 1000) and ``--wait-ms`` (the
longest a consume waits for a batch to fill, default 5). The consumer group is
``group_id`` (default bench-confluent-loop).
"""
from __future__ import annotations

import os

from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from jobs.kafka_config import confluent
from jobs.settings import Settings
from modelserving.bench.peers.scoring import (CONSUMER_CONFIG, PRODUCER_CONFIG, ModelTable, score,
                                              start, stop_flag)


def models_consumer(settings: Settings) -> Consumer:
    """Every partition of the models topic from its beginning, in no consumer group (each
    process must see every model): assigned, never committed."""
    consumer = Consumer(confluent(settings, **CONSUMER_CONFIG, **{
        "group.id": f"{settings.group_id}-models-{os.getpid()}", "enable.auto.commit": False}))
    topic = consumer.list_topics(settings.models_topic, timeout=30).topics[settings.models_topic]
    if topic.error is not None:
        raise RuntimeError(f"models topic {settings.models_topic}: {topic.error}")
    consumer.assign([TopicPartition(settings.models_topic, p, OFFSET_BEGINNING)
                     for p in sorted(topic.partitions)])
    return consumer


def serve(settings: Settings, batch: int, wait_ms: int) -> None:
    consumer = Consumer(confluent(settings, **CONSUMER_CONFIG, **{
        "group.id": settings.group_id, "auto.offset.reset": "earliest",
        "enable.auto.commit": True}))
    consumer.subscribe([settings.data_topic])
    models = models_consumer(settings)
    producer = Producer(confluent(settings, **PRODUCER_CONFIG))
    table = ModelTable(settings.resolved_model_dirs())
    stopping = stop_flag()
    wait_s = wait_ms / 1000
    while not stopping:
        for message in models.consume(num_messages=100, timeout=0):
            if message.error() is None:
                table.install(message.value())
        raws = [m.value() for m in consumer.consume(num_messages=batch, timeout=wait_s)
                if m.error() is None]
        for result in score(table, raws):
            producer.produce(settings.results_topic, result)
        producer.poll(0)
    consumer.close()
    models.close()
    producer.flush(10)


def main(argv=None) -> None:
    def options(parser):
        parser.add_argument("--batch", type=int, default=1000, help="messages per consume")
        parser.add_argument("--wait-ms", type=int, default=5,
                            help="longest wait for a consume to fill its batch")

    args, settings = start("modelserving.bench.peers.confluent_loop", argv, options,
                           "bench-confluent-loop")
    serve(settings, args.batch, args.wait_ms)


if __name__ == "__main__":
    main()
