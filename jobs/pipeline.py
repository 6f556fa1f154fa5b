"""What both jobs share: the Flink environment, Kafka sources and sinks, and the run loop.

A job's ``build_pipeline`` takes a stream of record batches and a stream of models-topic
messages (``udfs.flink.batches``: ``RECORD_BATCH``, ``MODEL_MESSAGE``) and returns a stream
of result batches (``RESULT_BATCH``) and one of dead-letter bytes; this module plugs Kafka on
both ends. Python is entered once per batch: the batches are formed on Flink's JVM side, by
the Table API's Kafka source (``raw`` format, with each record's partition and offset as
metadata columns) and a processing-time tumbling window of ``batch_max_wait_ms`` per
partition (``ARRAY_AGG``); result batches are flattened on the JVM side too (``UNNEST``)
before the results sink. Tests plug in-memory collections of batches instead.
"""
from __future__ import annotations

import logging
import os
import sysconfig
from pathlib import Path
from typing import Callable

from pyflink.common import Configuration
from pyflink.common.serialization import ByteArraySchema
from pyflink.datastream import CheckpointingMode, DataStream, StreamExecutionEnvironment
from pyflink.datastream.connectors.base import DeliveryGuarantee
from pyflink.datastream.connectors.kafka import KafkaRecordSerializationSchema, KafkaSink
from pyflink.table import DataTypes, Schema, StreamTableEnvironment, Table, TableDescriptor
from pyflink.table.expressions import col
from pyflink.table.types import _to_java_data_type

from jobs.kafka_config import (
    FLINK_SQL_CONNECTOR_PACKAGE,
    MAX_MESSAGE_BYTES,
    java_properties,
    kafka_python,
)
from jobs.settings import Settings
from udfs.flink.joins import shadow_results_of

log = logging.getLogger("modelserving")

#: Kafka's broker default transaction.max.timeout.ms; the connector's own default (1 h) is
#: refused by brokers left at their defaults.
TRANSACTION_TIMEOUT_MS = "900000"
#: How long a job waits for a broker that is down before anything fails: the sinks keep
#: their records (delivery.timeout.ms) and wait to start their next transaction at a
#: checkpoint (max.block.ms), the sources' partition lookups keep retrying
#: (default.api.timeout.ms). Measured with the clients' defaults (2 min, 1 min, 1 min): a
#: 5-minute outage failed the job (the sink's records expired; with those kept, starting
#: the next transaction timed out), and the exactly-once sink's transaction abort on cancel
#: timed out too, which Flink treats as fatal for the whole TaskManager. Shorter than the
#: transaction timeout, so an open transaction survives the wait.
BROKER_WAIT_MS = "600000"
#: Checkpoints that may fail in a row (e.g. time out during a broker outage) before the job
#: restarts; Flink's default is 0.
TOLERABLE_CHECKPOINT_FAILURES = 3

BuildPipeline = Callable[[DataStream, DataStream, Settings], "tuple[DataStream, DataStream]"]


def create_environment(settings: Settings, extra: dict[str, str] | None = None,
                       with_connector: bool = True) -> StreamExecutionEnvironment:
    """The execution environment: local (with web UI on ``rest_port``) or the cluster a
    ``flink run`` submitted to."""
    # PyFlink reads this variable when the job starts; a cluster always uses worker processes
    os.environ["_python_worker_execution_mode"] = settings.local_python_workers
    conf = Configuration()
    conf.set_string("python.executable", settings.python_executable)
    conf.set_string("python.client.executable", settings.python_executable)
    if settings.rest_port:
        conf.set_string("rest.port", str(settings.rest_port))
    if settings.checkpoint_dir:
        conf.set_string("execution.checkpointing.dir", checkpoint_uri(settings.checkpoint_dir))
    for key, value in python_tuning(settings).items():
        conf.set_string(key, value)
    for key, value in (extra or {}).items():
        conf.set_string(key, value)
    env = StreamExecutionEnvironment.get_execution_environment(conf)
    env.set_buffer_timeout(settings.buffer_timeout_ms)
    if settings.object_reuse == "on":
        env.get_config().enable_object_reuse()
    if settings.operator_chaining == "off":
        env.disable_operator_chaining()
    if settings.parallelism > 0:
        env.set_parallelism(settings.parallelism)
    if settings.checkpoint_interval_ms > 0:
        env.enable_checkpointing(settings.checkpoint_interval_ms, CheckpointingMode.EXACTLY_ONCE)
        # a checkpoint cannot complete while the broker is down (the sinks flush into it);
        # the one that times out meanwhile must not fail the job that is waiting for it
        env.get_checkpoint_config().set_tolerable_checkpoint_failure_number(
            TOLERABLE_CHECKPOINT_FAILURES)
    jar = connector_jar(settings) if with_connector else None
    if jar is not None:
        env.add_jars(jar.as_uri())
    return env


def checkpoint_uri(location: str) -> str:
    """A URI as Flink wants it: a plain path becomes file://, a URI stays as it is."""
    return location if "://" in location else Path(location).expanduser().resolve().as_uri()


def python_tuning(settings: Settings) -> dict[str, str]:
    """How Python functions run; the job sets these itself, so a local run and ``flink run``
    behave the same (the benchmark's results page gives the measured effect of each)."""
    tuning = {"python.execution-mode": settings.python_execution_mode,
              "python.fn-execution.bundle.size": str(settings.bundle_size),
              "python.fn-execution.bundle.time": str(settings.bundle_time_ms)}
    if settings.python_execution_mode == "thread":
        # the interpreter embedded in the JVM starts without the virtual environment's
        # packages (pemja itself included) and without this project on its path
        tuning["python.pythonpath"] = os.pathsep.join(
            [sysconfig.get_paths()["purelib"], str(Path(__file__).resolve().parent.parent)])
    return tuning


def connector_jar(settings: Settings) -> Path | None:
    """The connector jar to add to the job; None when it is on Flink's classpath already
    (a cluster's ``lib/``, or ``flink run --jarfile``). The tooling always passes the jar it
    fetched."""
    if not settings.connector_jar:
        log.info("no connector_jar given: the Flink Kafka connector must be on Flink's classpath")
        return None
    return Path(settings.connector_jar).resolve()


def connector_properties(settings: Settings) -> dict[str, str]:
    """The Kafka client properties for the connector in use. The SQL connector jar (the one
    the tooling fetches, and the one to put on a cluster's classpath) relocates the Kafka
    client, so a JAAS line must name the relocated login module; a plain connector jar
    with its own kafka-clients takes the usual name."""
    jar = Path(settings.connector_jar).name if settings.connector_jar else ""
    relocated = not jar or "sql-connector" in jar
    return java_properties(settings, FLINK_SQL_CONNECTOR_PACKAGE if relocated else "")


def stats_producer_config(settings: Settings) -> dict:
    """The statistics producer inside the serving function: computed here, on the client,
    so the function needs no settings translation of its own. Snapshots, so acks=1; and a
    send never waits more than a second for a broker that is down (the default is a minute of
    serving stalled), the snapshot is dropped and the next one goes when it is back."""
    return kafka_python(settings, acks=1, linger_ms=100, max_block_ms=1000)


#: Partitions added to a topic are found within this time.
PARTITION_DISCOVERY = "10 s"
#: Starting offsets of the data topic when the job has no state, per ``data_starting_offsets``;
#: "committed" falls back to the earliest offset for a group without committed offsets.
STARTUP_MODES = {"earliest": "earliest-offset", "latest": "latest-offset",
                 "committed": "group-offsets"}


def kafka_table(t_env: StreamTableEnvironment, settings: Settings, topic: str, group_id: str,
                startup_mode: str) -> Table:
    """A topic as a table: ``value`` bytes (the ``raw`` format: the message as it is),
    ``partition`` and ``offset`` of each message, and ``arrival``, its processing time.
    Tombstones (no value) are left out, as no record or model is one. Offsets are in Flink's
    checkpoints and committed to the group on each one."""
    schema = (Schema.new_builder()
              .column("value", DataTypes.BYTES())
              .column_by_metadata("partition", DataTypes.INT(), "partition", True)
              .column_by_metadata("offset", DataTypes.BIGINT(), "offset", True)
              .column_by_expression("arrival", "PROCTIME()")
              .build())
    options = {"topic": topic, "properties.bootstrap.servers": settings.bootstrap_servers,
               "properties.group.id": group_id, "scan.startup.mode": startup_mode,
               "properties.auto.offset.reset": "earliest",
               "scan.topic-partition-discovery.interval": PARTITION_DISCOVERY,
               "properties.default.api.timeout.ms": BROKER_WAIT_MS,
               "properties.client.id.prefix": group_id}
    options.update({f"properties.{key}": value
                    for key, value in connector_properties(settings).items()})
    builder = TableDescriptor.for_connector("kafka").schema(schema).format("raw")
    for key, value in options.items():
        builder.option(key, value)
    return t_env.from_descriptor(builder.build()).filter(col("value").is_not_null)


def window_literal(milliseconds: int) -> str:
    """A SQL interval of ``milliseconds`` (at least 1)."""
    return f"INTERVAL '{max(milliseconds, 1) / 1000:.3f}' SECOND"


def record_batches(t_env: StreamTableEnvironment, settings: Settings, job: str) -> DataStream:
    """The data topic as ``RECORD_BATCH`` rows: per partition, the records that arrived within
    one ``batch_max_wait_ms`` window, in partition order, with their offsets."""
    table = kafka_table(t_env, settings, settings.data_topic, settings.group_id,
                        STARTUP_MODES[settings.data_starting_offsets])
    batches = t_env.sql_query(
        "SELECT `partition`, ARRAY_AGG(`offset`) AS offsets, ARRAY_AGG(`value`) AS records "
        f"FROM TABLE(TUMBLE(TABLE {table}, DESCRIPTOR(arrival), "
        f"{window_literal(settings.batch_max_wait_ms)})) "
        "GROUP BY window_start, window_end, `partition`")
    stream = t_env.to_data_stream(batches)
    name_upstream(stream, f"{job}-data-source", f"{job}-data-batches",
                  "data: " + settings.data_topic)
    return stream


def model_messages(t_env: StreamTableEnvironment, settings: Settings, job: str) -> DataStream:
    """The models topic as ``MODEL_MESSAGE`` rows, from its earliest offset when the job has
    no state, so a fresh job finds the latest model of every data type."""
    table = kafka_table(t_env, settings, settings.models_topic, settings.group_id + "-models",
                        "earliest-offset")
    stream = t_env.to_data_stream(table.select(col("partition"), col("offset"), col("value")))
    name_upstream(stream, f"{job}-models-source", None, "models: " + settings.models_topic)
    return stream


def name_upstream(stream: DataStream, source_uid: str, window_uid: str | None,
                  source_name: str) -> None:
    """Give the planner's source (and window) operators stable uids, which it does not:
    savepoints map state to operators by uid, and the source's uid is the one the jobs' Kafka
    sources always had, so savepoints of earlier versions keep their offsets."""
    pending = [stream._j_data_stream.getTransformation()]
    while pending:
        transformation = pending.pop()
        kind = transformation.getClass().getSimpleName()
        if kind == "SourceTransformation":
            transformation.setUid(source_uid)
            transformation.setName(source_name)
        elif window_uid and transformation.getName().startswith("WindowAggregate"):
            transformation.setUid(window_uid)
        pending.extend(transformation.getInputs())


def flattened(t_env: StreamTableEnvironment, result_batches: DataStream) -> DataStream:
    """``RESULT_BATCH`` rows back to one ServingResult (bytes) per element, on the JVM side."""
    table = t_env.from_data_stream(result_batches)
    results = t_env.sql_query(f"SELECT `payload` FROM {table} CROSS JOIN UNNEST(`results`) AS r(`payload`)")
    return DataStream(t_env._j_tenv.toDataStream(results._j_table,
                                                 _to_java_data_type(DataTypes.BYTES())))


def sink_properties(settings: Settings) -> dict[str, str]:
    """Kafka producer properties of the sinks: the connector's, and requests as large as the
    topics accept (``MAX_MESSAGE_BYTES``, the limit the topics are created with), so a result
    or dead letter the topic takes never fails the sink (the producer default is 1 MiB)."""
    return {**connector_properties(settings), "max.request.size": str(MAX_MESSAGE_BYTES),
            "delivery.timeout.ms": BROKER_WAIT_MS, "max.block.ms": BROKER_WAIT_MS}


def kafka_sink(settings: Settings, topic: str, purpose: str) -> KafkaSink:
    serializer = (KafkaRecordSerializationSchema.builder()
                  .set_topic(topic)
                  .set_value_serialization_schema(ByteArraySchema())
                  .build())
    guarantee = {"exactly-once": DeliveryGuarantee.EXACTLY_ONCE,
                 "at-least-once": DeliveryGuarantee.AT_LEAST_ONCE,
                 "none": DeliveryGuarantee.NONE}[settings.delivery_guarantee]
    builder = (KafkaSink.builder()
               .set_bootstrap_servers(settings.bootstrap_servers)
               .set_record_serializer(serializer)
               .set_delivery_guarantee(guarantee)
               .set_property("transaction.timeout.ms", TRANSACTION_TIMEOUT_MS))
    if guarantee == DeliveryGuarantee.EXACTLY_ONCE:
        builder.set_transactional_id_prefix(f"{settings.transactional_id_prefix}-{purpose}")
    for key, value in sink_properties(settings).items():
        builder.set_property(key, value)
    return builder.build()


def kafka_pipeline(env: StreamExecutionEnvironment, settings: Settings, build: BuildPipeline,
                   job: str) -> None:
    """Kafka in, ``build``, Kafka out."""
    t_env = StreamTableEnvironment.create(env)
    result_batches, dead_letters = build(record_batches(t_env, settings, job),
                                         model_messages(t_env, settings, job), settings)
    flattened(t_env, result_batches) \
        .sink_to(kafka_sink(settings, settings.results_topic, "results")) \
        .name("results: " + settings.results_topic).uid(f"{job}-results-sink")
    dead_letters.sink_to(kafka_sink(settings, settings.dead_letter_topic, "dead-letters")) \
        .name("dead letters: " + settings.dead_letter_topic).uid(f"{job}-dead-letters-sink")
    if settings.shadow_topic:
        shadow_results_of(result_batches) \
            .sink_to(kafka_sink(settings, settings.shadow_topic, "shadow")) \
            .name("shadow results: " + settings.shadow_topic).uid(f"{job}-shadow-sink")


def run_job(job: str, build: BuildPipeline, argv: list[str] | None = None) -> None:
    """The thin ``main`` of every job: settings, environment, Kafka pipeline, execute."""
    settings = Settings.from_sources(argv, prog=f"python -m jobs.{job}_job").for_job(job)
    logging.basicConfig(level=settings.log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log.info("starting %s with settings %s", settings.job_name, settings.describe())
    env = create_environment(settings)
    kafka_pipeline(env, settings, build, job)
    env.execute(settings.job_name)
