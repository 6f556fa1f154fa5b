"""The baseline: model serving without Flink, as a competent user would write it.

One process: a kafka-python consumer of the data and models topics, and for every poll,
records grouped by data type and scored as one batch per model, results sent by a
kafka-python producer. It uses the same model runtimes (onnxruntime, TensorFlow, pypmml)
as the jobs; what it lacks is everything Flink adds (state, checkpoints, parallelism,
failure recovery, metrics). The model table and the batch scoring are the ones every peer
shares (``modelserving.bench.peers.scoring``).

    python -m modelserving.bench.plain_loop --bootstrap-servers 127.0.0.1:9092 --data-topic d \
        --models-topic m --results-topic r --model-dirs var/models

Kafka access and topics are job settings (options or ``MODELSERVING_*`` variables), so the
clients are configured like every other one (``jobs.kafka_config``); the consumer group is
``group_id`` (default bench-plain-loop). The loop's own option is ``--max-poll-records``.
"""
from __future__ import annotations

from kafka import KafkaConsumer, KafkaProducer

from jobs.kafka_config import MAX_MESSAGE_BYTES, kafka_python
from jobs.settings import Settings
from modelserving.bench.peers.scoring import ModelTable, score, start, stop_flag


def serve(settings: Settings, max_poll_records: int) -> None:
    consumer = KafkaConsumer(settings.data_topic, settings.models_topic, **kafka_python(
        settings, group_id=settings.group_id, auto_offset_reset="earliest", enable_auto_commit=True,
        max_poll_records=max_poll_records, fetch_max_wait_ms=5,
        max_partition_fetch_bytes=MAX_MESSAGE_BYTES, fetch_max_bytes=MAX_MESSAGE_BYTES))
    producer = KafkaProducer(**kafka_python(settings, acks=1, linger_ms=2, batch_size=256 * 1024))
    table = ModelTable(settings.resolved_model_dirs())
    stopping = stop_flag()
    while not stopping:
        raws = []
        for partition, messages in consumer.poll(timeout_ms=100).items():
            if partition.topic == settings.models_topic:
                for message in messages:
                    table.install(message.value)
            else:
                raws += [message.value for message in messages]
        for result in score(table, raws):
            producer.send(settings.results_topic, result)
    consumer.close()
    producer.close()


def main(argv=None) -> None:
    args, settings = start("modelserving.bench.plain_loop", argv, lambda parser: parser.add_argument(
        "--max-poll-records", type=int, default=500), "bench-plain-loop")
    serve(settings, args.max_poll_records)


if __name__ == "__main__":
    main()
