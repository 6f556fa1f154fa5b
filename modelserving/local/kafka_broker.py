"""A real single-node Apache Kafka broker (KRaft, combined broker + controller) on 127.0.0.1.

Used by the demo, the CLI (``modelserving kafka start|stop``) and the end-to-end tests.
The broker runs from the pinned jars (``modelserving.local.jars.kafka_classpath()``) as::

    java -Xmx<heap> -cp <classpath> kafka.Kafka <workdir>/server.properties

Everything lives in ``workdir``: ``server.properties``, ``log4j2.properties``, ``data/``
(topic and metadata logs), ``broker.log`` (the broker's stdout + stderr) and
``broker.pid``.  The broker runs in its own session, so it outlives the process that
started it (``start()`` returns leaving it running); ``stop()`` on any ``LocalKafka``
with the same workdir ends it through the pid file.
"""
from __future__ import annotations

import base64
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

from modelserving.kafka.admin import MAX_MESSAGE_BYTES

__all__ = ["LocalKafka", "LocalKafkaError", "free_port", "free_ports"]

HOST = "127.0.0.1"
LOG_TAIL_LINES = 60


class LocalKafkaError(RuntimeError):
    """The local broker could not be started or stopped."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bind to port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def free_ports(n: int) -> list[int]:
    """``n`` distinct free ports on 127.0.0.1 (all bound at once, so never equal)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) for _ in range(n)]
        for s in socks:
            s.bind((HOST, 0))
        return [s.getsockname()[1] for s in socks]


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            return False
        return True


def _port_accepts(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((HOST, port)) == 0


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
    ...     print(kafka.bootstrap)
    """

    def __init__(self, workdir: Path, port: int = 9092, controller_port: int = 9093,
                 heap: str = "512m", *, die_with_parent: bool = False):
        self.workdir = Path(workdir).resolve()
        self.port = int(port)
        self.controller_port = int(controller_port)
        self.heap = heap
        # Tests set this so a killed test run cannot leave an orphan broker behind; the
        # CLI leaves it off so the broker outlives `modelserving kafka start`.
        self.die_with_parent = die_with_parent
        self._proc: subprocess.Popen | None = None

    # ------------------------------------------------------------------ paths & config
    @property
    def bootstrap(self) -> str:
        return f"{HOST}:{self.port}"

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

    def server_properties(self) -> dict[str, str]:
        return {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@{HOST}:{self.controller_port}",
            "listeners": f"PLAINTEXT://{HOST}:{self.port},CONTROLLER://{HOST}:{self.controller_port}",
            "advertised.listeners": f"PLAINTEXT://{HOST}:{self.port}",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "inter.broker.listener.name": "PLAINTEXT",
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

    def _write_config(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        lines = ["# Written by modelserving.local.kafka_broker on every start; edits are overwritten."]
        lines += [f"{k}={v}" for k, v in self.server_properties().items()]
        self.properties_file.write_text("\n".join(lines) + "\n")
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
        cmd = self._java_cmd("kafka.tools.StorageTool", "format", "--cluster-id", _new_cluster_id(),
                             "--config", str(self.properties_file), "--ignore-formatted")
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=120)
        if proc.returncode != 0 or not self.is_formatted():
            raise LocalKafkaError(f"formatting the Kafka storage in {self.data_dir} failed "
                                  f"(exit {proc.returncode}):\n{proc.stdout.strip()}")

    # ------------------------------------------------------------------ process state
    def _read_pid(self) -> int | None:
        try:
            return int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None

    def _pid_is_ours(self, pid: int) -> bool:
        """True when ``pid`` is alive (not a zombie) and is this workdir's broker."""
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except FileNotFoundError:
            return False
        except OSError:  # no /proc: fall back to a liveness probe
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return False
            except PermissionError:
                return True
            return True
        if stat.rsplit(")", 1)[-1].split()[0] in ("Z", "X"):
            return False
        return b"kafka.Kafka" in cmdline and str(self.properties_file).encode() in cmdline

    def pid(self) -> int | None:
        """The running broker's pid, or None."""
        if self._proc is not None and self._proc.poll() is None:
            return self._proc.pid
        pid = self._read_pid()
        if pid is not None and self._pid_is_ours(pid):
            return pid
        return None

    def is_running(self) -> bool:
        return self.pid() is not None

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            text = self.log_file.read_text(errors="replace")
        except OSError:
            return "(no broker.log)"
        return "\n".join(text.splitlines()[-lines:])

    def _running_port(self) -> int | None:
        try:
            for line in self.properties_file.read_text().splitlines():
                if line.startswith("advertised.listeners="):
                    return int(line.rsplit(":", 1)[1])
        except (OSError, ValueError):
            pass
        return None

    # ------------------------------------------------------------------ lifecycle
    def start(self, timeout: float = 90) -> "LocalKafka":
        """Format the storage if needed, spawn the broker and wait until it serves metadata."""
        if self.is_running():
            running = self._running_port()
            if running != self.port:
                raise LocalKafkaError(
                    f"a broker from {self.workdir} is already running (pid {self.pid()}) on "
                    f"{HOST}:{running}, not {self.bootstrap}; stop it first")
            self._wait_ready(time.monotonic() + timeout)
            return self
        for port in (self.port, self.controller_port):
            if not _port_is_free(port):
                raise LocalKafkaError(f"port {HOST}:{port} is already in use; choose other ports "
                                      f"(e.g. modelserving.local.kafka_broker.free_port())")
        self._write_config()
        if not self.is_formatted():
            self._format()
        cmd = self._java_cmd("kafka.Kafka", str(self.properties_file))
        with open(self.log_file, "ab") as log:
            log.write(f"\n===== modelserving.local.kafka_broker: starting broker on {self.bootstrap} at "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S')} =====\n".encode())
            log.flush()
            self._proc = subprocess.Popen(
                cmd, cwd=self.workdir, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, close_fds=True,
                preexec_fn=_set_pdeathsig if self.die_with_parent else None)
        self.pid_file.write_text(f"{self._proc.pid}\n")
        try:
            self._wait_ready(time.monotonic() + timeout)
        except BaseException:
            self.stop(timeout=10)
            raise
        return self

    def _wait_ready(self, deadline: float) -> None:
        last_error: Exception | None = None
        while True:
            if not self.is_running():
                code = self._proc.poll() if self._proc is not None else None
                raise LocalKafkaError(f"the Kafka broker exited during startup (exit code {code}); "
                                      f"tail of {self.log_file}:\n{self.log_tail()}")
            if _port_accepts(self.port):
                try:
                    self._probe()
                    return
                except Exception as exc:  # not ready yet
                    last_error = exc
            if time.monotonic() >= deadline:
                raise LocalKafkaError(f"the Kafka broker at {self.bootstrap} was not ready in time "
                                      f"(last error: {last_error!r}); tail of {self.log_file}:\n"
                                      f"{self.log_tail()}")
            time.sleep(0.25)

    def _admin(self, **configs):
        from kafka.admin import KafkaAdminClient

        configs.setdefault("request_timeout_ms", 10000)
        return KafkaAdminClient(bootstrap_servers=self.bootstrap, client_id="modelserving-local-kafka",
                                **configs)

    def _probe(self) -> None:
        admin = self._admin(request_timeout_ms=5000)
        try:
            cluster = admin.describe_cluster()
            if not cluster.get("brokers"):
                raise LocalKafkaError("no brokers in metadata yet")
        finally:
            admin.close()

    def stop(self, timeout: float = 30) -> bool:
        """SIGTERM the broker (found through the pid file), wait, SIGKILL if needed.

        Returns True when a running broker was stopped, False when none was running.
        """
        pid = self.pid()
        if pid is None:
            self.pid_file.unlink(missing_ok=True)
            self._proc = None
            return False
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        if not self._wait_gone(pid, timeout):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            self._wait_gone(pid, 10)
        self.pid_file.unlink(missing_ok=True)
        self._proc = None
        return True

    def _wait_gone(self, pid: int, timeout: float) -> bool:
        if self._proc is not None and self._proc.pid == pid:
            try:
                self._proc.wait(timeout=timeout)
                return True
            except subprocess.TimeoutExpired:
                return False
        deadline = time.monotonic() + timeout
        while self._pid_is_ours(pid):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.1)
        return True

    def __enter__(self) -> "LocalKafka":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"LocalKafka({str(self.workdir)!r}, bootstrap={self.bootstrap!r})"

    # ------------------------------------------------------------------ topics
    def create_topics(self, names, partitions: int = 2, compacted=()) -> None:
        """Create topics on this broker; see ``kafka_admin.ensure_topics``."""
        from modelserving.kafka.admin import ensure_topics

        ensure_topics(self.bootstrap, names, compacted=compacted, partitions=partitions)
