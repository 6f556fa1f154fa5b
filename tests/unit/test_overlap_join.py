"""The keyed join with batches awaiting their model server, on an in-memory runtime context
whose keyed state can be checkpointed (copied) and restored into a new join instance: a
batch in flight at the checkpoint is called again after the restore and answered once."""
from __future__ import annotations

import copy
import threading

import pytest
from pyflink.common import Row as FlinkRow

from flink_state_fakes import KeyedContext
from jobs.settings import Settings
from model_server_faults import FaultyModelServer, sklearn_v2_backend
from modelserving.demo.training import DEMO_DATA_TYPE, demo_dataset, demo_rows
from modelserving.kafka.clients import encode_record
from protos import ExternalModel, ModelDescriptor, ModelType, ServingResult
from udfs.flink.joins import DEAD_LETTERS, EXTERNAL_PENDING, KeyedServing
from udfs.flink.overlap import FLUSH_AT_MS


def results_of(outputs) -> list[ServingResult]:
    results = []
    for output in outputs:
        assert not (isinstance(output, tuple) and output[0] is DEAD_LETTERS), output
        results.extend(ServingResult.FromString(raw) for raw in output[0])
    return results


@pytest.fixture()
def model_server(trained_models):
    """The wine model behind V2; each call waits until ``server.answering`` is set."""
    answer = sklearn_v2_backend(trained_models[ModelType.ONNX].estimator)
    answering = threading.Event()

    def gated(path, body):
        assert answering.wait(30), "the test never let the server answer"
        return answer(path, body)
    with FaultyModelServer(gated) as server:
        server.answering = answering
        yield server


def test_a_batch_in_flight_at_a_checkpoint_is_called_again_after_the_restore(model_server):
    settings = Settings(state_topic="", repository_topic="", model_servers=(model_server.url,),
                        model_server_timeout_ms=20_000, model_server_batches_in_flight=4)
    descriptor = ModelDescriptor(
        name="wine-external", version="1", dataType=DEMO_DATA_TYPE, modeltype=ModelType.EXTERNAL,
        inputFeatures=list(demo_dataset().feature_names), classLabels=["0", "1", "2"],
        server=ExternalModel(url=model_server.url, outputs=["predict", "predict_proba"]))
    rows = demo_rows()[:5]
    batch = FlinkRow(DEMO_DATA_TYPE, 0, list(range(10, 15)), [encode_record(r) for r in rows])

    context = KeyedContext()
    join = KeyedServing(settings, {})
    join.open(context)
    list(join.process_element2(FlinkRow(0, 0, descriptor.SerializeToString()), context))
    assert results_of(join.process_element1(batch, context)) == []   # awaits the server
    assert len(context.state[EXTERNAL_PENDING]) == 1
    assert context.processing_timers and FLUSH_AT_MS in context.event_timers
    checkpoint = copy.deepcopy(context.state)          # taken while the call is in flight
    model_server.answering.set()
    answered = results_of(join.on_timer(FLUSH_AT_MS, context))   # end of input: waits for it
    assert sorted(r.recordId for r in answered) == sorted(r.record_id for r in rows)
    assert context.state[EXTERNAL_PENDING] == {}
    join.close()

    calls = len(model_server.calls)
    model_server.answering.clear()
    restored = KeyedContext(checkpoint)
    again = KeyedServing(settings, {})
    again.open(restored)
    assert results_of(again.on_timer(1_005, restored)) == []   # called again, not yet answered
    model_server.answering.set()
    replayed = results_of(again.on_timer(FLUSH_AT_MS, restored))
    again.close()
    assert len(model_server.calls) == calls + 1
    assert [(r.recordId, r.label, r.modelName) for r in replayed] == \
        [(r.recordId, r.label, r.modelName) for r in answered]
    assert restored.state[EXTERNAL_PENDING] == {}
