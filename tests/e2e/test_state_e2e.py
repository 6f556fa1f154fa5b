"""The live model state: a running job publishes statistics, the state service answers."""
from __future__ import annotations

import pytest

from modelserving.local.http import HttpError, get_json
from modelserving.state.service import StateService
from protos import ModelType, ServingResult

pytestmark = pytest.mark.e2e


def get(url: str):
    return get_json(url, timeout_s=5)


def scored_by(serving, data_type: str, model_name: str) -> int:
    with serving.collector.lock:
        return sum(r.status == ServingResult.SCORED and r.dataType == data_type
                   and r.modelName == model_name for r in serving.collector.results)


def wait_for_usage(serving, service, data_type: str, model) -> dict:
    """The service's view once its usage equals the results on the results topic."""
    job = serving.settings.job_name

    def agreed(_):
        try:
            entry = get(f"{service.url}/state/{data_type}")["jobs"][job]
        except (OSError, KeyError):
            return None
        expected = scored_by(serving, data_type, model.name)
        if entry["model"]["name"] == model.name and entry["stats"]["usage"] == expected > 0:
            return entry
        return None
    return serving.collector.wait_for(agreed, 90, f"usage of {model.name} in the state service")


def test_state_service_follows_models_and_usage_and_survives_its_restart(serving):
    data_type = "stats-type"
    model_a, model_b = serving.models[ModelType.ONNX], serving.models[ModelType.PMML]
    service = StateService(serving.settings, port=0).start()
    try:
        service.wait_ready(60)
        serving.publish_and_score(model_a, data_type, "stats-a", 25)
        entry = wait_for_usage(serving, service, data_type, model_a)
        assert entry["model"]["type"] == "ONNX" and entry["model"]["version"] == model_a.version
        assert entry["stats"]["min_ms"] <= entry["stats"]["mean_ms"] <= entry["stats"]["max_ms"]
        assert entry["has_model"] and not entry["jitter"]

        serving.publish_and_score(model_b, data_type, "stats-b", 25)
        entry = wait_for_usage(serving, service, data_type, model_b)
        assert entry["model"]["type"] == "PMML"
        history = get(f"{service.url}/history/{data_type}")["models"]
        assert [h["name"] for h in history][:2] == [model_b.name, model_a.name]
        assert history[1]["usage"] == scored_by(serving, data_type, model_a.name)
        before = get(f"{service.url}/state/{data_type}")
        with pytest.raises(HttpError) as missing:
            get(f"{service.url}/state/no-such-type")
        assert missing.value.status == 404
    finally:
        service.stop()

    restarted = StateService(serving.settings, port=0).start()
    try:
        restarted.wait_ready(60)
        after = get(f"{restarted.url}/state/{data_type}")
        job = serving.settings.job_name
        assert after["jobs"][job]["model"] == before["jobs"][job]["model"]
        assert after["jobs"][job]["stats"] == before["jobs"][job]["stats"]
    finally:
        restarted.stop()
