"""The pass-through job: the serving jobs' Kafka source, batches, sink and settings, and one
Python crossing per batch, with parsing and serializing but no model. What Flink plus Kafka
cost before any scoring; the benchmark's yardstick for the jobs.

    python -m modelserving.bench.passthrough_job --bootstrap-servers host:9092 --data-topic d --results-topic r
"""
from __future__ import annotations

import logging
import sys

from pyflink.common import Row
from pyflink.table import StreamTableEnvironment

from jobs.pipeline import create_environment, flattened, kafka_sink, log, record_batches
from jobs.settings import Settings
from protos import ServingResult
from udfs.errors import RecordError
from udfs.flink.batches import RESULT_BATCH
from udfs.records import parse_record
from udfs.serving import now_ms

JOB = "pass-through"


def pass_through(raw: bytes) -> bytes:
    """Parse like the jobs do and answer with an unscored result."""
    try:
        record = parse_record(raw)
    except RecordError:
        return ServingResult(status=ServingResult.NO_MODEL, servedMs=now_ms()).SerializeToString()
    return ServingResult(status=ServingResult.NO_MODEL, dataType=record.data_type,
                         recordId=record.record_id, recordTs=record.ts,
                         servedMs=now_ms()).SerializeToString()


def pass_through_batch(batch) -> Row:
    return Row([pass_through(raw) for raw in batch[2]])


def build_pipeline(batches, settings: Settings):
    return batches.map(pass_through_batch, output_type=RESULT_BATCH) \
        .name("parse and re-serialize").uid("pass-through")


def main(argv: list[str] | None = None) -> None:
    settings = Settings.from_sources(sys.argv[1:] if argv is None else argv,
                                     prog="python -m modelserving.bench.passthrough_job").for_job(JOB)
    logging.basicConfig(level=settings.log_level)
    log.info("starting %s with settings %s", settings.job_name, settings.describe())
    env = create_environment(settings)
    t_env = StreamTableEnvironment.create(env)
    batches = record_batches(t_env, settings, JOB)
    flattened(t_env, build_pipeline(batches, settings)) \
        .sink_to(kafka_sink(settings, settings.results_topic, "results")) \
        .name("results: " + settings.results_topic).uid("pass-through-results-sink")
    env.execute(settings.job_name)


if __name__ == "__main__":
    main()
