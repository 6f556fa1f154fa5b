"""The state service without a broker: the view's merging and history, the HTTP layer and
its page, the Kafka client configuration and the command."""
from __future__ import annotations

import json
import re
import socket
import urllib.error
import urllib.parse
import urllib.request

import pytest

from jobs.settings import Settings
from modelserving.errors import ToolError, UsageError
from modelserving.state import service as state_service
from modelserving.state.service import StateService, StateServiceError
from modelserving.state.view import ModelStateView
from protos import ModelStats, ModelType

T0 = 1_700_000_000_000


def stats(data_type="wine", job="keyed", part=-1, subtask=0, model="lr", version="1", model_id=None,
          model_type=ModelType.PMML, since=T0, usage=0, total_us=0.0, min_us=0.0, max_us=0.0,
          no_model=0, dead=0, published=None, has_model=True) -> bytes:
    return ModelStats(
        job=job, dataType=data_type, part=part, subtask=subtask, hasModel=has_model,
        modelName=model if has_model else "", modelDescription=f"{model} for {data_type}" if has_model else "",
        modelType=model_type if has_model else 0, modelVersion=version if has_model else "",
        modelId=(model_id or f"{model}-{version}-digest") if has_model else "",
        sinceMs=since if has_model else 0, usage=usage, totalMicros=total_us, minMicros=min_us,
        maxMicros=max_us, noModel=no_model, deadLetters=dead,
        publishedMs=published or since + 1000).SerializeToString()


def key(job, data_type, part=-1):
    return f"{job}/{data_type}" if part == -1 else f"{job}/{data_type}/{part}"


@pytest.fixture
def view():
    return ModelStateView(history_complete_since_ms=T0 - 5000)


# -- the view ----------------------------------------------------------------------------------

def test_keyed_stats_show_in_models(view):
    view.ingest(key("keyed", "wine"), stats(usage=120, total_us=240_000.0, min_us=800.0, max_us=9000.0,
                                            no_model=3, dead=2))
    answer = view.models()
    assert list(answer["data_types"]) == ["wine"] and answer["count"] == 1
    keyed = answer["data_types"]["wine"]["jobs"]["keyed"]
    assert keyed["model"] == {"name": "lr", "description": "lr for wine", "type": "PMML", "version": "1",
                              "id": "lr-1-digest", "since_ms": T0, "since": "2023-11-14T22:13:20.000+00:00"}
    assert keyed["stats"] == {"usage": 120, "mean_ms": 2.0, "min_ms": 0.8, "max_ms": 9.0, "total_ms": 240.0,
                              "no_model": 3, "dead_letters": 2}
    assert keyed["jitter"] is False and keyed["parts"] == 1 and keyed["has_model"] is True
    assert answer["history_complete_since_ms"] == T0 - 5000
    json.dumps(answer)  # JSON-able


def test_later_message_of_a_key_replaces_the_earlier(view):
    view.ingest(key("keyed", "wine"), stats(usage=10, total_us=10_000.0, min_us=500.0, max_us=2000.0))
    view.ingest(key("keyed", "wine"), stats(usage=25, total_us=30_000.0, min_us=400.0, max_us=2500.0))
    assert view.state("wine")["jobs"]["keyed"]["stats"]["usage"] == 25


def test_no_model_yet(view):
    view.ingest(key("keyed", "iris"), stats("iris", has_model=False, no_model=7))
    keyed = view.state("iris")["jobs"]["keyed"]
    assert keyed["has_model"] is False and keyed["model"] is None
    assert keyed["stats"]["no_model"] == 7 and keyed["stats"]["usage"] == 0
    assert keyed["stats"]["mean_ms"] is None and keyed["stats"]["min_ms"] is None


def test_broadcast_parts_are_merged(view):
    for part, (subtask, usage, total, lo, hi, no_model, dead) in enumerate(
            [(0, 10, 20_000.0, 1000.0, 3000.0, 1, 0), (1, 30, 30_000.0, 500.0, 2500.0, 2, 1),
             (0, 0, 0.0, 0.0, 0.0, 4, 0)]):
        view.ingest(key("broadcast", "wine", part),
                    stats(job="broadcast", part=part, subtask=subtask, usage=usage, total_us=total,
                          min_us=lo, max_us=hi, no_model=no_model, dead=dead, since=T0 + part))
    merged = view.state("wine")["jobs"]["broadcast"]
    assert merged["parts"] == 3
    assert merged["stats"] == {"usage": 40, "mean_ms": 1.25, "min_ms": 0.5, "max_ms": 3.0, "total_ms": 50.0,
                               "no_model": 7, "dead_letters": 1}
    assert merged["model"]["name"] == "lr" and merged["model"]["since_ms"] == T0  # first part to serve it
    assert merged["jitter"] is False
    assert [(i["part"], i["subtask"], i["model"], i["usage"]) for i in merged["instances"]] == [
        (0, 0, "lr v1", 10), (1, 1, "lr v1", 30), (2, 0, "lr v1", 0)]


def test_broadcast_jitter_when_parts_disagree(view):
    view.ingest(key("broadcast", "wine", 0), stats(job="broadcast", part=0, subtask=0, model="lr", version="1",
                                                   since=T0, usage=50, total_us=50_000.0, min_us=700.0,
                                                   max_us=1500.0, no_model=1))
    view.ingest(key("broadcast", "wine", 1), stats(job="broadcast", part=1, subtask=1, model="mlp", version="2",
                                                   since=T0 + 60_000, usage=4, total_us=8_000.0, min_us=1800.0,
                                                   max_us=2200.0, dead=1))
    merged = view.state("wine")["jobs"]["broadcast"]
    # the current model is the one that started most recently; its statistics are those of its parts
    assert merged["model"]["name"] == "mlp" and merged["model"]["version"] == "2"
    assert merged["stats"]["usage"] == 4 and merged["stats"]["mean_ms"] == 2.0
    assert merged["stats"]["min_ms"] == 1.8 and merged["stats"]["max_ms"] == 2.2
    # records without model and dead letters are the data type's, from every part
    assert merged["stats"]["no_model"] == 1 and merged["stats"]["dead_letters"] == 1
    assert merged["jitter"] is True
    assert [{"subtask": i["subtask"], "model": i["model"]} for i in merged["instances"]] == [
        {"subtask": 0, "model": "lr v1"}, {"subtask": 1, "model": "mlp v2"}]
    # part 0 catches up: no more jitter, and the usage counts both parts
    view.ingest(key("broadcast", "wine", 0), stats(job="broadcast", part=0, subtask=0, model="mlp", version="2",
                                                   since=T0 + 60_050, usage=6, total_us=12_000.0,
                                                   min_us=1500.0, max_us=2400.0, no_model=1))
    merged = view.state("wine")["jobs"]["broadcast"]
    assert merged["jitter"] is False and merged["stats"]["usage"] == 10
    assert merged["stats"]["min_ms"] == 1.5 and merged["stats"]["max_ms"] == 2.4
    assert merged["model"]["since_ms"] == T0 + 60_000


def test_part_without_model_is_jitter(view):
    view.ingest(key("broadcast", "wine", 0), stats(job="broadcast", part=0, usage=3))
    view.ingest(key("broadcast", "wine", 1), stats(job="broadcast", part=1, subtask=1, has_model=False,
                                                   no_model=2))
    merged = view.state("wine")["jobs"]["broadcast"]
    assert merged["jitter"] is True and merged["model"]["name"] == "lr"
    assert [i["model"] for i in merged["instances"]] == ["lr v1", None]


def test_two_jobs_serving_one_data_type_show_both(view):
    view.ingest(key("keyed", "wine"), stats(usage=5))
    view.ingest(key("broadcast", "wine", 3), stats(job="broadcast", part=3, model="mlp", usage=7))
    view.ingest(key("keyed", "iris"), stats("iris", model="tree", usage=1))
    answer = view.models()
    assert sorted(answer["data_types"]) == ["iris", "wine"]
    wine = answer["data_types"]["wine"]["jobs"]
    assert sorted(wine) == ["broadcast", "keyed"]
    assert (wine["keyed"]["model"]["name"], wine["keyed"]["stats"]["usage"]) == ("lr", 5)
    assert (wine["broadcast"]["model"]["name"], wine["broadcast"]["stats"]["usage"]) == ("mlp", 7)


def test_history_after_a_switch_newest_first(view):
    view.ingest(key("keyed", "wine"), stats(model="lr", version="1", since=T0, usage=10))
    view.ingest(key("keyed", "wine"), stats(model="lr", version="1", since=T0, usage=42))
    view.ingest(key("keyed", "wine"), stats(model="mlp", version="2", model_type=ModelType.ONNX,
                                            since=T0 + 20_000, usage=3))
    history = view.history("wine")
    assert [(h["name"], h["version"], h["type"], h["usage"], h["since_ms"]) for h in history["models"]] == [
        ("mlp", "2", "ONNX", 3, T0 + 20_000), ("lr", "1", "PMML", 42, T0)]
    assert history["history_complete_since_ms"] == T0 - 5000
    assert [h["model"] for h in view.history("wine", limit=1)["models"]] == ["mlp v2"]
    # a model that comes back after another one is a new entry
    view.ingest(key("keyed", "wine"), stats(model="lr", version="1", since=T0 + 40_000, usage=1))
    assert [(h["model"], h["usage"]) for h in view.history("wine")["models"]] == [
        ("lr v1", 1), ("mlp v2", 3), ("lr v1", 42)]
    assert view.history("unknown") is None


def test_broadcast_history_sums_the_parts_of_each_model(view):
    for part in (0, 1):
        view.ingest(key("broadcast", "wine", part), stats(job="broadcast", part=part, subtask=part,
                                                          since=T0 + part, usage=10 + part))
    for part in (1, 0):  # the new model reaches part 1 first
        view.ingest(key("broadcast", "wine", part), stats(job="broadcast", part=part, subtask=part, model="mlp",
                                                          since=T0 + 30_000 - part, usage=5))
    models = view.history("wine")["models"]
    assert [(h["job"], h["model"], h["usage"], h["since_ms"]) for h in models] == [
        ("broadcast", "mlp v1", 10, T0 + 29_999), ("broadcast", "lr v1", 21, T0)]


def test_tombstone_removes_a_key(view):
    view.ingest(key("keyed", "wine"), stats(usage=5))
    view.ingest(key("keyed", "iris"), stats("iris", usage=6))
    view.ingest(key("keyed", "wine"), None)
    assert list(view.models()["data_types"]) == ["iris"]
    assert view.state("wine") is None
    assert view.health()["tombstones"] == 1 and view.health()["keys"] == 1
    # one broadcast part withdrawn: the others remain
    view.ingest(key("broadcast", "iris", 0), stats("iris", job="broadcast", part=0, usage=1))
    view.ingest(key("broadcast", "iris", 1), stats("iris", job="broadcast", part=1, usage=2))
    view.ingest(key("broadcast", "iris", 0), None)
    assert view.state("iris")["jobs"]["broadcast"]["stats"]["usage"] == 2


def test_undecodable_records_are_counted_and_skipped(view):
    view.ingest(key("keyed", "wine"), b"\xff\xff\xff not a protobuf")
    view.ingest(key("keyed", "wine"), stats(usage=5))
    assert view.health()["undecodable"] == 1
    assert view.state("wine")["jobs"]["keyed"]["stats"]["usage"] == 5


def test_job_and_data_type_from_the_key_when_the_message_leaves_them_empty(view):
    raw = ModelStats(part=-1, hasModel=True, modelName="lr", modelId="x", usage=9).SerializeToString()
    view.ingest(b"keyed/wine", raw)
    assert view.state("wine")["jobs"]["keyed"]["stats"]["usage"] == 9


def test_rebuilding_from_the_latest_per_key_gives_the_same_view(view):
    stream = [(key("keyed", "wine"), stats(usage=1)), (key("keyed", "wine"), stats(usage=8)),
              (key("broadcast", "wine", 0), stats(job="broadcast", part=0, usage=3)),
              (key("broadcast", "wine", 1), stats(job="broadcast", part=1, model="mlp", since=T0 + 9, usage=4)),
              (key("keyed", "iris"), stats("iris")), (key("keyed", "iris"), None)]
    for k, v in stream:
        view.ingest(k, v)
    compacted = {}
    for k, v in stream:
        compacted[k] = v
    rebuilt = ModelStateView(history_complete_since_ms=view.history_complete_since_ms)
    for k, v in compacted.items():
        rebuilt.ingest(k, v)
    strip = lambda answer: {k: v for k, v in answer.items() if k != "as_of_ms"}  # noqa: E731
    assert strip(rebuilt.models()) == strip(view.models())


# -- HTTP --------------------------------------------------------------------------------------

OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def get(url: str):
    try:
        with OPENER.open(url, timeout=5) as response:
            return response.status, response.headers.get_content_type(), response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.headers.get_content_type(), error.read().decode()


@pytest.fixture
def service():
    svc = StateService(port=0, view=ModelStateView(history_complete_since_ms=T0 - 5000)).start()
    try:
        yield svc
    finally:
        svc.stop()


def test_http_endpoints(service):
    service.view.ingest(key("keyed", "wine"), stats(model="lr", usage=120, total_us=240_000.0, min_us=800.0,
                                                    max_us=9000.0, dead=2))
    service.view.ingest(key("keyed", "wine"), stats(model="mlp", version="2", since=T0 + 10_000, usage=7,
                                                    total_us=7_000.0, min_us=900.0, max_us=1100.0, dead=3))
    for part in (0, 1):
        service.view.ingest(key("broadcast", "wine", part),
                            stats(job="broadcast", part=part, subtask=part, model="mlp", version="2",
                                  since=T0 + 10_000 + part, usage=3, total_us=3000.0, min_us=1000.0,
                                  max_us=1000.0))
    assert service.url.startswith("http://127.0.0.1:")

    status, ctype, body = get(service.url + "/models")
    assert (status, ctype) == (200, "application/json")
    jobs = json.loads(body)["data_types"]["wine"]["jobs"]
    assert jobs["keyed"]["model"]["name"] == "mlp" and jobs["keyed"]["stats"]["usage"] == 7
    assert jobs["keyed"]["stats"]["dead_letters"] == 3
    assert jobs["broadcast"]["stats"]["usage"] == 6 and jobs["broadcast"]["jitter"] is False

    status, ctype, body = get(service.url + "/state/wine")
    assert (status, ctype) == (200, "application/json")
    assert json.loads(body)["data_type"] == "wine"
    assert json.loads(body)["jobs"]["keyed"]["stats"]["mean_ms"] == 1.0

    status, ctype, body = get(service.url + "/history/wine")
    assert (status, ctype) == (200, "application/json")
    history = json.loads(body)
    assert [(h["job"], h["model"], h["usage"]) for h in history["models"]] == [
        ("broadcast", "mlp v2", 6), ("keyed", "mlp v2", 7), ("keyed", "lr v1", 120)]
    assert history["history_complete_since_ms"] == T0 - 5000
    status, _, body = get(service.url + "/history/wine?limit=1")
    assert status == 200 and len(json.loads(body)["models"]) == 1
    assert get(service.url + "/history/wine?limit=x")[0] == 400

    status, ctype, body = get(service.url + "/health")
    assert (status, ctype) == (200, "application/json")
    assert json.loads(body)["status"] == "ok" and json.loads(body)["view"]["keys"] == 3


def test_unknown_data_type_is_a_404_naming_the_known_ones(service):
    service.view.ingest(key("keyed", "wine"), stats())
    service.view.ingest(key("keyed", "iris"), stats("iris"))
    for path in ("/state/beer", "/history/beer"):
        status, ctype, body = get(service.url + path)
        assert (status, ctype) == (404, "application/json")
        answer = json.loads(body)
        assert answer["data_type"] == "beer" and answer["known_data_types"] == ["iris", "wine"]
        assert "'beer'" in answer["message"] and "iris, wine" in answer["message"]
    status, ctype, body = get(service.url + "/nowhere")
    assert (status, ctype) == (404, "application/json") and json.loads(body)["path"] == "/nowhere"



def test_unknown_model_type_is_named_by_its_number(view):
    view.ingest(key("keyed", "wine"), stats(model_type=99))
    assert view.state("wine")["jobs"]["keyed"]["model"]["type"] == "99"


# -- the page: static, drawn by its script from the JSON -------------------------------------

HOSTILE = "<script>alert(1)</script>"


def headers_of(url: str):
    with OPENER.open(url, timeout=5) as response:
        return response.headers


def test_page_is_static_and_carries_no_data(service):
    status, ctype, empty = get(service.url + "/")
    assert (status, ctype) == (200, "text/html")
    service.view.ingest(key("keyed", "wine"), stats(model="winequality<lr>", usage=1234))
    status, ctype, body = get(service.url + "/")
    assert (status, ctype) == (200, "text/html")
    assert body == empty  # the server writes no data into HTML; the script fetches the JSON
    assert "winequality" not in body and "1234" not in body


def test_page_script_only_ever_writes_text():
    """The script fills the DOM through textContent and setAttribute: nothing in it parses
    strings as markup or code."""
    from modelserving.state.app import load_page

    page = load_page()
    script = re.search(r"<script>(.*?)</script>", page, flags=re.DOTALL).group(1)
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(",
                 "new Function", "DOMParser", "createContextualFragment"):
        assert sink not in script, sink
    assert "textContent" in script
    # self-contained: nothing loaded from elsewhere
    assert "src=" not in page and "https://" not in page and "http://" not in page


def test_page_is_served_with_a_policy_admitting_only_its_own_script(service):
    from modelserving.state.app import content_security_policy, load_page

    policy = headers_of(service.url + "/")["Content-Security-Policy"]
    directives = dict(d.strip().split(" ", 1) for d in policy.split(";"))
    assert directives["default-src"] == "'none'" and directives["connect-src"] == "'self'"
    assert re.fullmatch(r"'sha256-[A-Za-z0-9+/=]+'", directives["script-src"])  # no 'unsafe-inline'
    assert policy == content_security_policy(load_page())
    assert headers_of(service.url + "/models")["X-Content-Type-Options"] == "nosniff"
    assert get(service.url + "/favicon.ico")[0] == 204


def test_hostile_names_are_plain_values_in_the_json(service):
    """A data type or model name that looks like markup comes out as the same string, and
    the JSON's bytes hold no markup at all."""
    service.view.ingest(key("keyed", HOSTILE), stats(HOSTILE, model='<img src=x onerror="alert(2)">'))
    for path in ("/models", "/state/" + urllib.parse.quote(HOSTILE, safe=""),
                 "/history/" + urllib.parse.quote(HOSTILE, safe="")):
        status, ctype, body = get(service.url + path)
        assert (status, ctype) == (200, "application/json"), (path, body)
        assert "<" not in body and ">" not in body
    models = json.loads(get(service.url + "/models")[2])
    assert list(models["data_types"]) == [HOSTILE]
    assert models["data_types"][HOSTILE]["jobs"]["keyed"]["model"]["name"] == '<img src=x onerror="alert(2)">'
    history = json.loads(get(service.url + "/history/" + urllib.parse.quote(HOSTILE, safe=""))[2])
    assert history["data_type"] == HOSTILE and history["models"][0]["model"] == '<img src=x onerror="alert(2)"> v1'


# -- Kafka access: the settings' bootstrap, topic and security ------------------------------

def test_feed_consumer_is_configured_from_the_settings(tmp_path):
    properties = tmp_path / "client.properties"
    properties.write_text('sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule '
                          'required username="reader" password="s3cret";\n')
    settings = Settings.from_sources([], environ={}, bootstrap_servers="kafka-1:9093",
                                     state_topic="stats", security_protocol="SASL_SSL",
                                     sasl_mechanism="SCRAM-SHA-512", ssl_cafile="/etc/ca.pem",
                                     kafka_properties_file=str(properties))
    service = StateService(settings, port=0)
    config = service.feed.consumer_config
    assert (config["bootstrap_servers"], config["security_protocol"], config["sasl_mechanism"]) == (
        "kafka-1:9093", "SASL_SSL", "SCRAM-SHA-512")
    assert (config["sasl_plain_username"], config["sasl_plain_password"]) == ("reader", "s3cret")
    assert config["ssl_cafile"] == "/etc/ca.pem"
    assert config["group_id"] is None and config["isolation_level"] == "read_committed"
    assert service.feed.topic == "stats"
    assert "s3cret" not in json.dumps(service.app.health())


def test_settings_that_cannot_reach_kafka_are_a_usage_error():
    no_password = Settings.from_sources([], environ={}, security_protocol="SASL_PLAINTEXT",
                                        sasl_mechanism="PLAIN", sasl_username="reader")
    with pytest.raises(UsageError, match="sasl_password"):
        StateService(no_password, port=0)
    with pytest.raises(UsageError, match="state topic is empty"):
        StateService(Settings.from_sources([], environ={}, state_topic=""), port=0)


def test_a_taken_port_is_a_one_line_error():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with pytest.raises(StateServiceError) as failure:
            StateService(port=port).start()
    assert isinstance(failure.value, ToolError) and "\n" not in str(failure.value)
    assert f"127.0.0.1:{port}" in str(failure.value)


def test_feed_health_without_a_broker():
    """No broker listening: the service still answers, /health says why it is not ready."""
    from modelserving.local.processes import free_port

    settings = Settings.from_sources([], environ={}, bootstrap_servers=f"127.0.0.1:{free_port()}")
    with StateService(settings, port=0, consumer_overrides={"bootstrap_timeout_ms": 300}) as service:
        status, ctype, body = get(service.url + "/health")
        assert (status, ctype) == (503, "application/json")
        assert json.loads(body)["ready"] is False
        assert json.loads(body)["status"] in ("starting", "connecting")
        assert get(service.url + "/models")[0] == 200
        error = eventually_error(service)
        assert error.startswith("reading model-state: no Kafka broker answered at 127.0.0.1:"), error


def eventually_error(service, timeout_s=5.0):
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        health = json.loads(get(service.url + "/health")[2])
        if health["feed"]["error"]:
            assert health["status"] == "connecting"
            return health["feed"]["error"]
        time.sleep(0.05)
    raise AssertionError("no error reported in /health")


# -- the command ---------------------------------------------------------------------------

@pytest.fixture
def no_settings_in_environment(monkeypatch):
    import os

    for name in list(os.environ):
        if name.startswith("MODELSERVING_"):
            monkeypatch.delenv(name)


def test_cli_adds_state_serve():
    import argparse

    from modelserving.cli import state as state_cli

    parser = argparse.ArgumentParser()
    state_cli.register(parser.add_subparsers(dest="command"))
    args, extra = parser.parse_known_args(["state", "serve"])
    assert (args.host, args.port, args.func, args.takes_settings, extra) == (
        state_service.DEFAULT_HOST, state_service.DEFAULT_PORT, state_cli.cmd_serve, True, [])
    args, extra = parser.parse_known_args(["state", "serve", "--bootstrap", "k:9092", "--topic", "t",
                                           "--host", "0.0.0.0", "--port", "5600",
                                           "--security-protocol", "SSL"])
    assert (args.bootstrap, args.topic, args.host, args.port) == ("k:9092", "t", "0.0.0.0", 5600)
    assert extra == ["--security-protocol", "SSL"]  # job settings, handed over as job_args


def test_cli_failures_are_one_line(no_settings_in_environment, capsys):
    from modelserving.cli import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        assert main(["state", "serve", "--port", str(port), "--bootstrap", "127.0.0.1:1"]) == 1
    error = capsys.readouterr().err
    assert error.startswith("modelserving: the state service cannot listen on") and error.count("\n") == 1
    assert main(["state", "serve", "--port", "0", "--security-protocol", "SASL_SSL"]) == 2
    error = capsys.readouterr().err
    assert "sasl_mechanism" in error and error.count("\n") == 1 and "Traceback" not in error
    assert main(["state", "serve", "--no-such-setting", "1"]) == 2
    assert "--no-such-setting" in capsys.readouterr().err


def with_set(raw: bytes, figures: list[tuple], budget_ms=50, decider=1) -> bytes:
    """``raw`` ModelStats with a speculative set of the models in ``figures``: (model id, name,
    answered, wins, timeouts, failures, total ms, max ms)."""
    from protos import SpeculativeModelStats, SpeculativeSet

    message = ModelStats.FromString(raw)
    message.speculative.CopyFrom(SpeculativeSet(models=[f[0] for f in figures], budgetMs=budget_ms,
                                                decider=decider))
    message.speculativeModels.extend(
        SpeculativeModelStats(modelId=m, modelName=name, modelVersion="1", answered=a, wins=w,
                              timeouts=t, failures=f, totalMillis=total, maxMillis=hi)
        for m, name, a, w, t, f, total, hi in figures)
    return message.SerializeToString()


def test_speculative_figures_are_summed_over_the_parts_running_the_set(view):
    view.ingest(key("broadcast", "wine", 0), with_set(stats(job="broadcast", part=0), [
        ("fast", "lr", 10, 8, 0, 0, 20.0, 3.0), ("slow", "mlp", 4, 2, 6, 0, 160.0, 48.0)]))
    view.ingest(key("broadcast", "wine", 1), with_set(stats(job="broadcast", part=1, subtask=1), [
        ("fast", "lr", 30, 25, 0, 0, 30.0, 2.0), ("slow", "", 0, 0, 30, 5, 0.0, 0.0)]))
    view.ingest(key("broadcast", "wine", 2), stats(job="broadcast", part=2))   # no set there
    speculative = view.state("wine")["jobs"]["broadcast"]["speculative"]
    assert speculative == {"decider": "CONSENSUS", "budget_ms": 50, "models": [
        {"model_id": "fast", "model": "lr v1", "answered": 40, "wins": 33, "timeouts": 0,
         "failures": 0, "mean_ms": 1.25, "max_ms": 3.0},
        {"model_id": "slow", "model": "mlp v1", "answered": 4, "wins": 2, "timeouts": 36,
         "failures": 5, "mean_ms": 40.0, "max_ms": 48.0}]}
    view.ingest(key("keyed", "wine"), stats())
    assert view.state("wine")["jobs"]["keyed"]["speculative"] is None


# -- canary and shadow: the candidate beside a job's model ---------------------------------------

def with_candidate(raw: bytes, records: int, primary_records: int, compared: int, agreed: int,
                   difference_sum: float, abs_difference_sum: float, failures: int = 0,
                   since: int = T0 + 100, mode: str = "CANARY", share: float = 0.1,
                   version: str = "2", descriptor_id: str = "cand-2", name: str = "mlp") -> bytes:
    """``raw`` ModelStats with a candidate of these figures (``CandidateStats``)."""
    from protos import CandidateStats, Rollout

    message = ModelStats.FromString(raw)
    message.candidate.CopyFrom(CandidateStats(
        modelId="", modelName=name, modelVersion=version, descriptorId=descriptor_id,
        mode=Rollout.Mode.Value(mode), share=share if mode == "CANARY" else 0.0, sinceMs=since,
        records=records, failures=failures, compared=compared, agreed=agreed,
        differenceSum=difference_sum, absDifferenceSum=abs_difference_sum,
        primaryRecords=primary_records))
    return message.SerializeToString()


def test_a_canary_candidates_counts_are_summed_over_the_parts_holding_it(view):
    """Each broadcast part counts its own records: the data type's figures are the sums, and
    the agreement is that of the sums (1200/1234), not the mean of the parts' rates. A part
    still holding an older candidate and a part without one are left out of the sums."""
    view.ingest(key("broadcast", "wine", 0), with_candidate(
        stats(job="broadcast", part=0), records=400, primary_records=3600, compared=400,
        agreed=390, difference_sum=4.0, abs_difference_sum=6.0, failures=1, since=T0 + 100))
    view.ingest(key("broadcast", "wine", 1), with_candidate(
        stats(job="broadcast", part=1, subtask=1), records=834, primary_records=5366,
        compared=834, agreed=810, difference_sum=10.8, abs_difference_sum=12.0, failures=2,
        since=T0 + 50))
    view.ingest(key("broadcast", "wine", 2), with_candidate(
        stats(job="broadcast", part=2), records=99, primary_records=1, compared=99, agreed=0,
        difference_sum=-50.0, abs_difference_sum=50.0, since=T0 - 1000, version="1",
        descriptor_id="cand-1"))
    view.ingest(key("broadcast", "wine", 3), stats(job="broadcast", part=3))
    candidate = view.state("wine")["jobs"]["broadcast"]["candidate"]
    assert candidate == {
        "model": "mlp v2", "name": "mlp", "version": "2", "model_id": "",
        "descriptor_id": "cand-2", "mode": "canary", "share": 0.1,
        "since_ms": T0 + 50, "since": "2023-11-14T22:13:20.050+00:00",
        "records": 1234, "failures": 3, "primary_records": 8966, "of_records": 10_200,
        "record_share": round(1234 / 10_200, 6), "compared": 1234, "agreed": 1200,
        "agreement_rate": round(1200 / 1234, 6), "mean_score_difference": round(14.8 / 1234, 6),
        "mean_abs_score_difference": round(18.0 / 1234, 6), "parts": 2}
    # the figures a person reads: 12.1% of 10,200, agreement 97.2%, difference +0.0120
    assert (f"{candidate['record_share']:.1%}", f"{candidate['agreement_rate']:.1%}",
            f"{candidate['mean_score_difference']:+.4f}") == ("12.1%", "97.2%", "+0.0120")


def test_a_shadow_candidates_records_are_a_share_of_the_primarys_and_none_without_candidate(view):
    view.ingest(key("keyed", "wine"), with_candidate(
        stats(), records=500, primary_records=500, compared=498, agreed=498,
        difference_sum=-0.996, abs_difference_sum=0.996, failures=2, mode="SHADOW"))
    candidate = view.state("wine")["jobs"]["keyed"]["candidate"]
    assert (candidate["mode"], candidate["share"], candidate["of_records"],
            candidate["record_share"]) == ("shadow", None, 500, 1.0)
    assert (candidate["agreement_rate"], candidate["mean_score_difference"]) == (1.0, -0.002)
    # nothing compared yet: no rates rather than a division by zero
    view.ingest(key("keyed", "wine"), with_candidate(
        stats(), records=0, primary_records=0, compared=0, agreed=0, difference_sum=0.0,
        abs_difference_sum=0.0))
    candidate = view.state("wine")["jobs"]["keyed"]["candidate"]
    assert (candidate["agreement_rate"], candidate["mean_score_difference"],
            candidate["record_share"]) == (None, None, None)
    # the candidate promoted or aborted: the jobs publish statistics without one
    view.ingest(key("keyed", "wine"), stats(usage=3))
    assert view.state("wine")["jobs"]["keyed"]["candidate"] is None
    assert view.models()["data_types"]["wine"]["jobs"]["keyed"]["candidate"] is None


# -- the lifecycle timeline: the repository's deployments with the state's figures --------------

def repository_entry(version: str, *deployments: tuple, name: str = "logreg",
                     data_type: str = "wine"):
    """A RepositoryEntry of ``version`` with ``deployments``: (job, outcome name, role,
    deployed, retired, retired by, reason), built field by field as the jobs record them."""
    from protos import RepositoryEntry

    entry = RepositoryEntry(dataType=data_type, name=name, version=version,
                            modelType=ModelType.ONNX, digest=f"{version:0>64}",
                            createdMs=T0 + int(version), publishedMs=T0 + int(version),
                            descriptorId=f"descriptor-{version}")
    for job, outcome, role, deployed, retired, by, reason in deployments:
        entry.deployments.add(job=job, outcome=RepositoryEntry.Outcome.Value(outcome), role=role,
                              deployedMs=deployed, retiredMs=retired, retiredBy=by, reason=reason)
    return entry


def repository_of(*entries):
    from modelserving.state.repository import RepositoryView

    folded = RepositoryView()
    for entry in entries:
        folded.ingest(None, entry.SerializeToString())
    return folded


REFUSAL = "validation failed on 45 rows: accuracy 0.6000 < minimum 0.9 (27/45 labels)"


def canary_then_shadow_repository():
    """keyed: v1 the model from +1 s; v2 a 10% canary from +10 s, promoted at +30 s (v1
    retired by 2, v2 accepted as the model); v3 a shadow from +40 s; v4 refused at +50 s.
    broadcast: v1 the model from +1.5 s, still."""
    return repository_of(
        repository_entry("1", ("keyed", "ACCEPTED", "", T0 + 1000, T0 + 30_000, "2", ""),
                         ("broadcast", "ACCEPTED", "", T0 + 1500, 0, "", "")),
        repository_entry("2", ("keyed", "ACCEPTED", "canary 10%", T0 + 10_000, T0 + 30_000,
                               "promoted", ""),
                         ("keyed", "ACCEPTED", "", T0 + 30_000, 0, "", "")),
        repository_entry("3", ("keyed", "ACCEPTED", "shadow", T0 + 40_000, 0, "", "")),
        repository_entry("4", ("keyed", "VALIDATION_FAILED", "", T0 + 50_000, 0, "", REFUSAL)))


def with_drift(raw: bytes, features: dict[str, float], flagged: list[str], rows: int,
               output_psi: float = -1.0, threshold: float = 0.2) -> bytes:
    from protos import FeatureDrift

    message = ModelStats.FromString(raw)
    message.drift.extend(FeatureDrift(feature=name, psi=psi, flagged=name in flagged)
                         for name, psi in features.items())
    message.outputPsi, message.driftFlagged = output_psi, bool(flagged)
    message.driftThreshold, message.driftRows = threshold, rows
    return message.SerializeToString()


def canary_then_shadow_state(view):
    """What the jobs published meanwhile: keyed served v1 for 5,000 records, then v2 (700 so
    far, drifting on alcohol, v3 in shadow beside it); broadcast's two parts served v1."""
    view.ingest(key("keyed", "wine"), stats(model="logreg", version="1", since=T0 + 1000,
                                            usage=5000))
    view.ingest(key("keyed", "wine"), with_candidate(with_drift(
        stats(model="logreg", version="2", since=T0 + 30_000, usage=700),
        {"alcohol": 0.41, "ash": 0.05}, ["alcohol"], rows=600, output_psi=0.12),
        records=700, primary_records=700, compared=690, agreed=680, difference_sum=0.69,
        abs_difference_sum=1.38, since=T0 + 40_000, mode="SHADOW", version="3",
        descriptor_id="descriptor-3", name="logreg"))
    for part in (0, 1):
        view.ingest(key("broadcast", "wine", part),
                    stats(job="broadcast", part=part, subtask=part, model="logreg", version="1",
                          since=T0 + 1500 + part, usage=10 * (part + 1)))


def test_the_timeline_lists_each_deployment_in_time_order_with_usage_and_current_figures(view):
    from modelserving.state.timeline import timeline

    canary_then_shadow_state(view)
    answer = timeline(canary_then_shadow_repository(), view, "wine")
    shown = [(e["deployed_ms"] - T0, e["version"], e["job"], e["role_label"], e["status"],
              e["retired_ms"] and e["retired_ms"] - T0, e["note"], e["usage"])
             for e in answer["events"]]
    assert shown == [
        (1000, "1", "keyed", "primary", "RETIRED", 30_000, "replaced by 2", 5000),
        (1500, "1", "broadcast", "primary", "SERVING", None, None, 30),
        (10_000, "2", "keyed", "canary 10%", "RETIRED", 30_000, "promoted", None),
        (30_000, "2", "keyed", "primary", "SERVING", None, None, 700),
        (40_000, "3", "keyed", "shadow", "CANDIDATE", None, None, 700),
        (50_000, "4", "keyed", "primary", "VALIDATION_FAILED", None, REFUSAL, None)]
    events = answer["events"]
    # the current model of each job carries its drift; keyed's current candidate its figures
    assert events[3]["drift"] == {"flagged": True, "psi_max": 0.41, "psi_max_of": "alcohol",
                                  "threshold": 0.2, "rows": 600, "flagged_features": ["alcohol"]}
    assert events[1]["drift"] is None                 # broadcast measures no drift of v1
    assert events[4]["candidate"]["mode"] == "shadow"
    assert events[4]["candidate"]["agreement_rate"] == round(680 / 690, 6)
    assert [e["candidate"] is None for e in events] == [True, True, True, True, False, True]
    assert [e["deployed"] for e in events][:1] == ["2023-11-14T22:13:21.000+00:00"]
    json.dumps(answer)


def test_a_rolled_back_versions_usage_goes_to_the_deployment_it_served_in(view):
    """v1 serves twice (rolled back to): the state's history has two entries of v1, each
    counted for the deployment that started closest to it, not both for one."""
    from modelserving.state.timeline import timeline

    repository = repository_of(
        repository_entry("1", ("keyed", "ACCEPTED", "", T0 + 1000, T0 + 5000, "2", ""),
                         ("keyed", "ACCEPTED", "", T0 + 9000, 0, "", "")),
        repository_entry("2", ("keyed", "ACCEPTED", "", T0 + 5000, T0 + 9000, "1", "")))
    for version, since, usage in (("1", T0 + 1000, 10), ("2", T0 + 5000, 20), ("1", T0 + 9000, 30)):
        view.ingest(key("keyed", "wine"), stats(model="logreg", version=version, since=since,
                                                usage=usage))
    events = timeline(repository, view, "wine")["events"]
    assert [(e["version"], e["status"], e["usage"]) for e in events] == [
        ("1", "RETIRED", 10), ("2", "RETIRED", 20), ("1", "SERVING", 30)]
    # without statistics, usage is unknown (None), never 0
    assert {e["usage"] for e in timeline(repository, ModelStateView(), "wine")["events"]} == {None}
    assert timeline(repository, view, "beer") is None


def test_the_repository_tells_the_model_from_its_candidate():
    """A candidate deployed after the data type's model does not replace it: the listing
    names v2 as what serves keyed and v3 as its shadow candidate."""
    repository = canary_then_shadow_repository()
    wine = repository.listing()["data_types"]["wine"]
    assert {job: s["version"] for job, s in wine["serving"].items()} == {"broadcast": "1",
                                                                         "keyed": "2"}
    assert wine["candidates"] == {"keyed": {"version": "3", "name": "logreg", "model_id": "",
                                            "digest": f"{'3':0>64}", "role": "shadow"}}
    history = repository.history("wine")
    assert [v["outcome"] for v in history["versions"]] == ["SERVING", "SERVING", "CANDIDATE",
                                                           "VALIDATION_FAILED"]
    assert history["candidates"] == {"keyed": {"version": "3", "role": "shadow"}}
    assert repository.show("wine", "3")["candidate_on"] == ["keyed"]
    assert repository.show("wine", "3")["serving_on"] == []
    canary = history["versions"][1]["deployments"][0]
    assert (canary["role"], canary["role_label"], canary["note"]) == ("canary 10%", "canary 10%",
                                                                      "promoted")


def test_the_timeline_endpoints():
    view = ModelStateView(history_complete_since_ms=T0 - 5000)
    canary_then_shadow_state(view)
    with StateService(port=0, view=view, repository=canary_then_shadow_repository()) as service:
        status, ctype, body = get(service.url + "/timeline/wine")
        assert (status, ctype) == (200, "application/json")
        assert [e["version"] for e in json.loads(body)["events"]] == ["1", "1", "2", "2", "3", "4"]
        status, _, body = get(service.url + "/timeline")
        assert status == 200 and list(json.loads(body)["data_types"]) == ["wine"]
        assert json.loads(body)["data_types"]["wine"] == json.loads(
            get(service.url + "/timeline/wine")[2])
        status, _, body = get(service.url + "/timeline/beer")
        assert status == 404 and json.loads(body)["known_data_types"] == ["wine"]


def test_without_a_repository_the_timeline_says_so(service):
    status, _, body = get(service.url + "/timeline")
    assert status == 404 and "reads no repository topic" in json.loads(body)["message"]
    assert get(service.url + "/timeline/wine")[0] == 404
