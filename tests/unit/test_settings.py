"""Settings: precedence, typed conversion, one-line errors naming the setting, secrets."""
from __future__ import annotations

import dataclasses

import pytest

from jobs.settings import Settings, SettingsError, _convert


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


def test_every_field_has_a_type_settings_can_convert():
    for f in dataclasses.fields(Settings):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        text = ",".join(default) if isinstance(default, tuple) else str(default)
        assert _convert(f, text) == default, f.name


# -- conversion of each kind, from a variable and from an option ----------------------------

@dataclasses.dataclass
class Kinds:
    """Fields of every kind settings convert (Settings itself has no bool or float yet)."""
    flag: bool = False
    ratio: float = 0.0
    count: int = 0
    names: tuple[str, ...] = ()
    text: str = ""


KIND = {f.name: f for f in dataclasses.fields(Kinds)}


@pytest.mark.parametrize("raw, expected", [
    ("true", True), ("YES", True), (" on ", True), ("1", True),
    ("false", False), ("No", False), ("off", False), ("0", False),
])
def test_bool_conversion(raw, expected):
    assert _convert(KIND["flag"], raw, "MODELSERVING_FLAG") is expected


def test_float_int_tuple_and_text_conversion():
    assert _convert(KIND["ratio"], " 0.25 ") == 0.25
    assert _convert(KIND["ratio"], "3") == 3.0
    assert _convert(KIND["count"], " 42 ") == 42
    assert _convert(KIND["names"], "a, b,,c ") == ("a", "b", "c")
    assert _convert(KIND["names"], "") == ()
    assert _convert(KIND["text"], " kept as given ") == " kept as given "


@pytest.mark.parametrize("field_name, raw, expected", [
    ("flag", "maybe", "flag must be yes or no, not 'maybe' (from --flag)"),
    ("ratio", "fast", "ratio must be a number, not 'fast' (from --flag)"),
    ("count", "1.5", "count must be an integer, not '1.5' (from --flag)"),
])
def test_conversion_errors_name_the_setting_and_its_source(field_name, raw, expected):
    with pytest.raises(SettingsError) as caught:
        _convert(KIND[field_name], raw, "--flag")
    assert str(caught.value) == expected


def test_a_bad_variable_is_a_settings_error_naming_it():
    with pytest.raises(SettingsError) as caught:
        Settings.from_sources([], environ={"MODELSERVING_PARALLELISM": "two"})
    assert str(caught.value) == "parallelism must be an integer, not 'two' (from MODELSERVING_PARALLELISM)"


def test_a_bad_argument_is_a_settings_error_naming_it():
    with pytest.raises(SettingsError) as caught:
        Settings.from_sources(["--stats-interval-ms", "soon"], environ={})
    assert str(caught.value) == "stats_interval_ms must be an integer, not 'soon' (from --stats-interval-ms)"


@pytest.mark.parametrize("argv, environ, message", [
    (["--delivery-guarantee", "maybe"], {}, "--delivery-guarantee: invalid choice: 'maybe'"),
    ([], {"MODELSERVING_DELIVERY_GUARANTEE": "maybe"},
     "delivery_guarantee must be one of at-least-once, exactly-once, none, not 'maybe'"),
    (["--results-topic", "mdata"], {}, "must differ"),
    (["--no-such-setting", "x"], {}, "unrecognized arguments: --no-such-setting"),
    ([], {"MODELSERVING_PARALLELISM": "-1"}, "parallelism must not be negative"),
    (["--rest-port", "70000"], {}, "rest_port must be a TCP port"),
    (["--security-protocol", "TLS"], {}, "--security-protocol: invalid choice: 'TLS'"),
])
def test_invalid_settings_are_one_line_settings_errors(argv, environ, message):
    with pytest.raises(SettingsError) as caught:
        Settings.from_sources(argv, environ=environ)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_values_given_in_code_are_type_checked():
    with pytest.raises(SettingsError, match=r"parallelism must be an integer, not '2' \(str\)"):
        Settings.from_sources([], environ={}, parallelism="2")
    with pytest.raises(SettingsError, match="model_dirs must be a comma-separated list"):
        Settings.from_sources([], environ={}, model_dirs="/models")


# -- secrets ---------------------------------------------------------------------------------

def test_secrets_are_masked_in_describe_and_left_out_of_repr():
    settings = Settings.from_sources([], environ={"MODELSERVING_SASL_USERNAME": "alice",
                                                  "MODELSERVING_SASL_PASSWORD": "s3cret-pw"})
    assert settings.sasl_password == "s3cret-pw"
    described = settings.describe()
    assert described["sasl_password"] == "***"
    assert described["sasl_username"] == "alice"
    assert "s3cret-pw" not in repr(described)
    assert "s3cret-pw" not in repr(settings)
    # an unset secret shows as empty, so "not given" stays visible in logs
    assert Settings.from_sources([], environ={}).describe()["sasl_password"] == ""


def test_secrets_are_refused_on_the_command_line():
    with pytest.raises(SettingsError) as caught:
        Settings.from_sources(["--sasl-password", "s3cret-pw"], environ={})
    message = str(caught.value)
    assert "sasl_password is a secret" in message and "MODELSERVING_SASL_PASSWORD" in message
    assert "s3cret-pw" not in message


def test_the_properties_file_is_a_path_given_anywhere(tmp_path):
    props = tmp_path / "client.properties"
    settings = Settings.from_sources(["--kafka-properties-file", str(props)], environ={})
    assert settings.describe()["kafka_properties_file"] == str(props)


def test_environment_round_trip():
    settings = Settings.from_sources(["--model-dirs", "/m1,/m2", "--parallelism", "2"],
                                     environ={"MODELSERVING_SASL_PASSWORD": "pw"})
    assert Settings.from_sources([], environ=settings.to_environ()) == settings


def test_output_bounds_have_defaults_and_must_be_sane():
    from jobs.settings import Settings, SettingsError

    settings = Settings()
    assert settings.dead_letter_max_raw_bytes == 64 * 1024
    assert settings.max_result_bytes == 1024 * 1024
    assert settings.max_record_bytes == 1024 * 1024
    with pytest.raises(SettingsError, match="max_record_bytes must be positive"):
        Settings.from_sources(["--max-record-bytes", "0"], environ={})
    assert Settings.from_sources(["--dead-letter-max-raw-bytes", "100"], environ={}
                                 ).dead_letter_max_raw_bytes == 100
    for bad in (0, -1, 11 * 1024 * 1024):
        with pytest.raises(SettingsError, match="dead_letter_max_raw_bytes"):
            Settings(dead_letter_max_raw_bytes=bad).validate()

