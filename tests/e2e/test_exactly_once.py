"""Exactly-once results through TaskManager failures, on the standalone cluster.

The job writes results and dead letters transactionally (delivery_guarantee exactly-once);
records with unique ids stream in while the TaskManager is SIGKILLed twice. Read with
read_committed, every id appears exactly once, none is missing, and every one was scored by
the model published before the stream (never published again)."""
from __future__ import annotations

import threading
import time
import uuid
from collections import Counter

import pytest

from jobs import JOB_MODULES
from modelserving.kafka import clients as client
from modelserving.demo.training import descriptor_for
from protos import DeadLetter, ModelType, ServingResult

import faults
from jobrunner import Deployment, settings_with_own_topics

pytestmark = pytest.mark.e2e

TAIL_RECORDS = 100   # sent after the second kill's recovery: the stream outlasts both kills
MAX_RECORDS = 4000   # at ~25/s, 160 s: a bound, should recovery never come
BAD_EVERY = 100      # every 100th record is garbage, to check dead letters too


@pytest.mark.parametrize("module", list(JOB_MODULES.values()))
def test_every_record_exactly_once_through_two_taskmanager_kills(module, flink, kafka_broker,
                                                                  trained_models):
    suffix = f"eo-{module.split('.')[-1]}-{uuid.uuid4().hex[:6]}"
    model = trained_models[ModelType.ONNX]
    settings = settings_with_own_topics(
        kafka_broker.bootstrap, suffix, delivery_guarantee="exactly-once")
    deployment = Deployment(flink, settings, model, module)
    try:
        deployment.submit()
        client.publish_model(deployment.producer, settings.models_topic, descriptor_for(model))
        deployment.wait_until_scored_by(model.name, timeout_s=180)

        def garbage(i: int) -> bytes:
            return f"garbage {suffix} {i}".encode()

        count = [0]          # records sent so far, written by the sender only
        kills_done = threading.Event()
        sent = threading.Event()

        def stream() -> None:
            """Records until both kills are over plus a tail, so the kills always happen
            while records flow, however long a recovery takes."""
            tail_end = None
            for i in range(MAX_RECORDS):
                if kills_done.is_set() and tail_end is None:
                    tail_end = i + TAIL_RECORDS
                if tail_end is not None and i >= tail_end:
                    break
                if i % BAD_EVERY == 0:
                    deployment.producer.send(settings.data_topic, value=garbage(i))
                else:
                    deployment.send([deployment.row("eo", i)])
                count[0] = i + 1
                time.sleep(0.04)
            deployment.producer.flush()
            sent.set()

        sender = threading.Thread(target=stream, daemon=True)
        sender.start()
        kills = []
        for _ in range(2):
            # kill while committed results are arriving, then let the job restart by itself
            before = len(deployment.collector.results)
            deployment.collector.wait_for(lambda c: len(c.results) >= before + 20, 180,
                                          "committed results flowing")
            killed_at = time.time()
            faults.kill_taskmanager(flink)
            faults.start_taskmanager(flink, timeout=90)
            flink.wait_restarted(deployment.job_id, since=killed_at, timeout=180)
            kills.append(time.time() - killed_at)
        kills_done.set()
        assert sent.wait(120), "the stream did not finish"
        assert count[0] < MAX_RECORDS, "the stream hit its bound before both kills were over"

        ids = [f"eo-{i}" for i in range(count[0])]
        bad = {i: garbage(i) for i in range(0, count[0], BAD_EVERY)}

        good_ids = [record_id for i, record_id in enumerate(ids) if i not in bad]
        deployment.collector.wait_for(lambda c: len(c.results_for(good_ids)) == len(good_ids), 240,
                                      "a committed result for every record")
        deployment.collector.wait_for(
            lambda c: {d.raw for d in c.dead_letters} >= set(bad.values()), 120,
            "a committed dead letter for every bad record")
        latest = flink.wait_checkpoint(deployment.job_id, timeout=60)
        flink.wait_checkpoint(deployment.job_id, after=latest["id"], timeout=60)  # a late duplicate would be committed by now

        with deployment.collector.lock:
            results = [r for r in deployment.collector.results if r.recordId.startswith("eo-")]
            letters = [d for d in deployment.collector.dead_letters if d.raw in set(bad.values())]
        counts = Counter(r.recordId for r in results)
        duplicated = {i: n for i, n in counts.items() if n > 1}
        assert not duplicated, f"duplicated results: {duplicated}"
        assert set(counts) == set(good_ids)
        assert {r.status for r in results} == {ServingResult.SCORED}
        assert {(r.modelName, r.modelVersion) for r in results} == {(model.name, model.version)}
        assert Counter(d.raw for d in letters) == Counter(bad.values())
        assert {d.kind for d in letters} == {DeadLetter.BAD_RECORD}
        print(f"\n[timing] {module}: {len(good_ids)} results and {len(bad)} dead letters exactly "
              f"once through 2 TaskManager kills (kill -> job RUNNING again: "
              f"{', '.join(f'{k:.1f} s' for k in kills)})")
    finally:
        deployment.close()

