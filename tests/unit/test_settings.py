from __future__ import annotations

import pytest

from jobs.settings import Settings


def test_defaults_are_the_tutorial_topics():
    settings = Settings.from_sources([], environ={})
    assert (settings.data_topic, settings.models_topic) == ("mdata", "models")


def test_arguments_override_environment_which_overrides_defaults():
    env = {"MODELSERVING_DATA_TOPIC": "from-env", "MODELSERVING_PARALLELISM": "3",
           "MODELSERVING_MODEL_DIRS": "/a, /b"}
    settings = Settings.from_sources(["--data-topic", "from-args"], environ=env)
    assert settings.data_topic == "from-args"
    assert settings.parallelism == 3
    assert settings.model_dirs == ("/a", "/b")


def test_per_job_defaults():
    settings = Settings.from_sources([], environ={}).for_job("keyed")
    assert settings.group_id == "modelserving-keyed"
    assert settings.transactional_id_prefix == "modelserving-keyed"


@pytest.mark.parametrize("argv, message", [
    (["--delivery-guarantee", "maybe"], "invalid choice"),
    (["--results-topic", "mdata"], "must differ"),
])
def test_invalid_settings_are_refused(argv, message, capsys):
    with pytest.raises((SystemExit, ValueError)) as caught:
        Settings.from_sources(argv, environ={})
    assert message in str(caught.value) + capsys.readouterr().err


def test_secrets_are_masked_and_read_from_a_file(tmp_path):
    props = tmp_path / "client.properties"
    props.write_text("# comment\nsecurity.protocol=SASL_SSL\nsasl.jaas.config=secret\n")
    settings = Settings.from_sources(["--kafka-properties-file", str(props)], environ={})
    assert settings.kafka_properties()["sasl.jaas.config"] == "secret"
    assert settings.describe()["kafka_properties_file"] == "***"
    assert "secret" not in repr(settings.describe())


def test_environment_round_trip():
    settings = Settings.from_sources(["--model-dirs", "/m1,/m2", "--parallelism", "2"], environ={})
    assert Settings.from_sources([], environ=settings.to_environ()) == settings
