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
#: Longest wait between reconnect attempts of the project's kafka-python clients.
RECONNECT_BACKOFF_MAX_MS = 1000

#: ``name="value"`` (quotes escaped with backslashes) or ``name=value`` in a JAAS line.
_JAAS_OPTION = re.compile(r'([\w.-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s";]+))')
SCRAM_LOGIN_MODULE = "org.apache.kafka.common.security.scram.ScramLoginModule"
PLAIN_LOGIN_MODULE = "org.apache.kafka.common.security.plain.PlainLoginModule"
#: Where the Flink SQL Kafka connector (the jar the tooling fetches) relocates the Kafka
#: client: a JAAS line for it must name the login module by its relocated class.
FLINK_SQL_CONNECTOR_PACKAGE = "org.apache.flink.kafka.shaded."


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

    @property
    def check_hostname(self) -> bool:
        """Java's way to turn hostname verification off is an empty identification algorithm."""
        return self.java_extra.get("ssl.endpoint.identification.algorithm", "https") != ""


def read_properties(path: str | Path) -> dict[str, str]:
    """A Java properties file as a dict, as ``java.util.Properties`` reads it: ``#``/``!``
    comments, ``=``, ``:`` or blanks between key and value, a trailing backslash continuing
    the line (how ``sasl.jaas.config`` is usually written), backslash escapes."""
    try:
        text = Path(path).read_text(encoding="latin-1")
    except OSError as exc:
        raise KafkaConfigError(f"kafka_properties_file {str(path)!r} cannot be read: "
                               f"{exc.strerror or exc}") from None
    props: dict[str, str] = {}
    for line in _logical_lines(text):
        match = _PROPERTY.match(line)
        props[_unescape(match.group(1))] = _unescape(match.group(2))
    return props


_PROPERTY = re.compile(r"((?:[^\\\s=:]|\\.)*)\s*[=:]?\s*(.*)", re.S)


def _logical_lines(text: str):
    """Lines joined at an odd number of trailing backslashes, comments and blanks dropped."""
    pending = None
    for raw in text.splitlines():
        line = raw.lstrip()
        if pending is None and (not line or line[0] in "#!"):
            continue
        line = line if pending is None else pending + line
        trailing = len(line) - len(line.rstrip("\\"))
        if trailing % 2:
            pending = line[:-1]
            continue
        pending = None
        yield line
    if pending:
        yield pending


def _unescape(text: str) -> str:
    return re.sub(r"\\(u[0-9a-fA-F]{4}|.)",
                  lambda m: (chr(int(m.group(1)[1:], 16)) if len(m.group(1)) == 5 else
                             {"t": "\t", "n": "\n", "r": "\r", "f": "\f"}.get(m.group(1), m.group(1))),
                  text)


def jaas_options(jaas: str) -> dict[str, str]:
    """The options of a ``sasl.jaas.config`` value (``username``, ``password``...)."""
    return {name: (re.sub(r"\\(.)", r"\1", quoted) if quoted or not bare else bare)
            for name, quoted, bare in _JAAS_OPTION.findall(jaas)}


SECURITY_PROTOCOLS = ("PLAINTEXT", "SASL_PLAINTEXT", "SSL", "SASL_SSL")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
#: Keys rebuilt from ``KafkaAccess``; every other key of the file reaches Java unchanged
#: (a JKS truststore, say, which only the Java connector can read).
_REBUILT_KEYS = {"bootstrap.servers", "security.protocol", "sasl.mechanism", "sasl.jaas.config"}


def access(settings) -> KafkaAccess:
    """``KafkaAccess`` from the settings and their properties file; a combination that
    cannot work is a ``KafkaConfigError`` (a ``SettingsError``) naming the settings."""
    props = read_properties(settings.kafka_properties_file) if settings.kafka_properties_file else {}
    jaas = jaas_options(props.get("sasl.jaas.config", ""))
    truststore = props.get("ssl.truststore.location", "")
    if truststore and props.get("ssl.truststore.type", "").upper() != "PEM":
        truststore = ""   # a JKS/PKCS12 store serves the Java connector only
    protocol = (settings.security_protocol or props.get("security.protocol") or "PLAINTEXT").upper()
    result = KafkaAccess(
        bootstrap_servers=settings.bootstrap_servers,
        security_protocol=protocol,
        sasl_mechanism=(settings.sasl_mechanism or props.get("sasl.mechanism") or "").upper(),
        sasl_username=settings.sasl_username or jaas.get("username", ""),
        sasl_password=settings.sasl_password or jaas.get("password", ""),
        ssl_cafile=settings.ssl_cafile or truststore,
        java_extra={k: v for k, v in props.items() if k not in _REBUILT_KEYS})
    _check(result)
    return result


def _check(a: KafkaAccess) -> None:
    if a.security_protocol not in SECURITY_PROTOCOLS:
        raise KafkaConfigError(f"security_protocol must be one of {', '.join(SECURITY_PROTOCOLS)}, "
                               f"not {a.security_protocol!r}")
    if a.uses_sasl:
        if not a.sasl_mechanism:
            raise KafkaConfigError(f"security_protocol {a.security_protocol} needs a sasl_mechanism "
                                   f"({', '.join(SASL_MECHANISMS)})")
        if a.sasl_mechanism not in SASL_MECHANISMS:
            raise KafkaConfigError(f"sasl_mechanism {a.sasl_mechanism} is not supported; use one of "
                                   f"{', '.join(SASL_MECHANISMS)}")
        if not (a.sasl_username and a.sasl_password):
            missing = " and ".join(n for n, v in (("sasl_username", a.sasl_username),
                                                  ("sasl_password", a.sasl_password)) if not v)
            raise KafkaConfigError(f"security_protocol {a.security_protocol} needs sasl_username and "
                                   f"sasl_password; {missing} not given (MODELSERVING_SASL_USERNAME, "
                                   "MODELSERVING_SASL_PASSWORD, or sasl.jaas.config in "
                                   "kafka_properties_file)")
    elif a.sasl_mechanism or a.sasl_username or a.sasl_password:
        # credentials without a SASL protocol would be silently ignored: the client then
        # talks plaintext to a SASL listener and waits for answers that never come
        raise KafkaConfigError(f"SASL settings given but security_protocol is {a.security_protocol}; "
                               "set security_protocol to SASL_PLAINTEXT or SASL_SSL")
    if a.ssl_cafile and not a.uses_ssl:
        raise KafkaConfigError(f"ssl_cafile given but security_protocol is {a.security_protocol}; "
                               "set security_protocol to SSL or SASL_SSL")


def java_properties(settings, class_prefix: str = "") -> dict[str, str]:
    """Properties for the Flink Kafka connector (and any Java client); bootstrap excluded.
    ``class_prefix`` is the package the client's classes are relocated to, if any
    (``FLINK_SQL_CONNECTOR_PACKAGE`` for the SQL connector jar)."""
    a = access(settings)
    props = dict(a.java_extra)
    props["security.protocol"] = a.security_protocol
    if a.uses_sasl:
        module = class_prefix + (PLAIN_LOGIN_MODULE if a.sasl_mechanism == "PLAIN" else SCRAM_LOGIN_MODULE)
        props["sasl.mechanism"] = a.sasl_mechanism
        props["sasl.jaas.config"] = (f'{module} required username="{_escape(a.sasl_username)}" '
                                     f'password="{_escape(a.sasl_password)}";')
    if a.ssl_cafile:
        props.pop("ssl.truststore.password", None)   # Kafka refuses a password for PEM
        props["ssl.truststore.type"] = "PEM"
        props["ssl.truststore.location"] = a.ssl_cafile
    return props


def kafka_python(settings, **overrides) -> dict:
    """Keyword arguments for kafka-python's ``KafkaProducer``/``KafkaConsumer``/``KafkaAdminClient``."""
    a = access(settings)
    # reconnect within a second of a broker's return, as Kafka's Java clients do (kafka-python
    # backs off up to 30 s by default, which kept a recovered broker unused that long)
    config: dict = {"bootstrap_servers": a.bootstrap_servers, "security_protocol": a.security_protocol,
                    "reconnect_backoff_max_ms": RECONNECT_BACKOFF_MAX_MS}
    if a.uses_sasl:
        config.update(sasl_mechanism=a.sasl_mechanism, sasl_plain_username=a.sasl_username,
                      sasl_plain_password=a.sasl_password)
    if a.ssl_cafile:
        config["ssl_cafile"] = a.ssl_cafile
    if a.uses_ssl and not a.check_hostname:
        config["ssl_check_hostname"] = False
    config.update(overrides)
    return config


def confluent(settings, **overrides) -> dict:
    """Configuration dict for confluent-kafka (librdkafka) ``Producer``/``Consumer``."""
    a = access(settings)
    config: dict = {"bootstrap.servers": a.bootstrap_servers,
                    "security.protocol": a.security_protocol.lower(),
                    "reconnect.backoff.max.ms": RECONNECT_BACKOFF_MAX_MS}
    if a.uses_sasl:
        config.update({"sasl.mechanism": a.sasl_mechanism, "sasl.username": a.sasl_username,
                       "sasl.password": a.sasl_password})
    if a.ssl_cafile:
        config["ssl.ca.location"] = a.ssl_cafile
    if a.uses_ssl and not a.check_hostname:
        config["ssl.endpoint.identification.algorithm"] = "none"
    config.update(overrides)
    return config


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')
