"""A real single-node Apache Kafka broker (KRaft, combined broker + controller) on 127.0.0.1.

Used by the demo, the CLI (``modelserving kafka start|stop``), the benchmark and the
end-to-end tests. The broker runs from the pinned jars (``modelserving.local.jars``) as::

    java -Xmx<heap> -cp <classpath> kafka.Kafka <workdir>/server.properties

Everything lives in ``workdir``: ``server.properties``, ``log4j2.properties``, ``data/``
(topic and metadata logs), ``broker.log`` (the broker's stdout + stderr), ``broker.pid``
and, for a SCRAM broker, ``scram.json`` (the broker's own credentials, readable only by
the owner). The broker runs in its own session, so it outlives the process that started
it (``start()`` returns leaving it running); ``stop()`` on any ``LocalKafka`` with the
same workdir ends it through the pid file.

With ``scram_users`` the client listener is ``SASL_PLAINTEXT`` with SCRAM-SHA-256: a
secured cluster to prove that every client of the project authenticates. Brokers talk
to each other on the same listener as an internal user; the controller listener stays
PLAINTEXT. Users are written into the metadata when the storage is formatted (the only
way before a KRaft broker first starts); a later start with changed users updates them
through the admin API.
"""
from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path
from typing import Mapping

import psutil

from jobs.kafka_config import MAX_MESSAGE_BYTES, SCRAM_LOGIN_MODULE, kafka_python
from jobs.settings import Settings
from modelserving.errors import DeadlineExceeded, LocalKafkaError
from modelserving.local import processes
from modelserving.local.waiting import wait_until

__all__ = ["LocalKafka", "LocalKafkaError", "SCRAM_MECHANISM"]

HOST = processes.HOST
LOG_TAIL_LINES = 60
SCRAM_MECHANISM = "SCRAM-SHA-256"
BROKER_USER = "modelserving-broker"
#: What ``kafka.tools.StorageTool --add-scram`` and a JAAS line can carry unquoted.
_SCRAM_TEXT = re.compile(r"[A-Za-z0-9._@+\-]+")
_SCRAM_PASSWORD = re.compile(r"[^\s,\[\]\"\\=]+")


def _new_cluster_id() -> str:
    """A Kafka cluster id: url-safe base64 of a random UUID, not starting with '-'."""
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cid.startswith("-"):
            return cid


def _java() -> str:
    home = os.environ.get("JAVA_HOME")
    if home and os.access(Path(home) / "bin" / "java", os.X_OK):
        return str(Path(home) / "bin" / "java")
    java = shutil.which("java")
    if not java:
        raise LocalKafkaError("java (17+) is required on PATH to run the local Kafka broker: "
                              "apt-get install openjdk-17-jre-headless")
    return java


def _set_pdeathsig() -> None:  # runs in the child between fork and exec
    import ctypes

    PR_SET_PDEATHSIG = 1
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


LOG4J2_PROPERTIES = """\
# Written by modelserving.local.kafka_broker: broker logs go to stdout, i.e. broker.log.
status = warn
shutdownHook = disable
appender.out.type = Console
appender.out.name = STDOUT
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.out.ref = STDOUT
logger.state.name = state.change.logger
logger.state.level = WARN
logger.request.name = kafka.request.logger
logger.request.level = WARN
logger.authorizer.name = kafka.authorizer.logger
logger.authorizer.level = WARN
logger.config.name = org.apache.kafka.common.config.AbstractConfig
logger.config.level = WARN
"""


class LocalKafka:
    """A single-node KRaft Kafka broker listening only on 127.0.0.1.

    >>> with LocalKafka(Path("var/kafka"), port=free_port(), controller_port=free_port()) as kafka:
    ...     kafka.create_topics(["models", "data"], compacted=["models"])
    ...     settings = kafka.client_settings()   # what every client needs to reach it

    ``scram_users={"alice": "alice-secret"}`` secures the client listener (SASL_PLAINTEXT,
    SCRAM-SHA-256) with those users.
    """

    def __init__(self, workdir: Path, port: int = 9092, controller_port: int = 9093,
                 heap: str = "512m", *, die_with_parent: bool = False,
                 scram_users: Mapping[str, str] | None = None):
        self.workdir = Path(workdir).resolve()
        self.port = int(port)
        self.controller_port = int(controller_port)
        self.heap = heap
        # Tests set this so a killed test run cannot leave an orphan broker behind; the
        # CLI leaves it off so the broker outlives `modelserving kafka start`.
        self.die_with_parent = die_with_parent
        self.scram_users = dict(scram_users or {})
        for name, password in self.scram_users.items():
            if not _SCRAM_TEXT.fullmatch(name) or name == BROKER_USER:
                raise LocalKafkaError(f"SCRAM user name {name!r} is not allowed: use letters, digits "
                                      f"and . _ @ + - (and not {BROKER_USER})")
            if not _SCRAM_PASSWORD.fullmatch(password or ""):
                raise LocalKafkaError(f"the SCRAM password of {name!r} must be non-empty, without "
                                      "blanks, commas, brackets, quotes, backslashes or '='")
        self._proc: subprocess.Popen | None = None

    # ------------------------------------------------------------------ paths & config
    @property
    def bootstrap(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def secured(self) -> bool:
        return bool(self.scram_users)

    @property
    def listener(self) -> str:
        """Name (and security protocol) of the client listener."""
        return "SASL_PLAINTEXT" if self.secured else "PLAINTEXT"

    @property
    def data_dir(self) -> Path:
        return self.workdir / "data"

    @property
    def properties_file(self) -> Path:
        return self.workdir / "server.properties"

    @property
    def log_file(self) -> Path:
        return self.workdir / "broker.log"

    @property
    def pid_file(self) -> Path:
        return self.workdir / "broker.pid"

    @property
    def scram_file(self) -> Path:
        return self.workdir / "scram.json"

    def client_settings(self, base: Settings | None = None, user: str | None = None) -> Settings:
        """``base`` (default: the defaults) pointed at this broker with the right security:
        for a SCRAM broker as ``user`` (default: the first of ``scram_users``)."""
        base = base if base is not None else Settings.from_sources([], environ={})
        settings = base.replace(bootstrap_servers=self.bootstrap, kafka_properties_file="",
                                security_protocol="PLAINTEXT", sasl_mechanism="",
                                sasl_username="", sasl_password="", ssl_cafile="")
        if not self.secured:
            return settings
        user = user or next(iter(self.scram_users))
        if user not in self.scram_users:
            raise LocalKafkaError(f"{user!r} is not a SCRAM user of this broker "
                                  f"({', '.join(self.scram_users)})")
        return settings.replace(security_protocol="SASL_PLAINTEXT", sasl_mechanism=SCRAM_MECHANISM,
                                sasl_username=user, sasl_password=self.scram_users[user])

    def server_properties(self) -> dict[str, str]:
        props = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@{HOST}:{self.controller_port}",
            "listeners": f"{self.listener}://{HOST}:{self.port},CONTROLLER://{HOST}:{self.controller_port}",
            "advertised.listeners": f"{self.listener}://{HOST}:{self.port}",
            "listener.security.protocol.map": f"{self.listener}:{self.listener},CONTROLLER:PLAINTEXT",
            "inter.broker.listener.name": self.listener,
            "controller.listener.names": "CONTROLLER",
            "log.dirs": str(self.data_dir),
            # topics
            "auto.create.topics.enable": "true",
            "num.partitions": "2",
            "default.replication.factor": "1",
            "min.insync.replicas": "1",
            # single node: internal topics with one replica (and few partitions: fast start)
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "10",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "transaction.state.log.num.partitions": "10",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
            # Flink's exactly-once Kafka sink uses transaction timeouts of up to 1 h
            "transaction.max.timeout.ms": "3600000",
            # big messages (serialized models)
            "message.max.bytes": str(MAX_MESSAGE_BYTES),
            "replica.fetch.max.bytes": str(MAX_MESSAGE_BYTES),
            "socket.request.max.bytes": str(max(MAX_MESSAGE_BYTES + (1 << 20), 104857600)),
            # small footprint on a shared machine
            "num.network.threads": "2",
            "num.io.threads": "4",
            "num.recovery.threads.per.data.dir": "1",
            "log.cleaner.dedupe.buffer.size": str(16 * 1024 * 1024),
            "log.cleaner.threads": "1",
        }
        if self.secured:
            prefix = f"listener.name.{self.listener.lower()}"
            props.update({
                "sasl.enabled.mechanisms": SCRAM_MECHANISM,
                "sasl.mechanism.inter.broker.protocol": SCRAM_MECHANISM,
                f"{prefix}.sasl.enabled.mechanisms": SCRAM_MECHANISM,
                # the broker's own login, for the connections it opens to itself
                # (transaction markers, for one): the user is created at format time
                f"{prefix}.{SCRAM_MECHANISM.lower()}.sasl.jaas.config":
                    f'{SCRAM_LOGIN_MODULE} required username="{BROKER_USER}" '
                    f'password="{self._broker_password()}";',
            })
        return props

    def _broker_password(self) -> str:
        """The internal user's password: made once per workdir, kept owner-readable only."""
        try:
            return json.loads(self.scram_file.read_text())["broker_password"]
        except (OSError, ValueError, KeyError):
            pass
        password = secrets.token_urlsafe(24).replace("-", "_")
        self.workdir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.scram_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            json.dump({"broker_user": BROKER_USER, "broker_password": password}, out)
        return password

    def _write_config(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        lines = ["# Written by modelserving.local.kafka_broker on every start; edits are overwritten."]
        lines += [f"{k}={v.replace(chr(92), chr(92) * 2)}" for k, v in self.server_properties().items()]
        fd = os.open(self.properties_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:   # it holds the broker's password when secured
            out.write("\n".join(lines) + "\n")
        (self.workdir / "log4j2.properties").write_text(LOG4J2_PROPERTIES)

    def _java_cmd(self, main: str, *args: str) -> list[str]:
        from modelserving.local.jars import kafka_classpath

        return [
            _java(), f"-Xmx{self.heap}", "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20",
            "-XX:+ExitOnOutOfMemoryError", "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={self.workdir / 'log4j2.properties'}",
            "-cp", kafka_classpath(), main, *args,
        ]

    def is_formatted(self) -> bool:
        return (self.data_dir / "meta.properties").is_file()

    def _format(self) -> None:
        args = ["format", "--cluster-id", _new_cluster_id(), "--config", str(self.properties_file),
                "--ignore-formatted"]
        if self.secured:
            users = {BROKER_USER: self._broker_password(), **self.scram_users}
            for name, password in users.items():
                args += ["--add-scram", f"{SCRAM_MECHANISM}=[name={name},password={password}]"]
        proc = subprocess.run(self._java_cmd("kafka.tools.StorageTool", *args),
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=120)
        if proc.returncode != 0 or not self.is_formatted():
            output = proc.stdout.strip()
            for password in self.scram_users.values():
                output = output.replace(password, "***")
            raise LocalKafkaError(f"formatting the Kafka storage in {self.data_dir} failed "
                                  f"(exit {proc.returncode}):\n{output}")

    # ------------------------------------------------------------------ process state
    def _is_our_broker(self, pid: int) -> bool:
        """True when ``pid`` is alive (not a zombie) and is this workdir's broker."""
        if not processes.is_alive(pid):
            return False
        try:
            command = processes.cmdline(psutil.Process(pid))
        except psutil.Error:
            return False
        return "kafka.Kafka" in command and str(self.properties_file) in command

    def pid(self) -> int | None:
        """The running broker's pid, or None."""
        if self._proc is not None and self._proc.poll() is None:
            return self._proc.pid
        pid = processes.read_pid(self.pid_file)
        if pid is not None and self._is_our_broker(pid):
            return pid
        return None

    def is_running(self) -> bool:
        return self.pid() is not None

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        return processes.log_tail(self.log_file, lines) or "(no broker.log)"

    def _running_listener(self) -> str | None:
        """The client listener the running broker was started with (from its properties)."""
        try:
            for line in self.properties_file.read_text().splitlines():
                if line.startswith("advertised.listeners="):
                    return line.split("=", 1)[1]
        except OSError:
            pass
        return None

    # ------------------------------------------------------------------ lifecycle
    def start(self, timeout: float = 90) -> "LocalKafka":
        """Format the storage if needed, spawn the broker and wait until it serves metadata
        (and, when secured, until every SCRAM user can log in)."""
        wanted = f"{self.listener}://{self.bootstrap}"
        if self.is_running():
            running = self._running_listener()
            if running != wanted:
                raise LocalKafkaError(
                    f"a broker from {self.workdir} is already running (pid {self.pid()}) as "
                    f"{running}, not {wanted}; stop it first")
            self._wait_ready(timeout)
            return self
        for port in (self.port, self.controller_port):
            if not processes.port_is_free(port):
                raise LocalKafkaError(f"port {HOST}:{port} is already in use; choose other ports "
                                      f"(e.g. modelserving.local.processes.free_port())")
        if self.secured and self.is_formatted() and not self.scram_file.exists():
            raise LocalKafkaError(f"the storage in {self.data_dir} was formatted without SCRAM users, "
                                  "so the broker cannot log in to itself; use an empty workdir")
        self._write_config()
        if not self.is_formatted():
            self._format()
        cmd = self._java_cmd("kafka.Kafka", str(self.properties_file))
        with open(self.log_file, "ab") as log:
            log.write(f"\n===== modelserving.local.kafka_broker: starting broker on {wanted} at "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S')} =====\n".encode())
            log.flush()
            self._proc = subprocess.Popen(
                cmd, cwd=self.workdir, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, close_fds=True,
                preexec_fn=_set_pdeathsig if self.die_with_parent else None)
        self.pid_file.write_text(f"{self._proc.pid}\n")
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop(timeout=10)
            raise
        return self

    def _wait_ready(self, timeout: float) -> None:
        last_error: list[Exception] = []

        def ready() -> bool:
            if not self.is_running():
                code = self._proc.poll() if self._proc is not None else None
                raise LocalKafkaError(f"the Kafka broker exited during startup (exit code {code}); "
                                      f"tail of {self.log_file}:\n{self.log_tail()}")
            if not processes.port_accepts(self.port):
                return False
            try:
                self._probe()
                return True
            except Exception as exc:  # noqa: BLE001 - not ready yet; the last one is reported
                last_error[:] = [exc]
                return False

        started = time.monotonic()
        try:
            wait_until(ready, timeout, f"the Kafka broker at {self.bootstrap}", interval_s=0.25)
            if self.secured:
                self._ensure_users(max(10.0, timeout - (time.monotonic() - started)))
        except DeadlineExceeded:
            raise LocalKafkaError(f"the Kafka broker at {self.bootstrap} was not ready in {timeout:g} s "
                                  f"(last error: {last_error[0] if last_error else 'none'!r}); "
                                  f"tail of {self.log_file}:\n{self.log_tail()}") from None

    def _admin(self, settings: Settings, **configs):
        from kafka.admin import KafkaAdminClient

        return KafkaAdminClient(**kafka_python(settings, client_id="modelserving-local-kafka",
                                               **{"request_timeout_ms": 10000, **configs}))

    def _internal_settings(self) -> Settings:
        """The broker's own user when secured: it exists whatever ``scram_users`` say now."""
        settings = self.client_settings()
        if not self.secured:
            return settings
        return settings.replace(sasl_username=BROKER_USER, sasl_password=self._broker_password())

    def _probe(self, settings: Settings | None = None) -> None:
        admin = self._admin(settings or self._internal_settings(), request_timeout_ms=5000)
        try:
            cluster = admin.describe_cluster()
            if not cluster.get("brokers"):
                raise LocalKafkaError("no brokers in metadata yet")
        finally:
            admin.close()

    def _ensure_users(self, timeout: float) -> None:
        """Every SCRAM user logs in; one that cannot (added or changed since the storage was
        formatted) is written through the admin API, then awaited."""
        from kafka.admin import UserScramCredentialUpsertion

        failing = []
        for user in self.scram_users:
            try:
                self._probe(self.client_settings(user=user))
            except Exception:  # noqa: BLE001 - unknown user or old password
                failing.append(user)
        if not failing:
            return
        admin = self._admin(self._internal_settings())
        try:
            errors = admin.alter_user_scram_credentials(
                [UserScramCredentialUpsertion(user, SCRAM_MECHANISM, self.scram_users[user])
                 for user in failing])
        finally:
            admin.close()
        refused = {user: error for user, error in errors.items() if error}
        if refused:
            raise LocalKafkaError(f"the broker refused the SCRAM users: {refused}")

        def logs_in(user: str) -> bool:
            try:
                self._probe(self.client_settings(user=user))
                return True
            except Exception:  # noqa: BLE001 - the new credentials are not applied yet
                return False

        wait_until(lambda: all(logs_in(user) for user in failing), timeout,
                   f"SCRAM users {', '.join(failing)} able to log in", interval_s=0.5)

    def stop(self, timeout: float = 30) -> bool:
        """SIGTERM the broker (found through the pid file), wait, SIGKILL if needed.

        Returns True when a running broker was stopped, False when none was running.
        """
        pid = self.pid()
        if pid is None:
            self.pid_file.unlink(missing_ok=True)
            self._proc = None
            return False
        survivors = processes.terminate([pid], grace_s=timeout)
        if self._proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=5)   # reap our child
        if survivors:
            raise LocalKafkaError(f"the Kafka broker (pid {pid}) survived SIGKILL")
        self.pid_file.unlink(missing_ok=True)
        self._proc = None
        return True

    def __enter__(self) -> "LocalKafka":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"LocalKafka({str(self.workdir)!r}, bootstrap={self.bootstrap!r}, listener={self.listener})"

    # ------------------------------------------------------------------ topics
    def create_topics(self, names, partitions: int = 2, compacted=()) -> None:
        """Create topics on this broker; see ``modelserving.kafka.admin.ensure_topics``."""
        from modelserving.kafka.admin import ensure_topics

        ensure_topics(self.client_settings(), names, compacted=compacted, partitions=partitions)
