"""The baseline: model serving without Flink, as a competent user would write it.

One process: a kafka-python consumer of the data and models topics, and for every poll,
records grouped by data type and scored as one batch per model, results sent by a
kafka-python producer. It uses the same model runtimes (onnxruntime, TensorFlow, pypmml)
as the jobs; what it lacks is everything Flink adds (state, checkpoints, parallelism,
failure recovery, metrics).

    python -m modelserving.bench.plain_loop --bootstrap-servers 127.0.0.1:9092 --data-topic d \
        --models-topic m --results-topic r --model-dirs var/models

Kafka access and topics are job settings (options or ``MODELSERVING_*`` variables), so the
clients are configured like every other one (``jobs.kafka_config``); the consumer group is
``group_id`` (default bench-plain-loop). The loop's own option is ``--max-poll-records``.
"""
from __future__ import annotations

import argparse
import logging
import signal
import time
from pathlib import Path

import numpy as np
from kafka import KafkaConsumer, KafkaProducer

from jobs.kafka_config import MAX_MESSAGE_BYTES, kafka_python
from jobs.settings import Settings
from protos import DataRecord, ModelDescriptor, ServingResult
from udfs.models import load_request
from udfs.records import to_batch
from udfs.runtimes import load_model

log = logging.getLogger("plain-loop")


def serve(settings: Settings, group_id: str, max_poll_records: int) -> None:
    consumer = KafkaConsumer(settings.data_topic, settings.models_topic, **kafka_python(
        settings, group_id=group_id, auto_offset_reset="earliest", enable_auto_commit=True,
        max_poll_records=max_poll_records, fetch_max_wait_ms=5,
        max_partition_fetch_bytes=MAX_MESSAGE_BYTES, fetch_max_bytes=MAX_MESSAGE_BYTES))
    producer = KafkaProducer(**kafka_python(settings, acks=1, linger_ms=2, batch_size=256 * 1024))
    model_dirs = list(settings.resolved_model_dirs())
    models = {}                  # data type -> (descriptor, runtime)
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    while not stopping:
        polled = consumer.poll(timeout_ms=100)
        by_type: dict[str, list[DataRecord]] = {}
        for partition, messages in polled.items():
            if partition.topic == settings.models_topic:
                for message in messages:
                    install(models, message.value, model_dirs)
                continue
            for message in messages:
                try:
                    record = DataRecord.FromString(message.value)
                except Exception as exc:  # a bad record is logged and skipped
                    log.warning("bad record: %s", exc)
                    continue
                by_type.setdefault(record.dataType, []).append(record)
        for data_type, records in by_type.items():
            if data_type not in models:
                continue
            descriptor, runtime = models[data_type]
            rows = [[record.features[name] for name in runtime.input_names] for record in records]
            started = time.perf_counter()
            predictions = runtime.score(to_batch(rows, runtime.input_names))
            micros = (time.perf_counter() - started) * 1e6 / len(records)
            served = int(time.time() * 1000)
            for record, prediction in zip(records, predictions):
                result = ServingResult(
                    status=ServingResult.SCORED, dataType=data_type, recordId=record.id,
                    recordTs=record.ts, modelName=descriptor.name, modelVersion=descriptor.version,
                    modelType=descriptor.modeltype, score=prediction.value, label=prediction.label,
                    probabilities=prediction.probabilities, classLabels=prediction.class_labels,
                    scoringMicros=micros, servedMs=served)
                producer.send(settings.results_topic, result.SerializeToString())
    consumer.close()
    producer.close()


def install(models: dict, raw: bytes, model_dirs) -> None:
    try:
        descriptor = ModelDescriptor.FromString(raw)
        runtime = load_model(load_request(descriptor, model_dirs, 1 << 30))
    except Exception as exc:
        log.warning("bad model: %s", exc)
        return
    models[descriptor.dataType] = (descriptor, runtime)
    log.info("serving %s v%s for %s", descriptor.name, descriptor.version, descriptor.dataType)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m modelserving.bench.plain_loop",
                                     description="job settings (--bootstrap-servers, --data-topic, "
                                     "...) are accepted too")
    parser.add_argument("--max-poll-records", type=int, default=500)
    args, rest = parser.parse_known_args(argv)
    settings = Settings.from_sources(rest)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    np.seterr(all="ignore")
    serve(settings, settings.group_id or "bench-plain-loop", args.max_poll_records)


if __name__ == "__main__":
    main()
