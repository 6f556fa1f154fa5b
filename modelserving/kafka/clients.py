"""The Kafka client side of the product (kafka-python): publish models and records, follow results.

Records are written as the tutorial's ``WineRecord`` for data type "wine" with the eleven wine
features, and as ``DataRecord`` (named features) for anything else. Models are keyed by data
type, so a compacted models topic keeps the latest model of each.

Clients are configured from ``Settings`` through ``jobs.kafka_config.kafka_python``, so a
secured cluster works here as for every other client; failures leave as one-line
``KafkaToolError``s (``modelserving.kafka.failures``).
"""
from __future__ import annotations

import csv
import itertools
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from kafka import KafkaConsumer, KafkaProducer

from protos import (DataRecord, DeadLetter, ModelDescriptor, ModelType, ServingResult, SpeculativeSet,
                    WineRecord)
from udfs.features import WINE_DATA_TYPE, WINE_FEATURES, WINE_PROTO_FIELDS

from jobs.kafka_config import MAX_MESSAGE_BYTES, kafka_python
from modelserving.errors import KafkaToolError
from modelserving.kafka.failures import CONNECT_TIMEOUT_MS, translated


def producer(settings, **overrides) -> KafkaProducer:
    """A connected producer (acks=all, models up to ``MAX_MESSAGE_BYTES``); ``overrides``
    are kafka-python producer options."""
    config = kafka_python(settings, **{"acks": "all", "linger_ms": 5,
                                       "max_request_size": MAX_MESSAGE_BYTES,
                                       "bootstrap_timeout_ms": CONNECT_TIMEOUT_MS, **overrides})
    with translated("connecting a producer", config):
        return KafkaProducer(**config)


# -- models ---------------------------------------------------------------------------------

def guess_model_type(path: Path) -> int:
    if path.is_dir():
        if (path / "saved_model.pb").exists():
            return ModelType.TENSORFLOWSAVED
        raise ValueError(f"{path} is a directory without saved_model.pb")
    suffix = path.suffix.lower()
    by_suffix = {".onnx": ModelType.ONNX, ".pmml": ModelType.PMML, ".xml": ModelType.PMML,
                 ".pb": ModelType.TENSORFLOW}
    if suffix not in by_suffix:
        raise ValueError(f"cannot tell the model type of {path}; pass it explicitly")
    return by_suffix[suffix]


def model_descriptor(path: Path | str, data_type: str, *, name: str = "", version: str = "",
                     description: str = "", model_type: int | None = None,
                     by_location: bool | None = None, input_features: Sequence[str] = (),
                     class_labels: Sequence[str] = ()) -> ModelDescriptor:
    """A descriptor for a model file or SavedModel directory: inline bytes, or its location
    (the default for directories, which cannot go inline)."""
    path = Path(path).resolve()
    model_type = guess_model_type(path) if model_type is None else model_type
    descriptor = ModelDescriptor(name=name or path.stem, description=description, dataType=data_type,
                                 modeltype=model_type, version=version,
                                 inputFeatures=list(input_features), classLabels=list(class_labels))
    if by_location is None:
        by_location = path.is_dir()
    if by_location:
        descriptor.location = str(path)
    else:
        descriptor.data = path.read_bytes()
    return descriptor


def publish_model(kafka: KafkaProducer, topic: str, descriptor: ModelDescriptor) -> None:
    if not descriptor.publishedMs:
        descriptor.publishedMs = int(time.time() * 1000)
    with translated(f"publishing model {descriptor.name!r} to {topic}", kafka.config):
        kafka.send(topic, key=descriptor.dataType.encode(), value=descriptor.SerializeToString()).get(30)


# -- records --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Row:
    data_type: str
    names: tuple[str, ...]
    values: tuple[float, ...]
    record_id: str = ""


def encode_record(row: Row, ts_ms: int | None = None) -> bytes:
    ts = int(time.time() * 1000) if ts_ms is None else ts_ms
    if row.data_type == WINE_DATA_TYPE and row.names == WINE_FEATURES:
        record = WineRecord(dataType=row.data_type, ts=ts, id=row.record_id,
                            **dict(zip(WINE_PROTO_FIELDS, row.values)))
    else:
        record = DataRecord(dataType=row.data_type, ts=ts, id=row.record_id,
                            features=dict(zip(row.names, row.values)))
    return record.SerializeToString()


def rows_from_csv(path: Path | str, data_type: str = WINE_DATA_TYPE, delimiter: str | None = None,
                  id_prefix: str = "") -> list[Row]:
    """Rows of a CSV file. With a header, its names are the features (a column named
    ``quality``, ``label`` or ``target`` is left out); without one, the columns are the
    eleven wine features in WineRecord order (the tutorial's winequality files)."""
    text = Path(path).read_text()
    if delimiter is None:
        delimiter = ";" if text.count(";") > text.count(",") else ","
    lines = [line for line in csv.reader(text.splitlines(), delimiter=delimiter) if line]
    header = None
    try:
        [float(v) for v in lines[0]]
    except ValueError:
        header, lines = [h.strip().strip('"') for h in lines[0]], lines[1:]
    rows = []
    prefix = id_prefix or Path(path).stem
    for number, line in enumerate(lines):
        if header is None:
            names, values = WINE_FEATURES, tuple(float(v) for v in line[:len(WINE_FEATURES)])
        else:
            keep = [i for i, h in enumerate(header) if h.lower() not in ("quality", "label", "target")]
            names = tuple(header[i] for i in keep)
            values = tuple(float(line[i]) for i in keep)
        rows.append(Row(data_type, names, values, f"{prefix}-{number}"))
    return rows


def publish_records(kafka: KafkaProducer, topic: str, rows: Iterable[Row], rate: float = 0.0,
                    count: int = 0, loop: bool = False, progress=None) -> int:
    """Send rows at ``rate`` records/s (0 = as fast as possible); ``count`` > 0 stops after
    that many (cycling through the rows with ``loop``). Returns the number sent."""
    source: Iterable[Row] = itertools.cycle(rows) if loop else rows
    started = time.monotonic()
    sent = 0
    run = uuid.uuid4().hex[:6]
    with translated(f"publishing records to {topic}", kafka.config):
        for row in source:
            if count and sent >= count:
                break
            if rate > 0:
                delay = started + sent / rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            if loop:
                row = Row(row.data_type, row.names, row.values, f"{row.record_id}-{run}-{sent}")
            kafka.send(topic, key=row.data_type.encode(), value=encode_record(row))
            sent += 1
            if progress and sent % 100 == 0:
                progress(sent)
        kafka.flush()
    return sent


# -- following results ----------------------------------------------------------------------

def consumer(settings, topics: Sequence[str], from_beginning: bool = True,
             read_committed: bool = True, **overrides) -> KafkaConsumer:
    """A connected consumer of ``topics`` without a group (every reader sees everything);
    ``overrides`` are kafka-python consumer options."""
    config = kafka_python(settings, **{
        "group_id": None, "auto_offset_reset": "earliest" if from_beginning else "latest",
        "isolation_level": "read_committed" if read_committed else "read_uncommitted",
        "enable_auto_commit": False, "fetch_max_bytes": MAX_MESSAGE_BYTES,
        "max_partition_fetch_bytes": MAX_MESSAGE_BYTES,
        "bootstrap_timeout_ms": CONNECT_TIMEOUT_MS, **overrides})
    with translated(f"connecting a consumer of {', '.join(topics)}", config):
        return KafkaConsumer(*topics, **config)


def decode(topic: str, value: bytes, dead_letter_topic: str):
    return (DeadLetter if topic == dead_letter_topic else ServingResult).FromString(value)


def follow(kafka: KafkaConsumer, dead_letter_topic: str, timeout_s: float | None = None,
           poll_ms: int = 200) -> Iterator[tuple[str, object]]:
    """(topic, decoded message) as they arrive; stops after ``timeout_s`` without messages."""
    idle_since = time.monotonic()
    while True:
        with translated("reading results", kafka.config):
            batch = kafka.poll(timeout_ms=poll_ms)
        if batch:
            idle_since = time.monotonic()
        for partition, messages in batch.items():
            for message in messages:
                yield partition.topic, decode(partition.topic, message.value, dead_letter_topic)
        if timeout_s is not None and time.monotonic() - idle_since > timeout_s:
            return


def describe_message(message) -> str:
    """One readable line per result or dead letter."""
    if isinstance(message, DeadLetter):
        kind = DeadLetter.Kind.Name(message.kind)
        return (f"DEAD LETTER {kind:<10} {message.dataType or '-':<14} {message.rawSize or len(message.raw):>7} bytes "
                f"from {message.sourceTopic}: {message.reason}")
    if message.status == ServingResult.NO_MODEL:
        return f"NO MODEL   {message.dataType:<14} record {message.recordId or '-'}"
    model = f"{message.modelName}" + (f" v{message.modelVersion}" if message.modelVersion else "")
    label = f" label={message.label}" if message.label else ""
    probs = ""
    if message.probabilities:
        probs = " p=[" + ", ".join(f"{p:.3f}" for p in message.probabilities) + "]"
    speculative = ""
    if message.HasField("speculative"):
        decided = message.speculative
        speculative = (f", {SpeculativeSet.Decider.Name(decided.decider).lower()} of "
                       f"{'+'.join(decided.answered) or 'none'} within {decided.budgetMs} ms"
                       + (f", timed out: {'+'.join(decided.timedOut)}" if decided.timedOut else ""))
    named = f" ({message.modelId})" if message.modelId else ""
    return (f"SCORED     {message.dataType:<14} record {message.recordId or '-':<22} "
            f"by {ModelType.Name(message.modelType)} {model}{named}: score={message.score:.4g}"
            f"{label}{probs} ({message.scoringMicros:.0f} µs, subtask {message.subtask}{speculative})")




class OutputFollower(threading.Thread):
    """Reads a job's results and dead-letter topics in the background (read_committed) and
    hands every decoded message to ``handle``; ``stop()`` ends it.

    ``start()`` returns once the consumer is connected and raises ``KafkaToolError`` when
    it cannot connect; a failure later on ends the thread and is kept in ``error``."""

    def __init__(self, settings, results_topic: str | None = None,
                 dead_letter_topic: str | None = None):
        super().__init__(daemon=True)
        self.settings = settings
        self.dead_letter_topic = dead_letter_topic or settings.dead_letter_topic
        self.topics = [results_topic or settings.results_topic, self.dead_letter_topic]
        self.stopped = threading.Event()
        self.error: KafkaToolError | None = None
        self._connected = threading.Event()

    def handle(self, message) -> None:
        raise NotImplementedError

    def start(self) -> None:
        super().start()
        self._connected.wait()
        if self.error is not None:
            raise self.error

    def run(self) -> None:
        try:
            kafka = consumer(self.settings, self.topics)
        except KafkaToolError as exc:
            self.error = exc
            return
        finally:
            self._connected.set()
        try:
            while not self.stopped.is_set():
                for _, message in follow(kafka, self.dead_letter_topic, timeout_s=0.3):
                    self.handle(message)
                    if self.stopped.is_set():
                        break
        except KafkaToolError as exc:
            self.error = exc
        finally:
            kafka.close()

    def stop(self, timeout_s: float = 5) -> None:
        """End the thread; a follower that never started (its start failed) is left alone."""
        self.stopped.set()
        if self.ident is not None:
            self.join(timeout_s)
