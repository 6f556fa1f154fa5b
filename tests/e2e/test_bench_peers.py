"""Every Python peer of the benchmark, on the real local broker, started as the benchmark
starts it: a few hundred records scored by the demo ONNX model come back with the scores,
labels and probabilities in-process scoring gives those records, once each, and with the
fields the benchmark's collector reads."""
from __future__ import annotations

import time
import uuid

import pytest

from jobs.settings import Settings
from modelserving.bench import CONFLUENT_LOOP_2P, PEERS
from modelserving.bench.peers.launch import PeerProcesses
from modelserving.bench.workload import RecordTemplate, ResultCollector, new_producer
from modelserving.demo.training import (TrainedModel, demo_dataset, demo_rows, descriptor_for,
                                        export_onnx, fit_logistic, split)
from modelserving.kafka.admin import create_topics
from protos import ModelType, ServingResult
from udfs.models import load_request
from udfs.records import to_batch
from udfs.runtimes import load_model

pytestmark = pytest.mark.e2e

DATA_TYPE = "bench-peer-onnx"
RECORDS = 300


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory) -> TrainedModel:
    """Only the demo ONNX model (training all four formats would import TensorFlow)."""
    data = demo_dataset()
    X_train, _, y_train, _ = split(data)
    path = tmp_path_factory.mktemp("peer-models") / "wine-cultivar-logreg.onnx"
    estimator = fit_logistic(X_train, y_train)
    export_onnx(estimator, len(data.feature_names), path)
    return TrainedModel("wine-cultivar-logreg", version="7", model_type=ModelType.ONNX,
                        path=path, inline=True, input_features=data.feature_names,
                        class_labels=data.class_labels, description="peer test", estimator=estimator)


def expected_scores(model: TrainedModel, rows: list[dict[str, float]]):
    """In-process scoring of ``rows`` with the project's runtime, one batch."""
    runtime = load_model(load_request(descriptor_for(model, DATA_TYPE), [model.path.parent], 1 << 30))
    batch = to_batch([[row[name] for name in runtime.input_names] for row in rows], runtime.input_names)
    return runtime.score(batch)


def wait_for(collector: ResultCollector, prefix: str, want: int, timeout_s: float) -> list:
    """(broker time, result) of results whose record id starts with ``prefix``, once
    ``want`` distinct ids are in or the timeout passed; anything else is dropped."""
    found, ids, deadline = [], set(), time.monotonic() + timeout_s
    while len(ids) < want and time.monotonic() < deadline:
        for appended, raw in collector.take():
            result = ServingResult.FromString(raw)
            if result.recordId.startswith(prefix):
                found.append((appended, result))
                ids.add(result.recordId)
        time.sleep(0.05)
    return found


@pytest.mark.parametrize("peer", PEERS)
def test_peer_scores_like_in_process(peer, kafka_broker, onnx_model, tmp_path):
    suffix = f"{peer}-{uuid.uuid4().hex[:6]}"
    settings = Settings.from_sources(
        [], environ={}, bootstrap_servers=kafka_broker.bootstrap, data_topic=f"pdata-{suffix}",
        models_topic=f"pmodels-{suffix}", results_topic=f"presults-{suffix}",
        dead_letter_topic=f"pdead-{suffix}", state_topic="", group_id=f"bench-{suffix}",
        model_dirs=(str(onnx_model.path.parent),))
    create_topics(settings, partitions=2)
    producer = new_producer(settings)
    producer.produce(settings.models_topic, key=DATA_TYPE.encode(),
                     value=descriptor_for(onnx_model, DATA_TYPE).SerializeToString())
    producer.flush(10)
    collector = ResultCollector(settings, settings.results_topic)
    collector.start()
    assert collector.ready.wait(30), "the collector got no assignment"
    rows = [dict(zip(row.names, row.values)) for row in demo_rows()]
    template = RecordTemplate(DATA_TYPE, rows)
    peer_processes = PeerProcesses(peer, settings, tmp_path / "peer.log").start()
    try:
        # Records that come before a process has its model are skipped: probe every
        # partition (one per process of a two-process peer) until each answers.
        answered, probe, deadline = set(), 0, time.monotonic() + 90
        while len(answered) < 2 and time.monotonic() < deadline:
            assert not peer_processes.exited(), "\n".join(peer_processes.exited())
            for partition in {0, 1} - answered:
                producer.produce(settings.data_topic, partition=partition,
                                 value=template.encode(0, f"probe{partition}-{probe}", 0))
            producer.flush(10)
            probe += 1
            answered |= {int(result.recordId[5]) for _, result in wait_for(collector, "probe", 1, 0.5)}
        assert answered == {0, 1}, f"{peer} answered probes on partitions {answered} only"

        sent_ms = int(time.time() * 1000)
        for index in range(RECORDS):
            producer.produce(settings.data_topic, template.encode(index, f"rec-{index}", sent_ms + index))
        producer.flush(10)
        found = wait_for(collector, "rec-", RECORDS, 60)
    finally:
        peer_processes.stop()
        collector.stop()

    by_id = {}
    for appended, result in found:
        by_id.setdefault(result.recordId, []).append((appended, result))
    assert len(by_id) == RECORDS, f"{peer}: {len(by_id)} of {RECORDS} records came back"
    if peer != CONFLUENT_LOOP_2P:   # at-least-once: a rebalance between two processes may repeat some
        assert all(len(copies) == 1 for copies in by_id.values()), f"{peer} answered some records twice"
    expected = expected_scores(onnx_model, [rows[i % len(rows)] for i in range(RECORDS)])
    labels = set()
    for index, prediction in enumerate(expected):
        for appended, result in by_id[f"rec-{index}"]:
            assert result.status == ServingResult.SCORED
            assert (result.dataType, result.modelName, result.modelVersion, result.modelType) == \
                (DATA_TYPE, onnx_model.name, "7", ModelType.ONNX)
            assert result.recordTs == sent_ms + index   # the benchmark's latency starts there
            assert appended >= sent_ms and result.servedMs >= sent_ms
            assert result.label == prediction.label
            assert result.score == pytest.approx(prediction.value, abs=1e-6)
            assert list(result.probabilities) == pytest.approx(list(prediction.probabilities), abs=1e-6)
            assert list(result.classLabels) == list(prediction.class_labels)
            assert result.scoringMicros > 0
            labels.add(result.label)
    assert labels == set(onnx_model.class_labels)   # all three cultivars: no constant answer
