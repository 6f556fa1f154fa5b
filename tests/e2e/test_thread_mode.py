"""Both jobs in PyFlink's thread mode (Python embedded in the TaskManager's JVM) on the real
broker: an ONNX model, then a TensorFlow SavedModel, each imported for the first time on
the serving task's thread (both libraries are pybind11 extensions whose import calls
PyGILState_Ensure, which deadlocks when a second embedded interpreter shares that thread);
checkpoints with the models in state complete and the job never restarts (PyFlink 2.2's
embedded converter breaks ``byte[]`` state, so thread mode keeps it as strings:
``udfs.flink.state_bytes``); and a bad record dead-lettered with its position."""
from __future__ import annotations

import pytest

from modelserving.demo.training import descriptor_for
from modelserving.local.waiting import wait_until
from protos import DeadLetter, ModelType

from jobrunner import assert_scored_by

pytestmark = pytest.mark.e2e

JOB_SETTINGS = {"python_execution_mode": "thread"}


def checkpoint_counts(serving) -> dict:
    return (serving.process.rest(f"/jobs/{serving.process.job_id}/checkpoints") or {}).get("counts") or {}


def test_thread_mode_serves_onnx_then_a_saved_model_and_dead_letters_bad_input(serving):
    for model_type, prefix in ((ModelType.ONNX, "onnx"), (ModelType.TENSORFLOWSAVED, "saved")):
        model = serving.models[model_type]
        serving.send_model(descriptor_for(model))
        serving.wait_until_serving(model.name)
        rows = serving.rows(prefix, 30)
        serving.send_records(rows)
        assert_scored_by(serving.wait_for_ids(r.record_id for r in rows), model, rows)
        # two checkpoints taken with this model (and its statistics) in state, none failed
        # (triggers refused while the tasks were still starting count as failed: not since)
        before = checkpoint_counts(serving)
        wait_until(lambda: checkpoint_counts(serving).get("completed", 0)
                   >= before.get("completed", 0) + 2,
                   timeout_s=60, what=f"two checkpoints after {before} with the model in state")
        counts = checkpoint_counts(serving)
        assert counts.get("failed", 0) == before.get("failed", 0), (before, counts)
        assert counts.get("restored", 0) == 0, counts
        # still served from the state the checkpoints read (a restart would say NO_MODEL)
        rows = serving.rows(prefix + "-after", 10)
        serving.send_records(rows)
        assert_scored_by(serving.wait_for_ids(r.record_id for r in rows), model, rows)
    serving.send_raw_record(b"\xff\xfe not a record")
    serving.collector.wait_for(lambda c: c.dead_letters, timeout_s=60)
    [letter] = serving.collector.dead_letters
    assert letter.kind == DeadLetter.BAD_RECORD and letter.raw == b"\xff\xfe not a record"
    assert letter.sourcePartition >= 0 and letter.sourceOffset >= 0
    # the Python functions really ran embedded, not in worker processes
    assert "EmbeddedPythonEnvironmentManager" in serving.process.flink_log()
