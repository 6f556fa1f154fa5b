"""EXTERNAL models against real HTTP servers started here: the two protocols' encoding and
decoding, results equal to the embedded runtimes', and every fault (down, slow, error status,
garbage, dropped connections) as a ModelUnavailable with its reason, retries, the in-flight
bound and the circuit breaker. No JVM; timings are never pass/fail."""
from __future__ import annotations

import json
import math
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from model_server_faults import (DRIP, DROP, GARBAGE, NOT_HTTP, OK, SLOW, STATUS,
                                 FaultyModelServer, sklearn_v2_backend)
from modelserving.demo.training import DEMO_DATA_TYPE, demo_dataset, descriptor_for
from modelserving.local.processes import free_port
from modelserving.local.waiting import wait_until
from protos import DeadLetter, ExternalModel, ModelDescriptor, ModelType
from udfs.errors import ModelRejected, ModelUnavailable
from udfs.models import load_request
from udfs.runtimes import load_model
from udfs.runtimes.base import FeatureBatch
from udfs.runtimes.endpoints import ModelServers, normalize_server_url
from udfs.runtimes.inference_protocols import (ProtocolError, tf_serving_outputs,
                                               tf_serving_request, v2_outputs, v2_request)
from udfs.serving import ModelServer

FEATURES = demo_dataset().feature_names


# -- backends: what a real server would compute -------------------------------------------------

def tf_serving_backend(saved_model_dir):
    """Answers predict calls as TensorFlow Serving does, from the same SavedModel loaded by
    TensorFlow: row format in, {"predictions": ...} out (one value per row for a single
    output, an object per row for several)."""
    from udfs.runtimes.tensorflow_graph import import_tensorflow

    tf = import_tensorflow()
    loaded = tf.saved_model.load(str(saved_model_dir))

    def answer(path: str, body: bytes):
        request = json.loads(body)
        function = loaded.signatures[request.get("signature_name", "serving_default")]
        (key, spec), = function.structured_input_signature[1].items()
        rows = [r[key] if isinstance(r, dict) else r for r in request["instances"]]
        outputs = {k: v.numpy() for k, v in function(**{key: tf.constant(rows, spec.dtype)}).items()}
        if len(outputs) == 1:
            predictions = next(iter(outputs.values())).tolist()
        else:
            predictions = [{k: v[i].tolist() for k, v in outputs.items()} for i in range(len(rows))]
        return 200, json.dumps({"predictions": predictions}).encode()
    return answer


# -- helpers ------------------------------------------------------------------------------------

def servers(url: str, **limits) -> ModelServers:
    """Limits for ``url``; a generous timeout unless a test is about timeouts, so that a
    busy machine never turns another fault into a timeout."""
    return ModelServers(allowed=(normalize_server_url(url),), **{"timeout_s": 30, **limits})


def external(url: str, protocol=ExternalModel.OPEN_INFERENCE_V2, name="wine", **server) -> ModelDescriptor:
    defaults = {"outputs": ["predict", "predict_proba"]} if protocol == ExternalModel.OPEN_INFERENCE_V2 else {}
    return ModelDescriptor(name=name, version="1", dataType=DEMO_DATA_TYPE,
                           modeltype=ModelType.EXTERNAL, inputFeatures=list(FEATURES),
                           classLabels=["0", "1", "2"],
                           server=ExternalModel(url=url, protocol=protocol, **{**defaults, **server}))


def runtime_for(descriptor: ModelDescriptor, model_servers: ModelServers):
    return load_model(load_request(descriptor, [], 10**6, servers=model_servers))


def embedded(model):
    return load_model(load_request(descriptor_for(model), [model.path.parent], 10**9))


def rows(n: int, offset: int = 0) -> FeatureBatch:
    X = demo_dataset().X
    return FeatureBatch(FEATURES, X[[(offset + i) % len(X) for i in range(n)]])


def assert_same_predictions(got, expected, tolerance=1e-6):
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert (g.label, g.class_labels) == (e.label, e.class_labels)
        assert g.value == pytest.approx(e.value, abs=tolerance)
        assert list(g.probabilities) == pytest.approx(list(e.probabilities), abs=tolerance)


@pytest.fixture(scope="module")
def logreg(trained_models):
    return trained_models[ModelType.ONNX]


@pytest.fixture()
def v2_server(logreg):
    with FaultyModelServer(sklearn_v2_backend(logreg.estimator)) as server:
        yield server


# -- protocol encoding and decoding -----------------------------------------------------------

def test_v2_request_is_one_tensor_with_shape_datatype_and_row_major_data():
    path, body = v2_request(np.array([[1.5, 2.0], [3.0, 4.25]]), "my/model", "7",
                            outputs=["predict_proba"])
    assert path == "/v2/models/my%2Fmodel/versions/7/infer"
    assert json.loads(body) == {"inputs": [{"name": "input-0", "shape": [2, 2], "datatype": "FP64",
                                            "data": [1.5, 2.0, 3.0, 4.25]}],
                                "outputs": [{"name": "predict_proba"}]}
    path, body = v2_request(np.array([[0.1]]), "m", datatype="FP32", input_name="x")
    tensor = json.loads(body)["inputs"][0]
    assert path == "/v2/models/m/infer" and tensor["name"] == "x" and tensor["datatype"] == "FP32"
    assert tensor["data"] == [float(np.float32(0.1))] and "outputs" not in json.loads(body)


def test_tf_serving_request_uses_the_row_format():
    path, body = tf_serving_request(np.array([[1.0, 2.0]]), "wine", "3", signature="predict")
    assert path == "/v1/models/wine/versions/3:predict"
    assert json.loads(body) == {"instances": [[1.0, 2.0]], "signature_name": "predict"}
    path, body = tf_serving_request(np.array([[1.0, 2.0]]), "wine", input_name="inputs")
    assert path == "/v1/models/wine:predict"
    assert json.loads(body) == {"instances": [{"inputs": [1.0, 2.0]}]}


def test_v2_answers_are_read_as_shaped_typed_tensors():
    answer = json.dumps({"outputs": [
        {"name": "predict", "shape": [2], "datatype": "INT64", "data": [2, 0]},
        {"name": "predict_proba", "shape": [2, 3], "datatype": "FP64",
         "data": [[0.1, 0.2, 0.7], [0.8, 0.1, 0.1]]}]}).encode()   # nested data is allowed too
    named = dict(v2_outputs(answer, 2))
    assert named["predict"].dtype == np.int64 and named["predict"].tolist() == [2, 0]
    assert named["predict_proba"].shape == (2, 3) and named["predict_proba"][1, 0] == 0.8


@pytest.mark.parametrize("answer, reason", [
    (b"<html>oops</html>", "not JSON"),
    (b"[1, 2]", "not an object"),
    (b'{"model_name": "m"}', "non-empty 'outputs'"),
    (b'{"outputs": [{"name": "p", "shape": [2], "datatype": "FP99", "data": [1, 2]}]}', "unknown datatype"),
    (b'{"outputs": [{"name": "p", "shape": [2, 2], "datatype": "FP64", "data": [1, 2, 3]}]}', "does not fit"),
    (b'{"outputs": [{"name": "p", "shape": [3], "datatype": "FP64", "data": [1, 2, 3]}]}', "each of the 2 rows"),
    (b'{"outputs": [{"name": "p", "shape": [2], "datatype": "INT64", "data": ["a", "b"]}]}', "does not fit"),
])
def test_unreadable_v2_answers_say_what_is_wrong(answer, reason):
    with pytest.raises(ProtocolError, match=reason):
        v2_outputs(answer, 2)


def test_tf_serving_answers_in_every_documented_shape():
    single = dict(tf_serving_outputs(b'{"predictions": [[0.2, 0.8], [0.6, 0.4]]}', 2))
    assert single["predictions"].tolist() == [[0.2, 0.8], [0.6, 0.4]]
    several = dict(tf_serving_outputs(
        b'{"predictions": [{"probs": [0.2, 0.8], "label": 1}, {"probs": [0.6, 0.4], "label": 0}]}', 2))
    assert several["label"].tolist() == [1, 0] and several["probs"].shape == (2, 2)
    columnar = dict(tf_serving_outputs(b'{"outputs": {"probs": [[0.2, 0.8]], "x": [1]}}', 1,
                                       keep=["probs"]))
    assert list(columnar) == ["probs"]
    with pytest.raises(ProtocolError, match="answered an error: Servable not found"):
        tf_serving_outputs(b'{"error": "Servable not found for request"}', 1)
    with pytest.raises(ProtocolError, match="no output nope"):
        tf_serving_outputs(b'{"predictions": [1.0]}', 1, keep=["nope"])
    with pytest.raises(ProtocolError, match="ragged"):
        tf_serving_outputs(b'{"predictions": [[1.0, 2.0], [1.0]]}', 2)


# -- results equal the embedded runtimes' -----------------------------------------------------

def test_v2_server_results_equal_the_embedded_onnx_model(logreg, v2_server):
    runtime = runtime_for(external(v2_server.url), servers(v2_server.url))
    batch = rows(len(demo_dataset().X))
    assert_same_predictions(runtime.score(batch), embedded(logreg).score(batch))
    assert runtime.score(FeatureBatch(FEATURES, np.empty((0, 13)))) == []


def test_a_batch_is_one_call_split_at_max_rows_per_call(logreg, v2_server):
    runtime = runtime_for(external(v2_server.url, modelVersion="2"),
                          servers(v2_server.url, max_rows_per_call=50))
    batch = rows(120)
    assert_same_predictions(runtime.score(batch), embedded(logreg).score(batch))
    assert [path for path, _ in v2_server.calls] == ["/v2/models/wine/versions/2/infer"] * 3


def test_a_server_url_with_a_path_prefix_and_the_token_from_settings(logreg, v2_server):
    runtime = runtime_for(external(v2_server.url + "/serving", model="wine-on-server"),
                          servers(v2_server.url + "/serving", token="s3cret"))
    runtime.score(rows(2))
    path, headers = v2_server.calls[-1]
    assert path == "/serving/v2/models/wine-on-server/infer"
    assert headers["Authorization"] == "Bearer s3cret"


def test_tf_serving_results_equal_the_embedded_saved_model(trained_models):
    saved = trained_models[ModelType.TENSORFLOWSAVED]
    with FaultyModelServer(tf_serving_backend(saved.path)) as server:
        descriptor = external(server.url, ExternalModel.TENSORFLOW_SERVING)
        descriptor.signature = "predict"   # the descriptor's own field, as for an embedded model
        runtime = runtime_for(descriptor, servers(server.url))
        batch = rows(100)
        assert_same_predictions(runtime.score(batch), embedded(saved).score(batch))
        assert server.calls[0][0] == "/v1/models/wine:predict"


def test_concurrent_calls_share_the_connections_within_the_in_flight_bound(logreg, v2_server):
    v2_server.mode, v2_server.delay_s = SLOW, 0.05
    runtime = runtime_for(external(v2_server.url), servers(v2_server.url, max_in_flight=2))
    expected = embedded(logreg)
    batches = [rows(10, offset=10 * i) for i in range(12)]
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(runtime.score, batches))
    for got, batch in zip(answers, batches):
        assert_same_predictions(got, expected.score(batch))
    assert len(v2_server.calls) == 12 and v2_server.most_in_progress <= 2


# -- faults -------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode, reason", [
    (SLOW, r"did not answer within 300 ms"),
    (DRIP, r"did not answer within 300 ms"),
    (STATUS, r"answered HTTP 500: \{\"error\": \"injected failure\"\}"),
    (GARBAGE, r"unreadable answer: the answer is not JSON"),
    (NOT_HTTP, r"unreadable answer: not an HTTP answer"),
])
def test_each_fault_is_model_unavailable_with_its_reason(v2_server, mode, reason):
    v2_server.mode, v2_server.delay_s = mode, 0.5 if mode == SLOW else 0.02
    runtime = runtime_for(external(v2_server.url, timeoutMs=300),
                          servers(v2_server.url))   # the descriptor's 300 ms applies
    with pytest.raises(ModelUnavailable, match=reason) as caught:
        runtime.score(rows(30))
    assert f"Open Inference V2 model 'wine' at {v2_server.url}:" in str(caught.value) or \
        f"model 'wine' at {v2_server.url}" in str(caught.value)


def test_a_server_that_is_down_is_retried_then_unavailable():
    url = f"http://127.0.0.1:{free_port()}"
    runtime = runtime_for(external(url), servers(url, retries=2))
    with pytest.raises(ModelUnavailable, match=r"could not be reached \(3 attempts in .* s; last: "
                                               r"ConnectionRefusedError"):
        runtime.score(rows(3))


def test_dropped_connections_are_retried(logreg, v2_server):
    v2_server.drop_next = 2
    runtime = runtime_for(external(v2_server.url), servers(v2_server.url, retries=2))
    assert_same_predictions(runtime.score(rows(5)), embedded(logreg).score(rows(5)))
    assert len(v2_server.calls) == 3
    v2_server.mode = DROP   # every connection, also the kept-alive one (retried at once, free)
    with pytest.raises(ModelUnavailable, match=r"could not be reached \(3 attempts.*RemoteDisconnected"):
        runtime.score(rows(5))
    assert len(v2_server.calls) == 3 + 1 + 3


def test_a_descriptor_cannot_lengthen_the_jobs_timeout(v2_server):
    v2_server.mode, v2_server.delay_s = SLOW, 0.6
    runtime = runtime_for(external(v2_server.url, timeoutMs=60_000),
                          servers(v2_server.url, timeout_s=0.2))
    assert runtime.endpoint.timeout_s == 0.2
    with pytest.raises(ModelUnavailable, match="within 200 ms"):
        runtime.score(rows(1))


def test_the_circuit_opens_refuses_at_once_and_closes_when_a_probe_succeeds(logreg, v2_server):
    v2_server.mode = STATUS
    runtime = runtime_for(external(v2_server.url),
                          servers(v2_server.url, breaker_failures=3, breaker_reset_s=0.2))
    try:
        for _ in range(3):
            with pytest.raises(ModelUnavailable, match="HTTP 500"):
                runtime.score(rows(4))
        assert runtime.breaker.is_open
        calls = len(v2_server.calls)
        with pytest.raises(ModelUnavailable, match=r"circuit open for .*model 'wine'.*3 calls in a "
                                                   r"row failed, the last one .*HTTP 500"):
            runtime.score(rows(4))
        assert len(v2_server.calls) - calls <= 1   # at most a background probe, never the batch
        v2_server.mode = OK
        wait_until(lambda: not runtime.breaker.is_open, 30, "the circuit closing after a probe")
        probe_path, _ = v2_server.calls[-1]
        assert probe_path == "/v2/models/wine/infer"
        assert_same_predictions(runtime.score(rows(4)), embedded(logreg).score(rows(4)))
    finally:
        runtime.close()


def test_a_success_resets_the_count_of_failures_in_a_row(v2_server):
    runtime = runtime_for(external(v2_server.url), servers(v2_server.url, breaker_failures=2))
    for mode in (STATUS, OK, STATUS, OK, STATUS):
        v2_server.mode = mode
        try:
            runtime.score(rows(1))
        except ModelUnavailable:
            pass
    assert not runtime.breaker.is_open


def test_the_serving_core_dead_letters_a_batch_the_server_fails_without_one_by_one(v2_server):
    from modelserving.kafka.clients import Row, encode_record

    v2_server.mode = STATUS
    server = ModelServer(max_model_bytes=10**6, data_topic="mdata", models_topic="models",
                         model_servers=servers(v2_server.url))
    raw = external(v2_server.url).SerializeToString()
    model = server.build(raw)
    X = demo_dataset().X
    records = [encode_record(Row(DEMO_DATA_TYPE, FEATURES, tuple(X[i]), f"r{i}")) for i in range(5)]
    outcomes = server.serve(records, model)
    letters = [DeadLetter.FromString(o.payload) for o in outcomes]
    assert [o.is_dead_letter for o in outcomes] == [True] * 5
    assert {(d.kind, d.exceptionType, d.modelName) for d in letters} == \
        {(DeadLetter.MODEL_UNAVAILABLE, "ModelUnavailable", "wine")}
    assert all("answered HTTP 500" in d.reason for d in letters)
    assert len(v2_server.calls) == 1


# -- policies -----------------------------------------------------------------------------------

ALLOWED = ModelServers(allowed=(normalize_server_url("http://models.internal:8080/serving"),))


@pytest.mark.parametrize("url", [
    "http://models.internal:8080/serving", "http://MODELS.internal:8080/serving/",
    "http://models.internal:8080/serving/team-a",
])
def test_a_server_under_a_configured_prefix_is_accepted(url):
    request = load_request(external(url), [], 10**6, servers=ALLOWED)
    assert request.extra["endpoint"].url.startswith("http://models.internal:8080/serving")


@pytest.mark.parametrize("url, reason", [
    ("http://models.internal:8081/serving", "not one of the configured model servers"),
    ("http://models.internal:8080/servingx", "not one of the configured model servers"),
    ("http://models.internal:8080/other", "not one of the configured model servers"),
    ("http://evil.example:8080/serving", "not one of the configured model servers"),
    ("http://models.internal:8080/serving/../admin", "'..'"),
    ("http://models.internal:8080/serving/%2e%2e/admin", "escapes"),
    ("http://user:pw@models.internal:8080/serving", "credentials"),
    ("http://models.internal:8080/serving?x=1", "no query"),
    ("file:///etc/passwd", "only http and https"),
    ("http://models.internal:99999/serving", "not a URL"),
    ("", "only http and https"),
])
def test_a_server_outside_the_configured_ones_is_refused(url, reason):
    with pytest.raises(ModelRejected, match=reason):
        load_request(external(url), [], 10**6, servers=ALLOWED)


def test_no_configured_servers_refuse_every_external_model():
    with pytest.raises(ModelRejected, match=r"no model servers are configured \(set model_servers\)"):
        load_request(external("http://127.0.0.1:8080"), [], 10**6)


@pytest.mark.parametrize("change, reason", [
    (dict(modeltype=ModelType.ONNX), "only EXTERNAL models have"),
    (dict(data=b"x"), "needs 'server'"),
    (dict(server=ExternalModel(url="http://models.internal:8080/serving", protocol=9)),
     "unknown model server protocol 9"),
    (dict(server=ExternalModel(url="http://models.internal:8080/serving", inputDatatype="INT8")),
     "inputDatatype"),
    (dict(server=ExternalModel(url="http://models.internal:8080/serving", timeoutMs=-5)),
     "must not be negative"),
])
def test_inconsistent_external_descriptors_are_refused(change, reason):
    descriptor = external("http://models.internal:8080/serving")
    for field, value in change.items():
        if field == "server":
            descriptor.server.CopyFrom(value)
        else:
            setattr(descriptor, field, value)
    with pytest.raises(ModelRejected, match=reason):
        load_request(descriptor, [], 10**6, servers=ALLOWED)


def test_settings_refuse_a_bad_server_and_the_token_on_the_command_line():
    from jobs.settings import Settings, SettingsError

    settings = Settings.from_sources(["--model-servers", "http://a:1,https://b/x"], environ={
        "MODELSERVING_MODEL_SERVER_TOKEN": "tok"})
    servers_ = ModelServers.from_settings(settings)
    assert servers_.allowed == ("http://a:1", "https://b:443/x") and servers_.token == "tok"
    assert "tok" not in repr(settings) and settings.describe()["model_server_token"] == "***"
    with pytest.raises(SettingsError, match="model_servers: 'ftp://a' is not a server URL"):
        Settings.from_sources(["--model-servers", "ftp://a"], environ={})
    with pytest.raises(SettingsError, match="refused on the command line"):
        Settings.from_sources(["--model-server-token", "x"], environ={})
    with pytest.raises(SettingsError, match="model_server_timeout_ms must be positive"):
        Settings.from_sources(["--model-server-timeout-ms", "0"], environ={})


def test_loading_makes_no_call_so_a_server_down_at_restore_does_not_break_the_model():
    url = f"http://127.0.0.1:{free_port()}"
    runtime = runtime_for(external(url), servers(url))
    assert runtime.input_names == FEATURES and not math.isnan(runtime.endpoint.timeout_s)
