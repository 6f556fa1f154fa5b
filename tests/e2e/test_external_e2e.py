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
from protos import DataRecord, DeadLetter, ModelType, ServingResult

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
