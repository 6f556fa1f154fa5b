"""The one translation of ``Settings`` into Kafka client configuration.

Three client libraries talk to Kafka here: the Flink connector (Java property names),
kafka-python (the CLI, the topic admin, the state service, the statistics producer inside
the job) and librdkafka through confluent-kafka (the benchmark's load generator). Every one
gets its configuration from these functions, so a secured cluster works for all of them or
for none.

Security comes from the settings ``security_protocol``, ``sasl_mechanism``,
``sasl_username``, ``sasl_password`` and ``ssl_cafile``, or from the Java properties file
``kafka_properties_file`` (``security.protocol``, ``sasl.mechanism``, ``sasl.jaas.config``
with ``username``/``password``, ``ssl.truststore.location`` of type PEM). Settings win
over the file. Other keys of the file reach the Flink connector unchanged.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from jobs.settings import SettingsError

#: Largest message any project client sends or fetches; topics are created with the same.
MAX_MESSAGE_BYTES = 20 * 1024 * 1024

_JAAS_OPTION = re.compile(r'(\w+)\s*=\s*"((?:[^"\\]|\\.)*)"')
SCRAM_LOGIN_MODULE = "org.apache.kafka.common.security.scram.ScramLoginModule"
PLAIN_LOGIN_MODULE = "org.apache.kafka.common.security.plain.PlainLoginModule"


class KafkaConfigError(SettingsError):
    """The Kafka security settings cannot work as given."""


@dataclass(frozen=True)
class KafkaAccess:
    """How to reach the cluster, whatever the client library."""

    bootstrap_servers: str
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str = ""
    sasl_username: str = ""
    sasl_password: str = field(default="", repr=False)
    ssl_cafile: str = ""
    java_extra: dict = field(default_factory=dict, repr=False)

    @property
    def uses_sasl(self) -> bool:
        return self.security_protocol.startswith("SASL_")

    @property
    def uses_ssl(self) -> bool:
        return self.security_protocol in ("SSL", "SASL_SSL")


def read_properties(path: str | Path) -> dict[str, str]:
    """A Java properties file as a dict (``key=value`` lines; ``#``/``!`` comments)."""
    props = {}
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "!")) and "=" in line:
            key, value = line.split("=", 1)
            props[key.strip()] = value.strip()
    return props


def access(settings) -> KafkaAccess:
    """``KafkaAccess`` from the settings and their properties file."""
    props = read_properties(settings.kafka_properties_file) if settings.kafka_properties_file else {}
    jaas = dict(_JAAS_OPTION.findall(props.get("sasl.jaas.config", "")))
    truststore = props.get("ssl.truststore.location", "")
    if truststore and props.get("ssl.truststore.type", "").upper() != "PEM":
        truststore = ""   # a JKS/PKCS12 store serves the Java connector only
    known = {"bootstrap.servers", "security.protocol", "sasl.mechanism", "sasl.jaas.config",
             "ssl.truststore.location", "ssl.truststore.type"}
    result = KafkaAccess(
        bootstrap_servers=settings.bootstrap_servers,
        security_protocol=(settings.security_protocol or props.get("security.protocol")
                           or "PLAINTEXT").upper(),
        sasl_mechanism=(settings.sasl_mechanism or props.get("sasl.mechanism") or "").upper(),
        sasl_username=settings.sasl_username or jaas.get("username", ""),
        sasl_password=settings.sasl_password or jaas.get("password", ""),
        ssl_cafile=settings.ssl_cafile or truststore,
        java_extra={k: v for k, v in props.items() if k not in known})
    if result.uses_sasl:
        if not result.sasl_mechanism:
            raise KafkaConfigError(f"security_protocol {result.security_protocol} needs a sasl_mechanism "
                                   "(PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512)")
        if not (result.sasl_username and result.sasl_password):
            raise KafkaConfigError(f"security_protocol {result.security_protocol} needs sasl_username "
                                   "and sasl_password (MODELSERVING_SASL_PASSWORD, or "
                                   "sasl.jaas.config in kafka_properties_file)")
    return result


def java_properties(settings) -> dict[str, str]:
    """Properties for the Flink Kafka connector (and any Java client); bootstrap excluded."""
    a = access(settings)
    props = dict(a.java_extra)
    props["security.protocol"] = a.security_protocol
    if a.uses_sasl:
        module = PLAIN_LOGIN_MODULE if a.sasl_mechanism == "PLAIN" else SCRAM_LOGIN_MODULE
        props["sasl.mechanism"] = a.sasl_mechanism
        props["sasl.jaas.config"] = (f'{module} required username="{_escape(a.sasl_username)}" '
                                     f'password="{_escape(a.sasl_password)}";')
    if a.ssl_cafile:
        props["ssl.truststore.type"] = "PEM"
        props["ssl.truststore.location"] = a.ssl_cafile
    return props


def kafka_python(settings, **overrides) -> dict:
    """Keyword arguments for kafka-python's ``KafkaProducer``/``KafkaConsumer``/``KafkaAdminClient``."""
    a = access(settings)
    config: dict = {"bootstrap_servers": a.bootstrap_servers, "security_protocol": a.security_protocol}
    if a.uses_sasl:
        config.update(sasl_mechanism=a.sasl_mechanism, sasl_plain_username=a.sasl_username,
                      sasl_plain_password=a.sasl_password)
    if a.ssl_cafile:
        config["ssl_cafile"] = a.ssl_cafile
    config.update(overrides)
    return config


def confluent(settings, **overrides) -> dict:
    """Configuration dict for confluent-kafka (librdkafka) ``Producer``/``Consumer``."""
    a = access(settings)
    config: dict = {"bootstrap.servers": a.bootstrap_servers,
                    "security.protocol": a.security_protocol.lower()}
    if a.uses_sasl:
        config.update({"sasl.mechanism": a.sasl_mechanism, "sasl.username": a.sasl_username,
                       "sasl.password": a.sasl_password})
    if a.ssl_cafile:
        config["ssl.ca.location"] = a.ssl_cafile
    config.update(overrides)
    return config


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')
