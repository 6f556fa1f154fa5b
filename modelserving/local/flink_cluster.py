"""A local standalone Flink cluster run from the Flink distribution inside the installed
``pyflink`` package, and the jobs on it.

Everything of one cluster lives in its ``workdir``::

    conf/          config.yaml and friends (``flink_config``), masters, workers
    log/           JobManager and TaskManager logs (.log, .out)
    pid/           the pid files of flink-daemon.sh (never the shared /tmp default)
    tmp/           io.tmp.dirs (blobs, Python worker files)
    checkpoints/   execution.checkpointing.dir
    savepoints/    execution.checkpointing.savepoint-dir
    pyfiles/       the zip of job packages shipped with ``flink run`` (``job_files``)
    cluster.json   the ports of the running instance, for a later ``attach``

Every port is per instance: REST is chosen by the caller, the JobManager RPC port is a
free port found at start, the others are ephemeral, so a test cluster runs next to a demo.

The distribution's scripts run with ``FLINK_HOME`` = the pyflink package directory and
``FLINK_CONF_DIR`` = ``workdir/conf``. The cluster's JVMs are recognised by
``--configDir <workdir/conf>`` on their command line, its other processes (Python workers,
a hanging ``flink run``) by ``FLINK_CONF_DIR=<workdir/conf>`` in their environment.

A TaskManager's descendants (its Python workers, their ``tee`` and runner shell, the pypmml
JVMs of the workers) also carry ``MODELSERVING_TASKMANAGER=<its resource id>`` (``initial``
for those of ``start()``), set when the TaskManager is started: a TaskManager killed by
SIGKILL (or the OOM killer) leaves them behind, reparented to init, ~200 MB each. The next
``start_taskmanager()``, ``status`` (``reap_orphans()``) or ``stop()`` finds and ends them:
a process with the mark whose ancestors hold no live JobManager or TaskManager JVM of the
cluster is an orphan.

Jobs are submitted with ``flink run -pym <module>``; everything else goes through the REST
API (``flink_rest``).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Iterable, Sequence

from jobs.settings import Settings
from modelserving.errors import DeadlineExceeded, FlinkClusterError
from modelserving.local import flink_rest, processes
from modelserving.local.flink_config import (
    HOST,
    PROJECT_CONF,
    PROMETHEUS_PORT_KEY,
    cluster_configuration,
    flink_home,
    port_range,
    read_flat,
    write_conf_dir,
)
from modelserving.local.job_files import JOB_PACKAGES, build_zip
from modelserving.local.waiting import wait_until
from modelserving.paths import PROJECT_ROOT

__all__ = ["LocalFlinkCluster", "FlinkClusterError"]

JM_CLASS = "org.apache.flink.runtime.entrypoint.StandaloneSessionClusterEntrypoint"
TM_CLASS = "org.apache.flink.runtime.taskexecutor.TaskManagerRunner"
IDENT = "modelserving"  # FLINK_IDENT_STRING: names the pid and log files
#: Set in a TaskManager's environment (its resource id), inherited by everything it starts.
TM_MARK = "MODELSERVING_TASKMANAGER"
#: The distribution's start scripts: what runs under them is a daemon being started (its
#: BashJavaUtils JVM, say), never an orphan.
START_SCRIPTS = ("start-cluster.sh", "jobmanager.sh", "taskmanager.sh", "flink-daemon.sh")
JOB_ID = re.compile(r"JobID\s+([0-9a-f]{32})")
#: Variables of another Flink installation that would redirect the distribution's scripts.
FOREIGN_FLINK_VARIABLES = (
    "FLINK_ENV_JAVA_OPTS", "FLINK_ENV_JAVA_OPTS_JM", "FLINK_ENV_JAVA_OPTS_TM",
    "FLINK_ENV_JAVA_OPTS_CLI", "FLINK_LIB_DIR", "FLINK_PLUGINS_DIR", "FLINK_OPT_DIR",
    "FLINK_BIN_DIR", "_FLINK_HOME_DETERMINED")


class LocalFlinkCluster:
    """A standalone Flink session cluster (one JobManager, ``taskmanagers`` TaskManagers with
    ``slots`` slots each) on 127.0.0.1, started from the pyflink distribution.

    >>> cluster = LocalFlinkCluster(Path("var/flink"), rest_port=8081).start()
    >>> job_id = cluster.submit("jobs.keyed_job", ["--bootstrap-servers", "127.0.0.1:9092"])
    >>> cluster.wait_running(job_id)
    >>> savepoint = cluster.stop_with_savepoint(job_id)
    >>> cluster.submit("jobs.keyed_job", [...], savepoint=savepoint)
    >>> cluster.stop()

    The processes outlive the Python process that started them; ``attach(workdir)`` finds
    a running instance again. ``prometheus_ports`` gives the cluster's metrics reporter a
    port range of its own (else the project configuration's, shared by every cluster).
    """

    def __init__(self, workdir: Path | str, rest_port: int = 8081, slots: int = 2, *,
                 taskmanagers: int = 1, python: str | None = None,
                 conf_file: Path | str = PROJECT_CONF, extra_conf: dict | None = None,
                 prometheus_ports: Sequence[int] | None = None,
                 project_root: Path | str = PROJECT_ROOT,
                 python_packages: Iterable[str] = JOB_PACKAGES):
        self.workdir = Path(workdir).resolve()
        self.rest_port = int(rest_port)
        self.slots = int(slots)
        self.taskmanagers = int(taskmanagers)
        # The venv's interpreter, not resolved: resolving a venv's python symlink would
        # leave the venv (and its site-packages) behind.
        self.python = str(Path(python or sys.executable).absolute())
        self.conf_file = Path(conf_file)
        self.extra_conf = dict(extra_conf or {})
        if prometheus_ports:
            ports = sorted(prometheus_ports)
            self.extra_conf[PROMETHEUS_PORT_KEY] = f"{ports[0]}-{ports[-1]}"
        self.project_root = Path(project_root).resolve()
        self.python_packages = tuple(python_packages)
        self.rpc_port: int | None = None

    # -- paths --------------------------------------------------------------------------------

    @property
    def conf_dir(self) -> Path:
        return self.workdir / "conf"

    @property
    def log_dir(self) -> Path:
        return self.workdir / "log"

    @property
    def pid_dir(self) -> Path:
        return self.workdir / "pid"

    @property
    def checkpoint_dir(self) -> Path:
        return self.workdir / "checkpoints"

    @property
    def savepoint_dir(self) -> Path:
        return self.workdir / "savepoints"

    @property
    def state_file(self) -> Path:
        return self.workdir / "cluster.json"

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.rest_port}"

    def web_ui(self, job_id: str | None = None) -> str:
        return f"{self.url}/#/job/running/{job_id}/overview" if job_id else self.url

    def pid_file(self, daemon: str) -> Path:
        """flink-daemon.sh's pid file of ``daemon`` (``standalonesession``, ``taskexecutor``)."""
        return self.pid_dir / f"flink-{IDENT}-{daemon}.pid"

    @classmethod
    def attach(cls, workdir: Path | str, **kwargs) -> "LocalFlinkCluster":
        """The cluster last started in ``workdir`` (its ports from ``cluster.json``), or a
        not-yet-started one with the given arguments when there is none."""
        workdir = Path(workdir).resolve()
        state_file = workdir / "cluster.json"
        if not state_file.exists():
            return cls(workdir, **kwargs)
        state = json.loads(state_file.read_text())
        kwargs.update(rest_port=state["rest_port"], slots=state["slots"],
                      taskmanagers=state.get("taskmanagers", 1), python=state["python"])
        cluster = cls(workdir, **kwargs)
        cluster.rpc_port = state.get("rpc_port")
        return cluster

    # -- configuration and scripts ------------------------------------------------------------

    def configuration(self) -> dict:
        """The flat configuration ``start()`` writes to ``conf/config.yaml``."""
        return cluster_configuration(self.workdir, rest_port=self.rest_port,
                                     rpc_port=self.rpc_port, slots=self.slots,
                                     python=self.python, conf_file=self.conf_file,
                                     extra=self.extra_conf)

    def written_configuration(self) -> dict:
        """The configuration the cluster runs with (the one to be written before a start)."""
        written = self.conf_dir / "config.yaml"
        return read_flat(written) if written.exists() else self.configuration()

    def prometheus_ports(self) -> list[int]:
        """The ports the cluster's processes may serve ``/metrics`` on ([] without the
        Prometheus reporter)."""
        spec = self.written_configuration().get(PROMETHEUS_PORT_KEY)
        return port_range(spec) if spec is not None else []

    def environment(self, extra: dict | None = None) -> dict[str, str]:
        """The environment of the distribution's scripts (and of ``flink run``)."""
        env = processes.child_environ(without=FOREIGN_FLINK_VARIABLES)
        # A cluster not started from this workdir (only its REST port is known) is reached
        # with the distribution's own configuration.
        conf_dir = self.conf_dir if (self.conf_dir / "config.yaml").exists() \
            else flink_home() / "conf"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        env.update({
            "FLINK_HOME": str(flink_home()),
            "FLINK_CONF_DIR": str(conf_dir),
            "FLINK_LOG_DIR": str(self.log_dir),
            "FLINK_PID_DIR": str(self.pid_dir),
            "FLINK_IDENT_STRING": IDENT,
        })
        # The Python processes import the job packages from the zip shipped with the job:
        # a PYTHONPATH inherited from the caller (pytest's rootdir, say) must not put other
        # copies first.
        env.pop("PYTHONPATH", None)
        env.update({k: str(v) for k, v in (extra or {}).items()})
        return env

    def run_script(self, name: str, *args: str, timeout: float = 120,
                   env: dict | None = None) -> subprocess.CompletedProcess:
        """One of the distribution's ``bin/`` scripts with this cluster's environment."""
        cmd = ["bash", str(flink_home() / "bin" / name), *args]
        try:
            # a session of its own: the daemons the script forks outlive us and are not hit
            # by signals meant for the caller's process group (Ctrl-C in a terminal)
            return subprocess.run(cmd, env=self.environment(env), cwd=self.workdir,
                                  stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, timeout=timeout,
                                  start_new_session=True)
        except subprocess.TimeoutExpired as exc:
            raise FlinkClusterError(f"{name} {' '.join(args)} did not finish in {timeout:.0f} s:\n"
                                    f"{exc.output or ''}") from None

    # -- processes ----------------------------------------------------------------------------

    def _jvms(self, main_class: str) -> list[int]:
        conf = str(self.conf_dir)

        def ours(process) -> bool:
            args = processes.cmdline(process)
            return main_class in args and any(a == "--configDir" and b == conf
                                              for a, b in zip(args, args[1:]))
        return sorted(processes.find(ours))

    def jobmanager_pids(self) -> list[int]:
        return self._jvms(JM_CLASS)

    def taskmanager_pids(self) -> list[int]:
        """The TaskManager JVMs of this cluster (a set; pid order says nothing of age)."""
        return self._jvms(TM_CLASS)

    def _other_pids(self) -> list[int]:
        """Any other process of this cluster (Python workers, a hanging ``flink run``)."""
        conf, me = str(self.conf_dir), os.getpid()
        return processes.find(lambda p: p.pid != me and processes.environ_has(p, "FLINK_CONF_DIR", conf))

    def orphans(self) -> dict[int, str]:
        """The processes left behind by TaskManagers that died without ending them (Python
        workers, their runner shell and ``tee``, pypmml JVMs): pid -> the dead TaskManager's
        resource id. A process of a TaskManager carries ``TM_MARK`` and ``FLINK_CONF_DIR`` =
        this cluster's conf; it is orphaned when no live JobManager or TaskManager JVM of the
        cluster is among its ancestors (its own TaskManager is gone, it was reparented to
        init or a subreaper). Daemons being started (under a start script) never are."""
        conf, me = str(self.conf_dir), os.getpid()
        jvms = set(self.jobmanager_pids()) | set(self.taskmanager_pids())
        found: dict[int, str] = {}

        def orphaned(process) -> bool:
            if process.pid in jvms or process.pid == me:
                return False
            mark = processes.environ_get(process, TM_MARK)
            if not mark or processes.environ_get(process, "FLINK_CONF_DIR") != conf:
                return False
            if "org.apache.flink" in " ".join(processes.cmdline(process)):
                return False  # a JVM of the distribution (BashJavaUtils, the CLI)
            for ancestor in [process, *processes.ancestors(process)]:
                if ancestor.pid in jvms or ancestor.pid == me:
                    return False
                if any(a.endswith(START_SCRIPTS) for a in processes.cmdline(ancestor)[:3]):
                    return False
            found[process.pid] = mark
            return True

        processes.find(orphaned)
        return found

    def reap_orphans(self, grace_s: float = 5.0) -> dict[int, str]:
        """End the ``orphans()`` of dead TaskManagers (SIGTERM, SIGKILL after ``grace_s``)
        and drop the dead TaskManagers from the pid file; returns what was ended."""
        self._forget_dead_pids("taskexecutor")
        found = self.orphans()
        if found:
            processes.terminate(found, grace_s=grace_s)
        return found

    def _forget_dead_pids(self, daemon: str) -> None:
        """Drop dead daemons from flink-daemon.sh's pid file, so ``stop-cluster.sh`` stops
        the live ones and ``taskmanager.sh start`` does not count the dead."""
        pid_file = self.pid_file(daemon)
        try:
            lines = [line.strip() for line in pid_file.read_text().splitlines() if line.strip()]
        except OSError:
            return
        live = set(self._jvms(TM_CLASS if daemon == "taskexecutor" else JM_CLASS))
        kept = [line for line in lines if line.isdigit() and int(line) in live]
        if kept == lines:
            return
        if kept:
            pid_file.write_text("\n".join(kept) + "\n")
        else:
            pid_file.unlink(missing_ok=True)

    def is_running(self) -> bool:
        return bool(self.jobmanager_pids()) and flink_rest.answers(self.url)

    # -- start / stop -------------------------------------------------------------------------

    def start(self, timeout: float = 120) -> "LocalFlinkCluster":
        """Start the JobManager and TaskManager(s); return once ``taskmanagers`` TaskManagers
        have registered with the JobManager."""
        if self.jobmanager_pids():
            running = LocalFlinkCluster.attach(self.workdir)
            raise FlinkClusterError(f"a Flink cluster is already running from {self.workdir} "
                                    f"(web UI {running.url}); stop it first")
        if not processes.port_is_free(self.rest_port):
            raise FlinkClusterError(f"port {HOST}:{self.rest_port} is in use: another Flink "
                                    "(or something else) listens there; choose another --rest-port")
        started = time.monotonic()
        self.rpc_port = processes.free_port()
        for stale in self.pid_dir.glob("*.pid"):
            stale.unlink()
        write_conf_dir(self.conf_dir, self.configuration(), rest_port=self.rest_port,
                       taskmanagers=self.taskmanagers, source=self.conf_file)
        for d in (self.log_dir, self.pid_dir, self.workdir / "tmp", self.checkpoint_dir,
                  self.savepoint_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.state_file.write_text(json.dumps({
            "rest_port": self.rest_port, "rpc_port": self.rpc_port, "slots": self.slots,
            "taskmanagers": self.taskmanagers, "python": self.python,
            "flink_home": str(flink_home()), "started": time.time()}, indent=2) + "\n")
        done = self.run_script("start-cluster.sh", timeout=timeout, env={TM_MARK: "initial"})
        if done.returncode != 0:
            self._end_processes()
            raise FlinkClusterError(f"start-cluster.sh failed ({done.returncode}):\n{done.stdout}"
                                    f"\n{self.log_tail()}")
        try:
            self.wait_taskmanagers(self.taskmanagers,
                                   max(5.0, timeout - (time.monotonic() - started)))
        except (FlinkClusterError, DeadlineExceeded) as exc:
            self._end_processes()
            raise FlinkClusterError(f"the Flink cluster in {self.workdir} did not start: {exc}") from None
        return self

    def wait_taskmanagers(self, count: int, timeout: float = 60,
                          resource_id: str | None = None) -> list[dict]:
        """Wait until at least ``count`` TaskManagers (or the one named ``resource_id``) are
        registered; returns the registered TaskManagers."""
        def registered() -> list[dict] | None:
            if not self.jobmanager_pids():
                raise FlinkClusterError(f"the JobManager is not running:\n{self.log_tail()}")
            tms = flink_rest.taskmanagers(self.url)
            if resource_id is not None:
                return tms if any(tm.get("id") == resource_id for tm in tms) else None
            return tms if len(tms) >= count else None

        what = f"TaskManager {resource_id}" if resource_id else f"{count} TaskManager(s)"
        return wait_until(registered, timeout, f"{what} registered at {self.url}",
                          interval_s=flink_rest.POLL_S, details=self.log_tail)

    def start_taskmanager(self, timeout: float = 60) -> str:
        """One more TaskManager (``bin/taskmanager.sh start``), ending what dead ones left
        behind (``reap_orphans()``) while its JVM boots; returns its resource id once it has
        registered with the JobManager."""
        self._forget_dead_pids("taskexecutor")
        resource_id = f"tm-{uuid.uuid4().hex[:8]}"
        done = self.run_script("taskmanager.sh", "start", "-D",
                               f"taskmanager.resource-id={resource_id}", timeout=timeout,
                               env={TM_MARK: resource_id})
        if done.returncode != 0:
            raise FlinkClusterError(f"taskmanager.sh start failed ({done.returncode}):\n"
                                    f"{done.stdout}")
        # the new JVM is one of the cluster's, so its own processes are never orphans
        self.reap_orphans(grace_s=2.0)
        self.wait_taskmanagers(1, timeout, resource_id=resource_id)
        return resource_id

    def stop(self, timeout: float = 60) -> None:
        """stop-cluster.sh, then SIGTERM/SIGKILL whatever of this cluster is left (orphans
        of dead TaskManagers included)."""
        if self.conf_dir.exists() and (self.jobmanager_pids() or self.taskmanager_pids()):
            self._forget_dead_pids("taskexecutor")
            self.run_script("stop-cluster.sh", timeout=timeout)
        self._end_processes()
        for pid_file in self.pid_dir.glob("*.pid"):
            pid_file.unlink()

    def _end_processes(self) -> None:
        processes.terminate(self.jobmanager_pids() + self.taskmanager_pids(), grace_s=10)
        processes.terminate(self._other_pids(), grace_s=5)

    def __enter__(self) -> "LocalFlinkCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"LocalFlinkCluster({str(self.workdir)!r}, rest_port={self.rest_port})"

    # -- jobs ---------------------------------------------------------------------------------

    def submit(self, module: str, job_args: Sequence[str] = (), env: dict | None = None,
               savepoint: str | None = None, allow_non_restored: bool = False,
               timeout: float = 240) -> str:
        """``flink run -d -pym <module>``: the module's ``main()`` runs in a client Python
        process with ``job_args`` and submits the job; returns its id.

        ``--pyFiles`` ships the zip of the job packages (``job_files()``); ``env`` adds
        variables (MODELSERVING_* settings, say) to the client's environment. With
        ``savepoint`` the job starts from that savepoint (or retained checkpoint)."""
        cmd = ["bash", str(flink_home() / "bin" / "flink"), "run", "--detached",
               "--jobmanager", f"{HOST}:{self.rest_port}",
               "--pyExecutable", self.python, "--pyClientExecutable", self.python,
               "--pyFiles", str(self.job_files())]
        if savepoint:
            cmd += ["--fromSavepoint", str(savepoint)]
            if allow_non_restored:
                cmd.append("--allowNonRestoredState")
        # "--" ends Flink's own options, so job settings such as --parallelism reach the job
        # (without it, `flink run` takes an option it knows as its own).
        cmd += ["--pyModule", module, "--", *map(str, job_args)]
        client_env = {**self._connector_env(job_args, env), **(env or {})}
        try:
            done = subprocess.run(cmd, env=self.environment(client_env), cwd=self.project_root,
                                  stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, timeout=timeout,
                                  start_new_session=True)
        except subprocess.TimeoutExpired as exc:
            raise FlinkClusterError(f"flink run {module} did not finish in {timeout:.0f} s:\n"
                                    f"{exc.output or ''}") from None
        match = JOB_ID.search(done.stdout)
        if done.returncode != 0 or not match:
            raise FlinkClusterError(f"flink run {module} failed ({done.returncode}):\n"
                                    + "\n".join(done.stdout.splitlines()[-80:]))
        return match.group(1)

    def job_files(self) -> Path:
        """The zip of the job packages for ``--pyFiles`` (never the tooling)."""
        return build_zip(self.workdir / "pyfiles", self.python_packages, self.project_root)

    @staticmethod
    def _connector_env(job_args: Sequence[str], env: dict | None) -> dict[str, str]:
        """The jobs add the Kafka connector jar only when told where it is; the shipped
        packages cannot find this checkout's jars, so the client is told unless the job's
        settings name one already."""
        given = Settings.from_sources(list(map(str, job_args)), environ={**os.environ, **(env or {})})
        if given.connector_jar:
            return {}
        from modelserving.local.jars import connector_jar
        return {"MODELSERVING_CONNECTOR_JAR": str(connector_jar())}

    def rest(self, path: str, method: str = "GET", body: dict | None = None,
             timeout: float = 10) -> dict:
        """JSON from the REST API; ``FlinkClusterError`` on any failure."""
        return flink_rest.call(self.url, path, method, body, timeout)

    def list_jobs(self) -> list[dict]:
        return flink_rest.list_jobs(self.url)

    def job(self, job_id: str) -> dict:
        return flink_rest.job(self.url, job_id)

    def job_state(self, job_id: str) -> str:
        return self.job(job_id)["state"]

    def job_exception(self, job_id: str) -> str:
        return flink_rest.job_exception(self.url, job_id)

    def wait_running(self, job_id: str, timeout: float = 120) -> dict:
        return flink_rest.wait_job_running(self.url, job_id, timeout)

    def wait_restarted(self, job_id: str, since: float, timeout: float = 180) -> dict:
        return flink_rest.wait_restarted(self.url, job_id, since, timeout)

    def wait_state(self, job_id: str, states: Iterable[str], timeout: float = 60) -> str:
        return flink_rest.wait_state(self.url, job_id, states, timeout)

    def stop_with_savepoint(self, job_id: str, directory: str | Path | None = None,
                            timeout: float = 120) -> str:
        return flink_rest.stop_with_savepoint(self.url, job_id,
                                              Path(directory or self.savepoint_dir), timeout)

    def savepoint(self, job_id: str, directory: str | Path | None = None,
                  timeout: float = 120) -> str:
        return flink_rest.savepoint(self.url, job_id, Path(directory or self.savepoint_dir),
                                    timeout)

    def cancel(self, job_id: str, timeout: float = 60) -> str:
        return flink_rest.cancel(self.url, job_id, timeout)

    def checkpoints(self, job_id: str) -> dict:
        return flink_rest.checkpoints(self.url, job_id)

    def latest_checkpoint(self, job_id: str) -> dict | None:
        return flink_rest.latest_checkpoint(self.url, job_id)

    def wait_checkpoint(self, job_id: str, after: int = 0, timeout: float = 60) -> dict:
        return flink_rest.wait_checkpoint(self.url, job_id, after, timeout)

    # -- logs ---------------------------------------------------------------------------------

    def log_files(self) -> list[Path]:
        return sorted(self.log_dir.glob("*.log"), key=lambda p: p.stat().st_mtime)

    def log_tail(self, lines: int = 40) -> str:
        parts = []
        for path in sorted(self.log_dir.glob("*")):
            if path.suffix in (".log", ".out"):
                tail = processes.log_tail(path, lines)
                if tail.strip():
                    parts.append(f"--- {path.name}\n{tail}")
        return "\n".join(parts)
