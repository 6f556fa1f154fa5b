"""What every Python peer does alike: the current model per data type, batch scoring into
``ServingResult`` bytes, its start-up, and the librdkafka settings of the confluent-based peers.

A peer keeps a ``ModelTable`` fed with the ``ModelDescriptor`` messages of the models topic
(read from the earliest offset), and hands each poll's records to ``score``: records are
parsed, grouped by data type, each group scored as one batch by its model through the
project's runtimes (``udfs.runtimes``), and every result serialized as the jobs' wire format
expects. Records of a data type without a model, and records that do not parse, are
skipped (and logged), as the plain loop always did.
"""
from __future__ import annotations

import argparse
import logging
import signal
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from jobs.kafka_config import MAX_MESSAGE_BYTES
from jobs.settings import Settings
from protos import DataRecord, ModelDescriptor, ServingResult
from udfs.models import load_request
from udfs.records import to_batch
from udfs.runtimes import load_model
from udfs.runtimes.base import ModelRuntime

log = logging.getLogger("peer")

#: Models the peers accept: the benchmark's own, so no limit that could matter.
MAX_MODEL_BYTES = 1 << 30

#: librdkafka producer settings of the confluent-based peers (Quix, bytewax, the confluent
#: loop), as librdkafka's documentation advises for throughput: leader acks only, no
#: idempotence handshake, batches of up to 1 MB closed after 5 ms. No compression: on one
#: machine it would cost CPU and save nothing.
PRODUCER_CONFIG: dict = {"acks": "1", "enable.idempotence": False, "linger.ms": 5,
                         "batch.size": 1_000_000, "compression.type": "none",
                         "message.max.bytes": MAX_MESSAGE_BYTES}
#: librdkafka consumer settings: large fetches (a record may be up to the topics' limit), and
#: a short broker-side wait when a partition is empty, so a lightly loaded peer answers soon.
CONSUMER_CONFIG: dict = {"max.partition.fetch.bytes": MAX_MESSAGE_BYTES,
                         "fetch.max.bytes": MAX_MESSAGE_BYTES,
                         "receive.message.max.bytes": MAX_MESSAGE_BYTES + 1024 * 1024}


class ModelTable:
    """The current model of each data type: the last good descriptor seen for it wins."""

    def __init__(self, model_dirs: Iterable[Path | str]):
        self.model_dirs = [Path(d) for d in model_dirs]
        self.models: dict[str, tuple[ModelDescriptor, ModelRuntime]] = {}

    def install(self, raw: bytes) -> bool:
        """Load the model of one ``ModelDescriptor`` message; a bad one is logged and leaves
        the table as it was. True when a model was installed."""
        try:
            descriptor = ModelDescriptor.FromString(raw)
            runtime = load_model(load_request(descriptor, self.model_dirs, MAX_MODEL_BYTES))
        except Exception as exc:
            log.warning("bad model: %s", exc)
            return False
        previous = self.models.get(descriptor.dataType)
        self.models[descriptor.dataType] = (descriptor, runtime)
        if previous is not None:
            previous[1].close()
        log.info("serving %s v%s for %s", descriptor.name, descriptor.version, descriptor.dataType)
        return True

    def __contains__(self, data_type: str) -> bool:
        return data_type in self.models

    def __len__(self) -> int:
        return len(self.models)


def score(table: ModelTable, raws: Iterable[bytes]) -> list[bytes]:
    """Serialized ``ServingResult``s of the records in ``raws`` (``DataRecord`` bytes), one
    batch per data type, in the order the data types first appear."""
    by_type: dict[str, list[DataRecord]] = {}
    for raw in raws:
        try:
            record = DataRecord.FromString(raw)
        except Exception as exc:  # a bad record is logged and skipped
            log.warning("bad record: %s", exc)
            continue
        by_type.setdefault(record.dataType, []).append(record)
    results: list[bytes] = []
    for data_type, records in by_type.items():
        model = table.models.get(data_type)
        if model is not None:
            results += score_records(*model, records)
    return results


def score_records(descriptor: ModelDescriptor, runtime: ModelRuntime,
                  records: list[DataRecord]) -> list[bytes]:
    """One model call for ``records`` (all of the descriptor's data type); each result says
    which model scored it, the batch's scoring time per record and when it was served."""
    names = runtime.input_names
    rows = [[record.features[name] for name in names] for record in records]
    started = time.perf_counter()
    predictions = runtime.score(to_batch(rows, names))
    micros = (time.perf_counter() - started) * 1e6 / len(records)
    served = int(time.time() * 1000)
    return [ServingResult(
        status=ServingResult.SCORED, dataType=descriptor.dataType, recordId=record.id,
        recordTs=record.ts, modelName=descriptor.name, modelVersion=descriptor.version,
        modelType=descriptor.modeltype, score=prediction.value, label=prediction.label,
        probabilities=prediction.probabilities, classLabels=prediction.class_labels,
        scoringMicros=micros, servedMs=served).SerializeToString()
        for record, prediction in zip(records, predictions)]


def start(module: str, argv: list[str] | None, options: Callable[[argparse.ArgumentParser], None],
          default_group: str) -> tuple[argparse.Namespace, Settings]:
    """A peer's start: its own options, then the job settings (options or ``MODELSERVING_*``
    variables; the consumer group is ``group_id``, else ``default_group``), logging, numpy
    quiet about the models' float warnings."""
    parser = argparse.ArgumentParser(prog=f"python -m {module}",
                                     description="job settings (--bootstrap-servers, --data-topic, "
                                     "...) are accepted too")
    options(parser)
    args, rest = parser.parse_known_args(argv)
    settings = Settings.from_sources(rest)
    settings = settings.replace(group_id=settings.group_id or default_group)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    np.seterr(all="ignore")
    return args, settings


def stop_flag() -> list:
    """A list that becomes non-empty on SIGTERM: the loops' condition to finish."""
    stopping: list = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    return stopping
