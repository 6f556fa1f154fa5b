"""One typed settings object for both jobs, the CLI and the tests.

Each field is set, from highest to lowest precedence, by a command-line option
(``--data-topic mdata``), an environment variable (``MODELSERVING_DATA_TOPIC=mdata``) or its
default. Lists (``model_dirs``) are comma-separated in both; yes/no values accept
true/false, yes/no, on/off, 1/0. Every value is converted to its field's type on the way in,
and anything that cannot be right is a ``SettingsError`` whose one-line message names the
setting and where the value came from. Secrets (SASL passwords) are read only from the
environment or a properties file (a command line is visible to every user of the machine),
and are never logged: ``describe()`` masks them and ``repr()`` leaves them out.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Mapping, Sequence

ENV_PREFIX = "MODELSERVING_"
DELIVERY_GUARANTEES = ("at-least-once", "exactly-once", "none")
STARTING_OFFSETS = ("earliest", "latest", "committed")
PYTHON_EXECUTION_MODES = ("process", "thread")


class SettingsError(ValueError):
    """A setting that cannot be right; the message names it."""


class _SettingsParser(argparse.ArgumentParser):
    """Bad options are a ``SettingsError`` like bad variables, not an exit of argparse's own."""

    def error(self, message):
        raise SettingsError(message)


def _setting(default, help_text: str, *, secret: bool = False, choices=None):
    kwargs = {"default_factory": default} if callable(default) else {"default": default}
    # secrets stay out of repr(): settings end up in assertion messages and tracebacks
    return field(metadata={"help": help_text, "secret": secret, "choices": choices},
                 repr=not secret, **kwargs)


@dataclass(frozen=True)
class Settings:
    bootstrap_servers: str = _setting("127.0.0.1:9092", "Kafka bootstrap servers")
    data_topic: str = _setting("mdata", "topic of data records (tutorial default: mdata)")
    models_topic: str = _setting("models", "topic of ModelDescriptor messages (tutorial default: models)")
    results_topic: str = _setting("results", "topic the ServingResult messages are written to")
    dead_letter_topic: str = _setting("dead-letters", "topic of bad records and bad models, with reasons")
    state_topic: str = _setting(
        "model-state", "compacted topic of serving statistics (ModelStats) per data type, read by "
        "`modelserving state serve`; empty disables publishing")
    repository_topic: str = _setting(
        "model-repository", "compacted topic of the model repository (RepositoryEntry per model "
        "and job): every model a job accepts or refuses, and when it stops serving, read by "
        "`modelserving models` and the state service; empty disables publishing")
    shadow_topic: str = _setting(
        "model-shadow", "topic of the ServingResult messages of candidate models in shadow mode "
        "(`publish model --shadow`); empty: they are only compared with the primary's, not written")
    stats_interval_ms: int = _setting(
        5000, "how often the statistics are published while records flow (and on every model change)")
    group_id: str = _setting("", "Kafka consumer group id; empty means modelserving-<job>")
    data_starting_offsets: str = _setting(
        "committed", "where a job without state starts reading data: earliest, latest, or committed "
        "(the group's offsets, else earliest)", choices=STARTING_OFFSETS)
    parallelism: int = _setting(0, "job parallelism; 0 keeps Flink's default")
    checkpoint_interval_ms: int = _setting(10_000, "checkpoint interval; 0 disables checkpointing")
    checkpoint_dir: str = _setting(
        "", "where checkpoints are written (a path or URI); empty: the cluster's "
        "execution.checkpointing.dir, and on a local Flink without one the JobManager's memory, "
        "which refuses state over 5 MB (the tooling's local runs give a directory)")
    delivery_guarantee: str = _setting(
        "at-least-once", "Kafka sink guarantee: at-least-once, exactly-once (transactional, results "
        "visible at checkpoint completion) or none", choices=DELIVERY_GUARANTEES)
    transactional_id_prefix: str = _setting("", "exactly-once only; empty means the job's name")
    model_dirs: tuple[str, ...] = _setting(
        tuple, "directories a model location may point into (comma-separated); a location "
        "anywhere else is refused")
    max_model_bytes: int = _setting(
        1024 * 1024 * 1024, "largest model accepted: total size at its location, or inline bytes")
    max_inline_model_bytes: int = _setting(
        16 * 1024 * 1024, "largest inline model: inline descriptors are kept in Flink state "
        "(checkpointed), so larger models must be sent by location")
    dead_letter_max_raw_bytes: int = _setting(
        64 * 1024, "a dead letter keeps at most this many bytes of its raw input (with the "
        "input's whole size and SHA-256), so any input's dead letter fits the topic")
    max_record_bytes: int = _setting(
        1024 * 1024, "largest record accepted; a bigger one is dead-lettered (\"record too "
        "large\") instead of scored")
    max_result_bytes: int = _setting(
        1024 * 1024, "largest serialized ServingResult; a bigger one (a model with a huge "
        "output) becomes a dead letter \"result too large (N bytes > limit)\" instead")
    model_servers: tuple[str, ...] = _setting(
        tuple, "model servers an EXTERNAL model may be served from: base URLs or URL prefixes "
        "(comma-separated, http or https, e.g. http://127.0.0.1:8080); a descriptor naming any "
        "other server is refused, and none configured refuses every EXTERNAL model")
    model_server_token: str = _setting(
        "", "bearer token sent to the model servers (Authorization header): give it in the "
        "environment (MODELSERVING_MODEL_SERVER_TOKEN); refused on the command line", secret=True)
    model_server_timeout_ms: int = _setting(
        1000, "longest one call to a model server may take (connecting, retries and reading "
        "included); a descriptor may ask for less, never more")
    model_server_retries: int = _setting(
        2, "new attempts after a connection error (refused, reset), 50 ms, 100 ms ... apart, "
        "within the timeout")
    model_server_max_in_flight: int = _setting(
        4, "most calls at once to one model server from one Python worker")
    model_server_batches_in_flight: int = _setting(
        4, "batches of EXTERNAL models one parallel instance may have awaiting their model "
        "server per key; their records wait in keyed state (checkpointed) and are answered "
        "as the answers come; 1 calls the server synchronously, one batch at a time")
    model_server_breaker_failures: int = _setting(
        3, "failed calls in a row after which a model's circuit opens: its records are then "
        "dead-lettered at once (MODEL_UNAVAILABLE) while the server is probed in the background")
    model_server_breaker_reset_ms: int = _setting(
        2000, "how often an open circuit probes its model server (one row) to close again")
    model_server_max_rows_per_call: int = _setting(
        256, "most records in one call to a model server; a bigger batch is sent in several")
    drift_threshold: float = _setting(
        0.2, "population stability index above which a model's input feature or output counts "
        "as drifted from the reference published with it (logged, flagged in the statistics "
        "and the metrics); 0.2 is the usual bar for a significant shift")
    speculative_max_budget_ms: int = _setting(
        10_000, "longest latency budget a speculative set may ask for; a set asking for more "
        "is refused (dead letter)")
    spread_keys: int = _setting(
        1, "broadcast job: spreading keys per parallel instance (chosen so Flink routes them "
        "evenly); record batches are spread over the instances by these keys")
    batch_max_size: int = _setting(
        64, "micro-batching: score at most this many records of one model in one call; 1 scores "
        "each record on its own (results are the same either way)")
    batch_max_wait_ms: int = _setting(
        5, "micro-batching: records that arrive within this many milliseconds on one Kafka "
        "partition enter Python as one batch (a processing-time window on Flink's JVM side; "
        "0 counts as 1)")
    python_execution_mode: str = _setting(
        "process", "where the Python functions run: process (a Python worker beside the JVM, "
        "records cross in bundles) or thread (embedded in the TaskManager JVM; a savepoint "
        "restores only in the mode that took it)", choices=PYTHON_EXECUTION_MODES)
    local_python_workers: str = _setting(
        "process", "local (embedded) Flink only: run the Python functions in worker processes "
        "of their own (process), as a cluster does, or as threads of the launching Python "
        "process (loopback, PyFlink's local default: every parallel instance then shares one "
        "interpreter lock)", choices=("process", "loopback"))
    bundle_size: int = _setting(
        1000, "process mode: most records in one bundle sent to the Python worker")
    bundle_time_ms: int = _setting(
        20, "process mode: longest a bundle stays open; bounds the latency a bundle adds")
    buffer_timeout_ms: int = _setting(
        10, "longest a record waits in a network buffer between tasks before it is sent "
        "(Flink's default is 100 ms, which a keyed job's shuffle adds to its latency)")
    object_reuse: str = _setting(
        "on", "hand records between chained operators without copying them (safe here: the "
        "jobs never change a record after emitting it)", choices=("on", "off"))
    operator_chaining: str = _setting(
        "on", "chain operators (on) or run each in its own task (off, for inspection only)",
        choices=("on", "off"))
    job_name: str = _setting("", "Flink job name; empty means modelserving-<job>")
    python_executable: str = _setting(
        lambda: sys.executable, "Python interpreter of the Flink Python workers")
    connector_jar: str = _setting("", "path of the Flink Kafka connector jar; empty means the "
                                  "one fetched by `modelserving jars fetch`")
    rest_port: int = _setting(
        0, "web UI / REST port of a local (embedded) Flink; 0 leaves it to Flink. Leave it at 0 "
        "for `flink run`: a port set here would override the cluster address given with -m")
    log_level: str = _setting(
        "INFO", "level of the job's own log lines: INFO says what a person needs (model loaded, "
        "replaced, rejected, job settings); DEBUG adds per-record detail",
        choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    var_dir: str = _setting(
        "", "tooling only: where the commands keep what they write (local broker, Flink cluster, "
        "models, demo and benchmark output); empty: var/ in the project")
    jars_dir: str = _setting(
        "", "tooling only: where `jars fetch` puts the pinned jars; empty: build/jars in the project")
    security_protocol: str = _setting(
        "", "Kafka security protocol of every client (jobs, CLI, state service, benchmark): "
        "PLAINTEXT, SASL_PLAINTEXT, SSL or SASL_SSL; empty: the properties file's, else PLAINTEXT",
        choices=("", "PLAINTEXT", "SASL_PLAINTEXT", "SSL", "SASL_SSL"))
    sasl_mechanism: str = _setting(
        "", "SASL mechanism: PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512",
        choices=("", "PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"))
    sasl_username: str = _setting("", "SASL user name")
    sasl_password: str = _setting(
        "", "SASL password: give it in the environment (MODELSERVING_SASL_PASSWORD) or the "
        "properties file; refused on the command line", secret=True)
    ssl_cafile: str = _setting("", "PEM file of the CA that signed the brokers' certificates")
    kafka_properties_file: str = _setting(
        "", "Java properties file with Kafka client settings (security.protocol, sasl.mechanism, "
        "sasl.jaas.config, ...): every client understands the security ones, the Flink connector "
        "gets every key; secrets belong here or in the environment, never on the command line")

    # -- construction ---------------------------------------------------------------------

    @classmethod
    def from_sources(cls, argv: Sequence[str] | None = None,
                     environ: Mapping[str, str] | None = None, prog: str | None = None,
                     **overrides) -> "Settings":
        """Settings from arguments, then ``MODELSERVING_*`` variables, then defaults.
        With ``prog``, ``--help`` prints every setting."""
        environ = os.environ if environ is None else environ
        values: dict = {}
        for f in fields(cls):
            variable = ENV_PREFIX + f.name.upper()
            raw = environ.get(variable)
            if raw is not None:
                values[f.name] = _convert(f, raw, variable)
        if argv is not None:
            parser = cls.argument_parser(_SettingsParser(prog=prog, add_help=bool(prog)))
            parsed = parser.parse_args(list(argv))
            for f in fields(cls):
                raw = getattr(parsed, f.name)
                if raw is None:
                    continue
                option = "--" + f.name.replace("_", "-")
                if f.metadata.get("secret"):
                    raise SettingsError(f"{f.name} is a secret and is refused on the command line "
                                        f"({option}): set {ENV_PREFIX}{f.name.upper()} or put it "
                                        "in kafka_properties_file")
                values[f.name] = _convert(f, raw, option)
        values.update(overrides)
        settings = cls(**values)
        settings.validate()
        return settings

    @classmethod
    def argument_parser(cls, parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
        parser = parser or _SettingsParser(add_help=False)
        for f in fields(cls):
            parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=None,
                                choices=f.metadata.get("choices"),
                                help=f"{f.metadata['help']} (env {ENV_PREFIX}{f.name.upper()})")
        return parser

    def validate(self) -> None:
        """Raise ``SettingsError`` for a value of the wrong type or one that cannot work."""
        for f in fields(self):
            value = getattr(self, f.name)
            if not _has_type(f, value):
                raise SettingsError(f"{f.name} must be {_TYPE_WORDS.get(_kind(f), _kind(f))}, "
                                    f"not {value!r} ({type(value).__name__})")
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise SettingsError(f"{f.name} must be one of {', '.join(choices)}, "
                                 f"not {getattr(self, f.name)!r}")
        for name in ("parallelism", "checkpoint_interval_ms", "max_model_bytes"):
            if getattr(self, name) < 0:
                raise SettingsError(f"{name} must not be negative, not {getattr(self, name)}")
        if self.stats_interval_ms <= 0:
            raise SettingsError(f"stats_interval_ms must be positive, not {self.stats_interval_ms}")
        if not 0 <= self.rest_port <= 65535:
            raise SettingsError(f"rest_port must be a TCP port (0-65535), not {self.rest_port}")
        if self.buffer_timeout_ms < -1:
            raise SettingsError("buffer_timeout_ms must be -1 (only full buffers are sent), 0 or "
                                f"more, not {self.buffer_timeout_ms}")
        if self.spread_keys <= 0:
            raise SettingsError("spread_keys must be positive")
        if self.batch_max_size <= 0 or self.batch_max_wait_ms < 0:
            raise SettingsError("batch_max_size must be positive and batch_max_wait_ms not negative")
        if self.bundle_size <= 0 or self.bundle_time_ms <= 0:
            raise SettingsError("bundle_size and bundle_time_ms must be positive")
        if self.max_model_bytes <= 0 or self.max_inline_model_bytes <= 0:
            raise SettingsError("max_model_bytes and max_inline_model_bytes must be positive")
        if self.speculative_max_budget_ms <= 0:
            raise SettingsError(f"speculative_max_budget_ms must be positive, not "
                                f"{self.speculative_max_budget_ms}")
        if not self.drift_threshold > 0:
            raise SettingsError(f"drift_threshold must be positive, not {self.drift_threshold}")
        if self.max_record_bytes <= 0:
            raise SettingsError(f"max_record_bytes must be positive, not {self.max_record_bytes}")
        for name in ("dead_letter_max_raw_bytes", "max_result_bytes"):
            # the topics' limit (jobs.kafka_config.MAX_MESSAGE_BYTES) is 20 MiB
            if not 0 < getattr(self, name) <= 10 * 1024 * 1024:
                raise SettingsError(f"{name} must be positive and at most 10 MiB (half the "
                                    f"topics' message limit), not {getattr(self, name)}")
        self._validate_model_servers()
        topics = [self.data_topic, self.models_topic, self.results_topic, self.dead_letter_topic,
                  self.state_topic, self.repository_topic, self.shadow_topic]
        topics = [t for t in topics if t]
        if len(set(topics)) != len(topics):
            raise SettingsError(f"data, models, results, dead-letter, state, repository and shadow topics "
                                f"must differ: {topics}")

    def _validate_model_servers(self) -> None:
        from udfs.runtimes.endpoints import normalize_server_url  # one URL rule for both sides

        for url in self.model_servers:
            try:
                normalize_server_url(url)
            except ValueError as exc:
                raise SettingsError(f"model_servers: {url!r} is not a server URL: {exc}") from None
        for name in ("model_server_timeout_ms", "model_server_max_in_flight",
                     "model_server_batches_in_flight",
                     "model_server_breaker_failures", "model_server_breaker_reset_ms",
                     "model_server_max_rows_per_call"):
            if getattr(self, name) <= 0:
                raise SettingsError(f"{name} must be positive, not {getattr(self, name)}")
        if self.model_server_retries < 0:
            raise SettingsError(f"model_server_retries must not be negative, not "
                                f"{self.model_server_retries}")

    def replace(self, **changes) -> "Settings":
        return dataclasses.replace(self, **changes)

    # -- derived values -------------------------------------------------------------------

    def for_job(self, job: str) -> "Settings":
        """Fill the per-job defaults (group id, job name, transactional prefix)."""
        name = self.job_name or f"modelserving-{job}"
        return self.replace(job_name=name, group_id=self.group_id or name,
                            transactional_id_prefix=self.transactional_id_prefix or name)

    def to_environ(self) -> dict[str, str]:
        """The settings as ``MODELSERVING_*`` variables, to hand to a job in another process."""
        return {ENV_PREFIX + f.name.upper(): (",".join(v) if isinstance(v, tuple) else str(v))
                for f in fields(self) for v in [getattr(self, f.name)]}

    def describe(self) -> dict:
        """The settings as a dict safe to log: secret-bearing values are masked."""
        return {f.name: ("***" if f.metadata.get("secret") and getattr(self, f.name) else
                         getattr(self, f.name)) for f in fields(self)}

    def resolved_model_dirs(self) -> tuple[Path, ...]:
        return tuple(Path(d).expanduser().resolve() for d in self.model_dirs if d)


def _kind(f: dataclasses.Field) -> str:
    """The field's annotation as text (annotations are strings here: postponed evaluation)."""
    return f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))


_TYPE_WORDS = {"int": "an integer", "float": "a number", "bool": "yes or no",
               "str": "text", "tuple[str, ...]": "a comma-separated list"}


def _has_type(f: dataclasses.Field, value) -> bool:
    kind = _kind(f)
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "str":
        return isinstance(value, str)
    if kind == "tuple[str, ...]":
        return isinstance(value, tuple) and all(isinstance(v, str) for v in value)
    raise TypeError(f"setting {f.name} has a type settings cannot check: {kind}")


def _convert(f: dataclasses.Field, raw, source: str = ""):
    """A setting's raw text (from a variable or an option) as the field's type; ``source``
    names where it came from, for the error message."""
    kind = _kind(f)
    text = raw.strip() if isinstance(raw, str) else raw
    try:
        if kind == "int":
            return int(text)
        if kind == "float":
            return float(text)
        if kind == "bool":
            if isinstance(raw, bool):
                return raw
            lowered = str(text).lower()
            if lowered in _TRUE or lowered in _FALSE:
                return lowered in _TRUE
            raise ValueError(raw)
        if kind == "tuple[str, ...]":
            if isinstance(raw, (list, tuple)):
                return tuple(str(part) for part in raw)
            return tuple(part.strip() for part in str(raw).split(",") if part.strip())
        if kind == "str":
            return str(raw)
    except (TypeError, ValueError):
        where = f" (from {source})" if source else ""
        raise SettingsError(f"{f.name} must be {_TYPE_WORDS[kind]}, not {raw!r}{where}") from None
    raise TypeError(f"setting {f.name} has a type settings cannot convert: {kind}")


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
