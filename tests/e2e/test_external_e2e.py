"""EXTERNAL models end to end: both jobs on the real broker serve the demo model from a real
MLServer, with results equal to the embedded ONNX model's (and scikit-learn's own) within
1e-6; and a server that is down, slower than the timeout, answering 500 or answering
garbage gives dead letters (MODEL_UNAVAILABLE, with the reason) while the job keeps
RUNNING, then serves again once the server is back. The faults are injected by a small
HTTP server of the test in front of MLServer (``model_server_faults``)."""
from __future__ import annotations

import uuid
import numpy as np
import pytest

from jobrunner import Collector, JobProcess, Scenario, expected_for, settings_with_own_topics
from model_server_faults import GARBAGE, OK, SLOW, STATUS, FaultyModelServer, forward_to
from modelserving.kafka import clients as client
from modelserving.local.mlserver import LocalMLServer, mlserver_venv
from modelserving.local.processes import free_port, free_port_range
from modelserving.demo.training import descriptor_for
from protos import (DataRecord, DeadLetter, ModelDescriptor, ModelType, ServingResult,
                    SpeculativeSet)

import jobs

pytestmark = pytest.mark.e2e

FAULTY_TIMEOUT_MS = 500   # the descriptor's own timeout for the model behind the fault injector


@pytest.fixture(scope="module")
def mlserver(tmp_path_factory):
    if not (mlserver_venv() / "bin" / "mlserver").exists():
        pytest.skip(f"MLServer is not installed in {mlserver_venv()} (./dev setup builds it)")
    server = LocalMLServer(tmp_path_factory.mktemp("mlserver"), port=free_port_range(3)[0])
    server.start(timeout_s=180)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def injector(mlserver):
    with FaultyModelServer(forward_to(mlserver.url)) as proxy:
        yield proxy


@pytest.fixture(scope="module")
def down_url():
    """A server that is down: a loopback port where nobody listens."""
    return f"http://127.0.0.1:{free_port()}"


@pytest.fixture(scope="module", params=list(jobs.JOB_MODULES.values()))
def external_serving(request, kafka_broker, trained_models, mlserver, injector, down_url,
                     tmp_path_factory):
    """A job allowed to call MLServer, the fault injector and the server that is down."""
    job = request.param.rsplit(".", 1)[-1]
    settings = settings_with_own_topics(
        kafka_broker.bootstrap, f"ext-{job}-{uuid.uuid4().hex[:6]}", stats_interval_ms=1000,
        parallelism=2, checkpoint_interval_ms=2000, rest_port=0,
        model_servers=(mlserver.url, injector.url, down_url), model_server_timeout_ms=5000,
        model_server_breaker_failures=3, model_server_breaker_reset_ms=1000)
    process = JobProcess(request.param, settings, tmp_path_factory.mktemp(job) / "job.log").start()
    producer, collector = client.producer(settings), Collector(settings)
    instances = settings.parallelism if job == "broadcast_job" else 1
    yield Scenario(settings, producer, collector, process, trained_models, instances)
    collector.stop()
    producer.close()
    process.stop()


def test_results_from_mlserver_equal_the_embedded_models(external_serving, mlserver):
    serving = external_serving
    serving.send_model(mlserver.descriptor())
    serving.wait_until_serving(mlserver.model_name)
    rows = serving.rows("mlserver", 120)
    serving.send_records(rows)
    results = serving.wait_for_ids(r.record_id for r in rows)

    onnx = serving.models[ModelType.ONNX]   # the same pipeline, converted to ONNX
    embedded = expected_for(onnx, rows)
    X = np.array([r.values for r in rows])
    sklearn = onnx.estimator.predict_proba(X)
    for i, row in enumerate(rows):
        result, expected = results[row.record_id], embedded[row.record_id]
        assert result.status == ServingResult.SCORED
        assert (result.modelName, result.modelType) == (mlserver.model_name, ModelType.EXTERNAL)
        assert (result.label, list(result.classLabels)) == (expected.label, ["0", "1", "2"])
        assert result.score == pytest.approx(expected.value, abs=1e-6)
        assert list(result.probabilities) == pytest.approx(list(expected.probabilities), abs=1e-6)
        assert list(result.probabilities) == pytest.approx(list(sklearn[i]), abs=1e-9)


def record_id(letter: DeadLetter) -> str:
    """The id of the record a dead letter holds (WineRecord and DataRecord share field 14)."""
    return DataRecord.FromString(letter.raw).id if letter.kind == DeadLetter.MODEL_UNAVAILABLE else ""


FAULTS = {  # mode -> (what the injector does, what the dead letters must say)
    "down": (None, "could not be reached"),
    "slow": (SLOW, f"did not answer within {FAULTY_TIMEOUT_MS} ms"),
    "500": (STATUS, "answered HTTP 500"),
    "garbage": (GARBAGE, "unreadable answer: the answer is not JSON"),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_failing_server_gives_dead_letters_and_the_job_keeps_running(external_serving, mlserver,
                                                                       injector, down_url, fault):
    serving = external_serving
    mode, reason = FAULTS[fault]
    url = down_url if fault == "down" else injector.url
    name = f"wine-{fault}"
    injector.mode = OK
    serving.send_model(mlserver.descriptor(url=url, timeout_ms=FAULTY_TIMEOUT_MS, name=name))
    if fault != "down":
        serving.wait_until_serving(name)   # served through the injector first
        injector.mode, injector.delay_s = mode, 2.0
    rows = serving.rows(f"fault-{fault}", 20)
    serving.send_records(rows)
    wanted = {r.record_id for r in rows}

    def letters(c: Collector):
        found = [d for d in c.dead_letters if record_id(d) in wanted]
        return found if {record_id(d) for d in found} == wanted else None
    found = serving.collector.wait_for(letters, 180, f"a dead letter for each record ({fault})")
    for letter in found:
        assert letter.kind == DeadLetter.MODEL_UNAVAILABLE, letter
        assert letter.exceptionType == "ModelUnavailable" and letter.modelName == name
        assert reason in letter.reason, letter.reason   # also inside "circuit open ... the last one ..."
    assert not serving.collector.results_for(r.record_id for r in rows)

    job = serving.process.rest(f"/jobs/{serving.process.job_id}")
    assert job["state"] == "RUNNING"
    exceptions = serving.process.rest(f"/jobs/{serving.process.job_id}/exceptions")
    assert not exceptions.get("exceptionHistory", {}).get("entries"), exceptions

    # the server back (or the model replaced by one on a working server): serving again
    injector.mode = OK
    if fault == "down":
        serving.send_model(mlserver.descriptor())
        name = mlserver.model_name
    serving.wait_until_serving(name, timeout_s=120)


def speculative_set(data_type: str, models: list[str], budget_ms: int) -> ModelDescriptor:
    descriptor = ModelDescriptor(name=f"set-{budget_ms}ms", dataType=data_type)
    descriptor.speculative.CopyFrom(SpeculativeSet(models=models, budgetMs=budget_ms,
                                                   decider=SpeculativeSet.PREFERRED))
    return descriptor


SLOW_S, SHORT_BUDGET_MS, LONG_BUDGET_MS = 0.6, 200, 4000


def test_a_speculative_set_answers_within_its_budget_when_a_model_is_slower(
        external_serving, mlserver, injector):
    """A fast embedded model and MLServer made slower than the budget (0.6 s late, a 200 ms
    budget; the external model listed first, so preferred): every record gets the fast
    model's answer, the slow one reported as timed out, decided before the slow answer
    could have come. With a budget above its latency, the slow model's answers win."""
    serving = external_serving
    data_type = f"spec-{uuid.uuid4().hex[:6]}"
    fast = descriptor_for(serving.models[ModelType.ONNX], data_type=data_type)
    fast.modelId = "fast"
    slow = mlserver.descriptor(data_type, url=injector.url, timeout_ms=5000, name="wine-slow")
    slow.modelId = "slow"
    injector.mode = OK
    try:
        serving.send_model(fast)
        serving.send_model(slow)
        serving.wait_until_serving("wine-slow", data_type)   # the latest model serves alone
        injector.mode, injector.delay_s = SLOW, SLOW_S
        serving.send_model(speculative_set(data_type, ["slow", "fast"], SHORT_BUDGET_MS))
        serving.wait_until(lambda r: r.speculative.budgetMs == SHORT_BUDGET_MS, data_type,
                           what="a result of the short-budget set")
        rows = serving.rows("spec-short", 40, data_type)
        serving.send_records(rows)
        results = serving.wait_for_ids(r.record_id for r in rows)
        expected = expected_for(serving.models[ModelType.ONNX], rows)
        for row in rows:
            result = results[row.record_id]
            assert (result.modelId, result.modelType) == ("fast", ModelType.ONNX), result
            assert result.label == expected[row.record_id].label
            assert list(result.speculative.answered) == ["fast"]
            assert list(result.speculative.timedOut) == ["slow"]
            # decided without waiting for the slow answer (which comes 600 ms after the call)
            assert result.speculative.waitedMicros < SLOW_S * 1e6, result.speculative

        serving.send_model(speculative_set(data_type, ["slow", "fast"], LONG_BUDGET_MS))
        serving.wait_until(lambda r: r.speculative.budgetMs == LONG_BUDGET_MS and r.modelId == "slow",
                           data_type, what="the slow model's answer within the long budget")
        rows = serving.rows("spec-long", 20, data_type)
        serving.send_records(rows)
        results = serving.wait_for_ids(r.record_id for r in rows)
        for row in rows:
            result = results[row.record_id]
            assert (result.modelId, result.modelType) == ("slow", ModelType.EXTERNAL), result
            assert list(result.speculative.answered) == ["slow", "fast"]
            assert result.speculative.waitedMicros >= SLOW_S * 1e6
            assert result.label == expected[row.record_id.replace("long", "short")].label
    finally:
        injector.mode = OK
    assert serving.process.rest(f"/jobs/{serving.process.job_id}")["state"] == "RUNNING"
