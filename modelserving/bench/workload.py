"""Load generation and measurement (after the method of the Crayfish benchmark of model serving in stream processors).

A rate-limited producer stamps each record with its creation time (the record's ``ts``); the
results topic uses LogAppendTime, so a result's Kafka timestamp is when the broker got it,
whoever wrote it. Latency = result timestamp - creation time. Throughput = records / (last
result - first creation). The first 25% of a trial's records are warm-up and left out.

The load generator and the collector use librdkafka (confluent-kafka): on two cores, every
CPU cycle the harness spends is taken from the system under test, and kafka-python costs
several times more per message. Both are configured from ``Settings`` through
``jobs.kafka_config.confluent``, like every other client of the project.
"""
from __future__ import annotations

import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Sequence

from confluent_kafka import Consumer, Producer

from jobs.kafka_config import MAX_MESSAGE_BYTES, confluent
from modelserving.bench import cpu
from protos import DataRecord, ServingResult

WARM_UP_FRACTION = 0.25


def result_topic_configs() -> dict[str, str]:
    """Results get the broker's append time as their timestamp: a job's Kafka sink may copy
    the input record's timestamp, which would make every latency zero."""
    return {"message.timestamp.type": "LogAppendTime"}


class RecordTemplate:
    """Encodes records quickly: prepared messages, new ts and id each time. With several
    data types, consecutive records cycle through them."""

    def __init__(self, data_types: str | Sequence[str], rows: list[dict[str, float]]):
        self.data_types = (data_types,) if isinstance(data_types, str) else tuple(data_types)
        self._messages = []
        for features in rows:
            for data_type in self.data_types:
                message = DataRecord(dataType=data_type)
                message.features.update(features)
                self._messages.append(message)

    def encode(self, index: int, record_id: str, ts_ms: int) -> bytes:
        message = self._messages[index % len(self._messages)]
        message.ts = ts_ms
        message.id = record_id
        return message.SerializeToString()


def new_producer(settings) -> Producer:
    """The load generator's producer: leader acks only, 2 ms batches, a deep queue."""
    return Producer(confluent(settings, **{
        "acks": "1", "linger.ms": 2, "enable.idempotence": False,
        "queue.buffering.max.messages": 1_000_000, "message.max.bytes": MAX_MESSAGE_BYTES}))


@dataclass
class Sent:
    trial: str
    count: int
    started: float           # wall clock, seconds
    finished: float
    rate: float               # asked for; 0 means as fast as the producer goes

    @property
    def achieved_rate(self) -> float:
        return self.count / max(self.finished - self.started, 1e-9)


def produce(producer: Producer, topic: str, template: RecordTemplate, trial: str,
            count: int, rate: float = 0.0) -> Sent:
    """Send ``count`` records at ``rate`` per second (0: flat out), paced in 2 ms slices:
    smooth input, and a generator that sleeps most of the time."""
    started = time.time()
    sent = 0
    while sent < count:
        now = time.time()
        due = count if rate <= 0 else min(count, int((now - started) * rate) + 1)
        if due <= sent:
            time.sleep(max(0.002, (sent + 1) / rate - (now - started)))
            continue
        ts = int(now * 1000)
        for i in range(sent, due):
            value = template.encode(i, f"{trial}-{i}", ts)
            while True:
                try:
                    producer.produce(topic, value)
                    break
                except BufferError:   # librdkafka's queue is full: let it deliver, then retry
                    producer.poll(0.05)
        producer.poll(0)
        sent = due
    producer.flush(30)
    return Sent(trial, count, started, time.time(), rate)


class ResultCollector(threading.Thread):
    """Reads a results topic from its end, keeping (append time, bytes) until told to stop;
    parsing waits until a trial is over, so collecting stays cheap."""

    def __init__(self, settings, topic: str):
        super().__init__(daemon=True, name=f"collect-{topic}")
        self.consumer = Consumer(confluent(settings, **{
            "group.id": f"bench-{topic}", "auto.offset.reset": "latest",
            "enable.auto.commit": False, "fetch.wait.max.ms": 10}))
        self.consumer.subscribe([topic], on_assign=lambda *_: self.ready.set())
        self._lock = threading.Lock()
        self._items: list[tuple[int, bytes]] = []
        self._halt = threading.Event()
        self.ready = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            messages = self.consumer.consume(num_messages=5000, timeout=0.1)
            items = [(m.timestamp()[1], m.value()) for m in messages if m.error() is None]
            if items:
                with self._lock:
                    self._items.extend(items)
        self.consumer.close()

    def take(self) -> list[tuple[int, bytes]]:
        with self._lock:
            items, self._items = self._items, []
        return items

    def stop(self) -> None:
        self._halt.set()
        self.join(10)


@dataclass
class Trial:
    """What came back for one trial's records."""
    sent: Sent
    latencies_ms: list[float] = field(default_factory=list)   # in creation order
    created_ms: list[int] = field(default_factory=list)
    appended_ms: list[int] = field(default_factory=list)
    model_versions: dict[str, int] = field(default_factory=dict)
    received: int = 0
    unscored: int = 0               # results that are not SCORED (no model was serving)
    cpu_s: float | None = None      # CPU of the system under test while the trial ran
    wall_s: float | None = None     # from the first record sent to the last result in

    def cpu_per_record_us(self) -> float | None:
        return cpu.per_record_us(self.cpu_s, self.received)

    def cpu_cores(self) -> float | None:
        return cpu.cores(self.cpu_s, self.wall_s)

    @property
    def complete(self) -> bool:
        return self.received >= self.sent.count

    def measured(self) -> list[int]:
        """Positions of the records after warm-up."""
        return list(range(int(len(self.latencies_ms) * WARM_UP_FRACTION), len(self.latencies_ms)))

    def throughput(self) -> float | None:
        keep = self.measured()
        if len(keep) < 10:
            return None
        first_created = self.created_ms[keep[0]]
        last_out = max(self.appended_ms[i] for i in keep)
        return len(keep) / max((last_out - first_created) / 1000, 1e-3)

    def output_rate(self) -> float | None:
        """Results per second once warm: unlike ``throughput`` it does not charge a constant
        latency to the rate, so a short trial of a slow-answering system is not misread as
        one that cannot keep up."""
        appended = sorted(self.appended_ms[i] for i in self.measured())
        if len(appended) < 10 or appended[-1] == appended[0]:
            return None
        return (len(appended) - 1) / ((appended[-1] - appended[0]) / 1000)

    def percentile(self, q: float) -> float | None:
        values = sorted(self.latencies_ms[i] for i in self.measured())
        if not values:
            return None
        return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]

    def latency_grows(self) -> bool:
        """Latency "does not grow" when the last quarter's median stays within twice the
        second quarter's plus 50 ms (a backlog makes it climb steadily)."""
        n = len(self.latencies_ms)
        if n < 40:
            return False
        second = statistics.median(self.latencies_ms[n // 4:n // 2])
        last = statistics.median(self.latencies_ms[3 * n // 4:])
        return last > 2 * second + 50


def wait_for_trial(collector: ResultCollector, sent: Sent, timeout_s: float) -> Trial:
    """Collect the trial's results until all are in or ``timeout_s`` passed since sending
    ended; late results of earlier trials are dropped."""
    trial = Trial(sent)
    by_index: dict[int, tuple[int, ServingResult]] = {}
    deadline = sent.finished + timeout_s
    prefix = sent.trial + "-"
    while True:
        for appended, raw in collector.take():
            result = ServingResult.FromString(raw)
            if not result.recordId.startswith(prefix):
                continue
            index = int(result.recordId[len(prefix):])
            by_index.setdefault(index, (appended, result))
        if len(by_index) >= sent.count or time.time() > deadline:
            break
        time.sleep(0.05)
    fill_trial(trial, by_index)
    return trial


def fill_trial(trial: "Trial", by_index: dict) -> list:
    """Add the results of a trial (record index -> (broker append time, ServingResult)) in
    record order; returns them in that order."""
    ordered = []
    for index in sorted(by_index):
        appended, result = by_index[index]
        trial.created_ms.append(result.recordTs)
        trial.appended_ms.append(appended)
        trial.latencies_ms.append(float(appended - result.recordTs))
        key = f"{result.modelName}:{result.modelVersion}"
        trial.model_versions[key] = trial.model_versions.get(key, 0) + 1
        trial.unscored += result.status != ServingResult.SCORED
        ordered.append(result)
    trial.received = len(by_index)
    return ordered
