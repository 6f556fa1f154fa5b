"""The one translation of settings into each Kafka client library's configuration."""
from __future__ import annotations

import pytest

from jobs.kafka_config import (
    MAX_MESSAGE_BYTES,
    KafkaConfigError,
    access,
    confluent,
    jaas_options,
    java_properties,
    kafka_python,
    read_properties,
)
from jobs.settings import Settings, SettingsError

SCRAM = "org.apache.kafka.common.security.scram.ScramLoginModule"


def settings(**values) -> Settings:
    return Settings.from_sources([], environ={}, bootstrap_servers="broker:9093", **values)


def scram_settings(**values) -> Settings:
    return settings(security_protocol="SASL_PLAINTEXT", sasl_mechanism="SCRAM-SHA-256",
                    sasl_username="alice", sasl_password="alice-secret", **values)


def write(tmp_path, text: str):
    path = tmp_path / "client.properties"
    path.write_text(text)
    return str(path)


# -- PLAINTEXT -------------------------------------------------------------------------------

def test_plaintext_for_each_library():
    s = settings()
    assert kafka_python(s) == {"bootstrap_servers": "broker:9093", "security_protocol": "PLAINTEXT",
                               "reconnect_backoff_max_ms": 1000}
    assert confluent(s) == {"bootstrap.servers": "broker:9093", "security.protocol": "plaintext",
                            "reconnect.backoff.max.ms": 1000}
    assert java_properties(s) == {"security.protocol": "PLAINTEXT"}


def test_overrides_are_the_callers_own_options():
    s = settings()
    assert kafka_python(s, acks=1, linger_ms=100)["linger_ms"] == 100
    assert confluent(s, **{"group.id": "g"})["group.id"] == "g"


# -- SASL_PLAINTEXT + SCRAM-SHA-256 ------------------------------------------------------------

def test_scram_for_each_library():
    s = scram_settings()
    assert kafka_python(s) == {
        "bootstrap_servers": "broker:9093", "security_protocol": "SASL_PLAINTEXT",
        "reconnect_backoff_max_ms": 1000, "sasl_mechanism": "SCRAM-SHA-256", "sasl_plain_username": "alice",
        "sasl_plain_password": "alice-secret"}
    assert confluent(s) == {
        "bootstrap.servers": "broker:9093", "security.protocol": "sasl_plaintext",
        "reconnect.backoff.max.ms": 1000, "sasl.mechanism": "SCRAM-SHA-256", "sasl.username": "alice", "sasl.password": "alice-secret"}
    assert java_properties(s) == {
        "security.protocol": "SASL_PLAINTEXT", "sasl.mechanism": "SCRAM-SHA-256",
        "sasl.jaas.config": f'{SCRAM} required username="alice" password="alice-secret";'}


def test_plain_mechanism_uses_the_plain_login_module():
    s = scram_settings().replace(sasl_mechanism="PLAIN")
    assert java_properties(s)["sasl.jaas.config"].startswith(
        "org.apache.kafka.common.security.plain.PlainLoginModule required")


def test_quotes_in_a_password_are_escaped_for_jaas():
    s = scram_settings().replace(sasl_password='pa"ss\\word')
    jaas = java_properties(s)["sasl.jaas.config"]
    assert jaas.endswith('password="pa\\"ss\\\\word";')
    assert jaas_options(jaas)["password"] == 'pa"ss\\word'


def test_access_does_not_show_the_password():
    assert "alice-secret" not in repr(access(scram_settings()))


# -- the properties file ------------------------------------------------------------------------

JAAS_FILE = f"""\
# a client.properties as Kafka's own tools take it
security.protocol = SASL_PLAINTEXT
sasl.mechanism: SCRAM-SHA-256
sasl.jaas.config={SCRAM} required \\
    username="bob" \\
    password="bob-secret";
request.timeout.ms=20000
"""


def test_jaas_credentials_from_the_properties_file(tmp_path):
    s = settings(kafka_properties_file=write(tmp_path, JAAS_FILE))
    a = access(s)
    assert (a.security_protocol, a.sasl_mechanism, a.sasl_username, a.sasl_password) == \
        ("SASL_PLAINTEXT", "SCRAM-SHA-256", "bob", "bob-secret")
    assert kafka_python(s)["sasl_plain_password"] == "bob-secret"
    assert confluent(s)["sasl.username"] == "bob"
    java = java_properties(s)
    assert java["sasl.jaas.config"] == f'{SCRAM} required username="bob" password="bob-secret";'
    assert java["request.timeout.ms"] == "20000"       # other keys reach the connector
    assert "request.timeout.ms" not in kafka_python(s)  # ...and only the connector


def test_settings_win_over_the_properties_file(tmp_path):
    s = settings(kafka_properties_file=write(tmp_path, JAAS_FILE), sasl_username="alice",
                 sasl_password="alice-secret", sasl_mechanism="SCRAM-SHA-512")
    assert kafka_python(s)["sasl_plain_username"] == "alice"
    assert kafka_python(s)["sasl_mechanism"] == "SCRAM-SHA-512"
    assert 'username="alice" password="alice-secret"' in java_properties(s)["sasl.jaas.config"]
    plaintext = settings(kafka_properties_file=write(tmp_path, "security.protocol=PLAINTEXT\n"),
                         security_protocol="SASL_PLAINTEXT", sasl_mechanism="PLAIN",
                         sasl_username="u", sasl_password="p")
    assert java_properties(plaintext)["security.protocol"] == "SASL_PLAINTEXT"


def test_properties_file_syntax(tmp_path):
    props = read_properties(write(tmp_path, (
        "! a comment\n"
        "  # another\n"
        "plain=value\n"
        "colon:value\n"
        "spaced   value with spaces\n"
        "escaped\\=key=a\\tb\\u0041\n"
        "continued=one \\\n"
        "    two\n"
        "backslash=ends\\\\\n"
        "empty=\n")))
    assert props == {"plain": "value", "colon": "value", "spaced": "value with spaces",
                     "escaped=key": "a\tbA", "continued": "one two", "backslash": "ends\\",
                     "empty": ""}


def test_unquoted_jaas_values():
    assert jaas_options(f"{SCRAM} required username=carol password=\"c p\";") == \
        {"username": "carol", "password": "c p"}


def test_a_pem_truststore_in_the_file_is_the_python_clients_ca(tmp_path):
    s = settings(kafka_properties_file=write(tmp_path, (
        "security.protocol=SSL\nssl.truststore.type=PEM\nssl.truststore.location=/ca.pem\n")))
    assert kafka_python(s)["ssl_cafile"] == "/ca.pem"
    assert confluent(s)["ssl.ca.location"] == "/ca.pem"


def test_a_jks_truststore_reaches_only_the_java_connector(tmp_path):
    s = settings(kafka_properties_file=write(tmp_path, (
        "security.protocol=SSL\nssl.truststore.location=/trust.jks\nssl.truststore.password=pw\n")))
    assert "ssl_cafile" not in kafka_python(s)
    assert java_properties(s)["ssl.truststore.location"] == "/trust.jks"
    assert java_properties(s)["ssl.truststore.password"] == "pw"
    # a CA given in the settings replaces it, as PEM, without the store's password
    pem = java_properties(s.replace(ssl_cafile="/ca.pem"))
    assert (pem["ssl.truststore.type"], pem["ssl.truststore.location"]) == ("PEM", "/ca.pem")
    assert "ssl.truststore.password" not in pem


def test_hostname_verification_off_for_every_library(tmp_path):
    s = settings(kafka_properties_file=write(tmp_path, (
        "security.protocol=SSL\nssl.endpoint.identification.algorithm=\n")))
    assert kafka_python(s)["ssl_check_hostname"] is False
    assert confluent(s)["ssl.endpoint.identification.algorithm"] == "none"


# -- settings that cannot work ----------------------------------------------------------------

@pytest.mark.parametrize("missing, values", [
    ("sasl_username and sasl_password", {}),
    ("sasl_password", {"sasl_username": "alice"}),
    ("sasl_username", {"sasl_password": "pw"}),
])
def test_sasl_without_user_or_password_is_a_clear_settings_error(missing, values):
    s = settings(security_protocol="SASL_PLAINTEXT", sasl_mechanism="SCRAM-SHA-256", **values)
    with pytest.raises(SettingsError) as caught:
        kafka_python(s)
    message = str(caught.value)
    assert message.startswith("security_protocol SASL_PLAINTEXT needs sasl_username and sasl_password")
    assert f"; {missing} not given" in message
    assert "\n" not in message


@pytest.mark.parametrize("values, message", [
    ({"security_protocol": "SASL_PLAINTEXT", "sasl_username": "a", "sasl_password": "p"},
     "security_protocol SASL_PLAINTEXT needs a sasl_mechanism"),
    ({"sasl_mechanism": "SCRAM-SHA-256", "sasl_username": "a", "sasl_password": "p"},
     "SASL settings given but security_protocol is PLAINTEXT"),
    ({"ssl_cafile": "/ca.pem"}, "ssl_cafile given but security_protocol is PLAINTEXT"),
])
def test_combinations_that_cannot_work(values, message):
    with pytest.raises(KafkaConfigError, match=message):
        confluent(settings(**values))


def test_unsupported_mechanism_from_the_file(tmp_path):
    s = settings(kafka_properties_file=write(tmp_path, (
        "security.protocol=SASL_SSL\nsasl.mechanism=GSSAPI\n")))
    with pytest.raises(KafkaConfigError, match="sasl_mechanism GSSAPI is not supported"):
        java_properties(s)


def test_a_missing_properties_file_is_a_settings_error(tmp_path):
    with pytest.raises(SettingsError, match="kafka_properties_file .*nope.properties.* cannot be read"):
        kafka_python(settings(kafka_properties_file=str(tmp_path / "nope.properties")))


def test_one_message_size_limit():
    from modelserving.kafka import admin

    assert admin.MAX_MESSAGE_BYTES is MAX_MESSAGE_BYTES


# -- how kafka-python failures read (modelserving.kafka.failures) -----------------------------

def test_failures_are_one_line_tool_errors_naming_user_and_address():
    import kafka.errors as errors

    from modelserving.errors import KafkaToolError
    from modelserving.kafka.failures import translated

    config = kafka_python(scram_settings(), bootstrap_timeout_ms=20000)
    refused = errors.SaslAuthenticationFailedError(
        "SaslAuthenticationFailedError: Authentication failed during authentication due to "
        "invalid credentials with SASL mechanism SCRAM-SHA-256")
    with pytest.raises(KafkaToolError) as caught:
        with translated("creating topics", config):
            raise refused
    assert str(caught.value) == (
        "creating topics: authentication failed for user 'alice' (SCRAM-SHA-256) at broker:9093: "
        "check sasl_username and sasl_password (Authentication failed during authentication "
        "due to invalid credentials with SASL mechanism SCRAM-SHA-256)")
    assert caught.value.__cause__ is refused

    with pytest.raises(KafkaToolError) as caught:
        with translated("connecting a producer", kafka_python(settings())):
            raise errors.KafkaTimeoutError("Unable to bootstrap from broker:9093")
    assert str(caught.value).startswith(
        "connecting a producer: no Kafka broker answered at broker:9093 within 30 s "
        "(security_protocol PLAINTEXT)")


def test_kafka_python_corrections_apply_to_the_pinned_version():
    import kafka

    from modelserving.kafka import failures

    assert failures.CORRECTED == kafka.__version__.startswith("3.0.")


def test_jaas_for_the_relocated_client_of_the_sql_connector():
    from jobs.kafka_config import FLINK_SQL_CONNECTOR_PACKAGE

    jaas = java_properties(scram_settings(), FLINK_SQL_CONNECTOR_PACKAGE)["sasl.jaas.config"]
    assert jaas.startswith(f"org.apache.flink.kafka.shaded.{SCRAM} required ")


def test_the_pipeline_names_the_login_module_the_connector_jar_has(tmp_path):
    pytest.importorskip("pyflink")
    from jobs.pipeline import connector_properties

    def module(jar: str) -> str:
        return connector_properties(scram_settings(connector_jar=jar))["sasl.jaas.config"].split()[0]
    assert module("/jars/flink-sql-connector-kafka-5.0.0-2.2.jar") == f"org.apache.flink.kafka.shaded.{SCRAM}"
    assert module("") == f"org.apache.flink.kafka.shaded.{SCRAM}"   # the cluster's lib/: the SQL jar
    assert module("/jars/flink-connector-kafka-5.0.0-2.2.jar") == SCRAM


def test_the_sinks_take_messages_as_large_as_the_topics_do(tmp_path):
    """A result or dead letter the topic accepts never fails a sink: the producer's
    max.request.size (default 1 MiB) is the limit the topics are created with."""
    pytest.importorskip("pyflink")
    from jobs.kafka_config import MAX_MESSAGE_BYTES
    from jobs.pipeline import sink_properties

    props = sink_properties(scram_settings())
    assert props["max.request.size"] == str(MAX_MESSAGE_BYTES)
    assert props["sasl.jaas.config"]   # the connector's properties are kept
    # records wait for a broker that is down, but never past their transaction's timeout
    from jobs.pipeline import TRANSACTION_TIMEOUT_MS
    assert 120_000 < int(props["delivery.timeout.ms"]) < int(TRANSACTION_TIMEOUT_MS)
    assert props["max.block.ms"] == props["delivery.timeout.ms"]


def test_a_checkpoint_dir_is_given_to_flink_as_a_uri(tmp_path):
    from jobs.pipeline import checkpoint_uri

    assert checkpoint_uri(str(tmp_path / "cp")) == f"file://{tmp_path}/cp"
    assert checkpoint_uri("s3://bucket/checkpoints") == "s3://bucket/checkpoints"
    assert checkpoint_uri("file:///var/cp") == "file:///var/cp"
