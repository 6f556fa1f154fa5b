"""End to end on the real broker: inputs over the producer default of 1 MiB (records and
inline models of an unknown type of 1.5 MB, 5 MB and 22 MB, the last gzip-compressed and
over the topics' 20 MiB message limit uncompressed) are each dead-lettered once,
bounded (a prefix of the raw bytes, the whole input's size and SHA-256), records around them
are scored, and the job never restarts (Flink's exception history stays empty)."""
from __future__ import annotations

import hashlib
import random
import time
from collections import Counter

import pytest

from jobs.kafka_config import MAX_MESSAGE_BYTES
from jobs.settings import Settings
from modelserving.demo.training import descriptor_for
from modelserving.kafka import clients as client
from protos import DeadLetter, ModelDescriptor, ModelType

from jobrunner import Collector, assert_scored_by

pytestmark = pytest.mark.e2e

RAW_BOUND = Settings().dead_letter_max_raw_bytes


def compressible(rng: random.Random, size: int) -> bytes:
    """``size`` bytes that gzip shrinks a hundredfold: random 1 KiB blocks, each repeated."""
    blocks = [rng.randbytes(1024) for _ in range(8)]
    return b"".join(blocks[i % 8] * 100 for i in range(size // 102_400 + 1))[:size]


def test_oversized_inputs_are_dead_lettered_once_and_the_job_never_restarts(serving):
    model = serving.models[ModelType.ONNX]
    serving.send_model(descriptor_for(model))
    serving.wait_until_serving(model.name)
    # a producer of its own, as a producer of large messages would configure it; gzip lets
    # the broker take the inputs over its 20 MiB message limit
    producer = client.producer(serving.settings, max_request_size=4 * MAX_MESSAGE_BYTES,
                               compression_type="gzip")
    rng = random.Random(10)
    records = {"1.5 MB record": rng.randbytes(1_500_000), "5 MB record": rng.randbytes(5_000_000),
               "22 MB record (gzip)": compressible(rng, 22_000_000)}
    models = {what: ModelDescriptor(name="oversized", version=what, dataType="oversized-model-type",
                                    modeltype=17, data=data).SerializeToString()
              for what, data in (("1.5 MB model", rng.randbytes(1_500_000)),
                                 ("5 MB model", rng.randbytes(5_000_000)),
                                 ("22 MB model (gzip)", compressible(rng, 22_000_000)))}
    assert len(records["22 MB record (gzip)"]) > MAX_MESSAGE_BYTES
    try:
        before = serving.rows("before-oversized", 10)
        serving.send_records(before)
        for raw in records.values():
            producer.send(serving.settings.data_topic, value=raw).get(60)
        for raw in models.values():
            producer.send(serving.settings.models_topic, value=raw).get(60)
        after = serving.rows("after-oversized", 10)
        serving.send_records(after)
    finally:
        producer.close()

    results = serving.wait_for_ids([r.record_id for r in before + after], timeout_s=180)
    assert_scored_by(results, model, before + after)
    wanted = {hashlib.sha256(raw).hexdigest(): (what, raw, DeadLetter.BAD_RECORD,
                                                serving.settings.data_topic)
              for what, raw in records.items()}
    wanted.update({hashlib.sha256(raw).hexdigest(): (what, raw, DeadLetter.BAD_MODEL,
                                                     serving.settings.models_topic)
                   for what, raw in models.items()})

    def letters(c: Collector):
        found = [d for d in c.dead_letters if d.rawSha256 in wanted]
        return found if {d.rawSha256 for d in found} == set(wanted) else None
    serving.collector.wait_for(letters, 180, "a dead letter for every oversized input")
    time.sleep(5)   # room for a duplicate, were there one
    with serving.collector.lock:
        found = [d for d in serving.collector.dead_letters if d.rawSha256 in wanted]
    letters_of = Counter(wanted[d.rawSha256][0] for d in found)
    assert letters_of == Counter({what: 1 for what, *_ in wanted.values()}), \
        f"each dead-lettered exactly once: {letters_of}"
    for letter in found:
        what, raw, kind, topic = wanted[letter.rawSha256]
        assert letter.kind == kind and letter.sourceTopic == topic, what
        assert letter.rawSize == len(raw) and letter.rawTruncated, what
        assert letter.raw == raw[:RAW_BOUND], what
        assert letter.sourcePartition == -1 and letter.sourceOffset == -1, what
        assert len(letter.SerializeToString()) < RAW_BOUND + 2048, what

    exceptions = serving.process.rest(f"/jobs/{serving.process.job_id}/exceptions")
    assert exceptions is not None
    assert not exceptions.get("exceptionHistory", {}).get("entries"), exceptions
    assert not exceptions.get("root-exception"), exceptions
    job = serving.process.rest(f"/jobs/{serving.process.job_id}")
    assert job["state"] == "RUNNING"
