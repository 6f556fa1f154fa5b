"""A Quix Streams application (one process) serving the models: the peer a Python user gets
from a stream-processing library that runs without a cluster.

Two StreamingDataFrames in one ``Application``: the models topic's updates the model table
(``sdf.update``), the data topic's goes to a ``BatchingSink``, the library's way to handle
many records at once. Quix hands the sink every record and flushes it at each checkpoint,
every ``--commit-interval-ms`` (default 50; Quix's own default, 5 s, is for throughput
alone): the flush scores each data type's records as one batch, produces the results with
the application's producer and waits for their delivery, then Quix commits the offsets
synchronously (at-least-once, the library's default guarantee). The poll timeout is the
commit interval too, so a checkpoint is never late for want of new records. Values are raw
bytes (protobuf, not Quix's JSON). Measured here: each checkpoint waits 10-30 ms for the
broker (delivery, then the commit), so a shorter interval costs throughput and a longer one
latency.

Quix Streams pins an older confluent-kafka than the project's, so this module runs in the
benchmark's own virtual environment ``.venv-peers`` (``./dev setup`` makes it), with the
project on ``PYTHONPATH``.

    .venv-peers/bin/python -m modelserving.bench.peers.quix_app --bootstrap-servers ... \
        --data-topic d --models-topic m --results-topic r --model-dirs var/models

The consumer group is ``group_id`` (default bench-quix). All of the application's
partitions, the models topic's included, belong to its one process: a second process in
the group would see only part of the models.
"""
from __future__ import annotations

import tempfile

from quixstreams import Application
from quixstreams.kafka.configuration import ConnectionConfig
from quixstreams.sinks import BatchingSink, SinkBatch

from jobs.kafka_config import confluent
from jobs.settings import Settings
from modelserving.bench.peers.scoring import (CONSUMER_CONFIG, PRODUCER_CONFIG, ModelTable, score,
                                              start)


class ScoringSink(BatchingSink):
    """Scores a checkpoint's records per data type and writes their results to Kafka."""

    def __init__(self, app: Application, table: ModelTable, results_topic: str):
        super().__init__()
        self._app, self._table, self._topic = app, table, results_topic
        self._producer = None

    def setup(self):
        self._producer = self._app.get_producer()

    def write(self, batch: SinkBatch):
        for result in score(self._table, (item.value for item in batch)):
            self._producer.produce(self._topic, result)

    def flush(self):
        super().flush()   # write() for every partition's batch
        self._producer.flush()   # results delivered before Quix commits the offsets


def application(settings: Settings, commit_interval_ms: int, state_dir: str) -> Application:
    client = confluent(settings)
    connection = ConnectionConfig.from_librdkafka_dict(client, ignore_extras=True)
    app = Application(
        broker_address=connection, consumer_group=settings.group_id,
        auto_offset_reset="earliest", commit_interval=commit_interval_ms / 1000,
        consumer_poll_timeout=commit_interval_ms / 1000, consumer_extra_config=dict(CONSUMER_CONFIG),
        producer_extra_config=dict(PRODUCER_CONFIG), state_dir=state_dir,
        auto_create_topics=False, use_changelog_topics=False, loglevel="INFO")
    table = ModelTable(settings.resolved_model_dirs())
    models = app.dataframe(app.topic(settings.models_topic, value_deserializer="bytes"))
    models.update(table.install)
    data = app.dataframe(app.topic(settings.data_topic, value_deserializer="bytes"))
    data.sink(ScoringSink(app, table, settings.results_topic))
    return app


def main(argv=None) -> None:
    args, settings = start("modelserving.bench.peers.quix_app", argv, lambda parser: parser.add_argument(
        "--commit-interval-ms", type=int, default=50, help="checkpoint (score, produce, commit) this often"),
        "bench-quix")
    with tempfile.TemporaryDirectory(prefix="bench-quix-state-") as state_dir:
        application(settings, args.commit_interval_ms, state_dir).run()


if __name__ == "__main__":
    main()
