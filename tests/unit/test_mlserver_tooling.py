"""The local MLServer's files and commands, without starting it (the e2e tier starts it)."""
from __future__ import annotations

import json

import joblib
import numpy as np
import pytest

from modelserving import cli
from modelserving.cli.mlserver import DEFAULT_PORT as CLI_DEFAULT_PORT
from modelserving.demo.training import demo_dataset
from modelserving.local import mlserver
from modelserving.local.mlserver import LocalMLServer, MLServerError
from modelserving.local.processes import free_port
from protos import ModelType
from udfs.models import load_request
from udfs.runtimes.endpoints import ModelServers, normalize_server_url


def test_prepare_writes_the_demo_model_and_settings_serving_on_loopback_only(tmp_path, trained_models):
    server = LocalMLServer(tmp_path, port=9123)
    server.prepare()
    settings = json.loads((tmp_path / "settings.json").read_text())
    assert (settings["host"], settings["http_port"], settings["grpc_port"]) == ("127.0.0.1", 9123, 9124)
    model_dir = tmp_path / "models" / server.model_name
    model_settings = json.loads((model_dir / "model-settings.json").read_text())
    assert model_settings["implementation"] == "mlserver_sklearn.SKLearnModel"
    assert model_settings["parameters"]["uri"] == "./model.joblib"
    # the same pipeline as the embedded ONNX demo model (this test's own file, loaded here)
    served = joblib.load(model_dir / "model.joblib")
    X = demo_dataset().X
    onnx_pipeline = trained_models[ModelType.ONNX].estimator
    assert np.array_equal(served.predict_proba(X), onnx_pipeline.predict_proba(X))


def test_the_descriptor_names_this_server_and_passes_the_policy(tmp_path):
    server = LocalMLServer(tmp_path, port=9123)
    descriptor = server.descriptor(timeout_ms=300)
    assert descriptor.modeltype == ModelType.EXTERNAL and descriptor.server.url == server.url
    request = load_request(descriptor, [], 10**6,
                           servers=ModelServers(allowed=(normalize_server_url(server.url),)))
    endpoint = request.extra["endpoint"]
    assert (endpoint.model, endpoint.timeout_s, endpoint.outputs) == \
        (server.model_name, 0.3, ("predict", "predict_proba"))


def test_start_without_the_venv_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv(mlserver.VENV_VARIABLE, str(tmp_path / "nowhere"))
    with pytest.raises(MLServerError, match=r"not installed .*\./dev setup"):
        LocalMLServer(tmp_path, port=free_port()).start()


def test_status_of_a_server_that_is_not_running_is_one_line_and_exit_1(tmp_path, capsys):
    code = cli.main(["mlserver", "status", "--workdir", str(tmp_path), "--port", str(free_port())])
    assert code == 1 and "not serving" in capsys.readouterr().out
    assert cli.main(["mlserver", "stop", "--workdir", str(tmp_path)]) == 0
    assert CLI_DEFAULT_PORT == mlserver.DEFAULT_PORT
