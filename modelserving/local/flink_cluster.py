"""A local standalone Flink cluster run from the Flink distribution inside the installed
``pyflink`` package, and control of the jobs on it.

Everything of one cluster lives in its ``workdir``::

    conf/          config.yaml (the project's flink-conf/config.yaml + per-instance values),
                   the distribution's log4j/logback files, masters, workers
    log/           JobManager and TaskManager logs (.log, .out)
    pid/           the pid files of flink-daemon.sh (never the shared /tmp default)
    tmp/           io.tmp.dirs (blobs, Python worker files, RocksDB files)
    checkpoints/   execution.checkpointing.dir
    savepoints/    execution.checkpointing.savepoint-dir
    cluster.json   the ports of the running instance, for a later ``attach``

Every port (REST, JobManager RPC, TaskManager RPC/data, blob server) is per instance: the
REST port is chosen by the caller, the JobManager RPC port is a free port found at start,
the others are 0 (ephemeral), so a test cluster can run next to a demo cluster.

The scripts of the distribution (``bin/start-cluster.sh``, ``taskmanager.sh``,
``stop-cluster.sh``, ``flink``) run with ``FLINK_HOME`` = the pyflink package directory,
``FLINK_CONF_DIR`` = ``workdir/conf``, ``FLINK_LOG_DIR`` and ``FLINK_PID_DIR`` in the
workdir. The Flink processes of a cluster are recognised by ``--configDir <workdir/conf>``
on their command line (JVMs) or ``FLINK_CONF_DIR=<workdir/conf>`` in their environment
(their Python workers).

Jobs are submitted with ``flink run -pym <module>`` (the job's ``main()`` runs in a client
Python process and submits the job graph to the REST endpoint) with a zip of the project's
packages as ``--pyFiles``; everything else (listing, savepoints, cancellation, checkpoints)
goes through the REST API.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
import zipfile
from pathlib import Path
from typing import Iterable

import yaml

__all__ = ["LocalFlinkCluster", "FlinkClusterError", "FLINK_HOME", "PROJECT_ROOT", "flink_home"]

HOST = "127.0.0.1"
PROJECT_ROOT = Path(__file__).resolve().parents[1]
PROJECT_CONF = PROJECT_ROOT / "flink-conf" / "config.yaml"
JM_CLASS = "org.apache.flink.runtime.entrypoint.StandaloneSessionClusterEntrypoint"
TM_CLASS = "org.apache.flink.runtime.taskexecutor.TaskManagerRunner"
TERMINAL_STATES = {"FINISHED", "CANCELED", "FAILED", "SUSPENDED"}
IDENT = "modelserving"  # FLINK_IDENT_STRING: names the pid and log files
LOG_FILES = ("log4j.properties", "log4j-console.properties", "log4j-cli.properties",
             "log4j-session.properties", "logback.xml", "logback-console.xml",
             "logback-session.xml")
#: The project's packages shipped with a job (``--pyFiles``), as a zip.
JOB_PACKAGES = ("jobs", "udfs", "protos", "modelserving")
JOB_ID = re.compile(r"JobID\s+([0-9a-f]{32})")


class FlinkClusterError(RuntimeError):
    """The cluster could not be started or stopped, or a job operation failed."""


def flink_home() -> Path:
    """The Flink distribution inside the installed pyflink package (found without importing
    pyflink, which would start nothing but costs time)."""
    spec = importlib.util.find_spec("pyflink")
    if spec is None or not spec.origin:
        raise FlinkClusterError("the pyflink package is not installed in this environment")
    return Path(spec.origin).resolve().parent


FLINK_HOME = flink_home()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
        return True


def _flatten(tree: dict, prefix: str = "") -> dict:
    """Nested YAML maps as Flink's flat keys (``rest: {port: 1}`` -> ``rest.port: 1``)."""
    flat = {}
    for key, value in (tree or {}).items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def _read_yaml(path: Path) -> dict:
    return _flatten(yaml.safe_load(path.read_text()) or {})


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _environ_has(pid: int, entry: str) -> bool:
    try:
        return entry.encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False


def _alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def _all_pids() -> Iterable[int]:
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            yield int(entry.name)


def _wait_gone(pids: Iterable[int], timeout: float) -> list[int]:
    """Wait until none of ``pids`` is alive; returns those still alive at the timeout."""
    pids = list(pids)
    deadline = time.monotonic() + timeout
    while True:
        alive = [p for p in pids if _alive(p)]
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.1)


def _tail(path: Path, lines: int) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class LocalFlinkCluster:
    """A standalone Flink session cluster (one JobManager, ``taskmanagers`` TaskManagers with
    ``slots`` slots each) on 127.0.0.1, started from the pyflink distribution.

    >>> cluster = LocalFlinkCluster(Path("var/flink"), rest_port=8081).start()
    >>> job_id = cluster.submit("jobs.keyed_job", ["--bootstrap-servers", "127.0.0.1:9092"])
    >>> cluster.wait_running(job_id)
    >>> savepoint = cluster.stop_with_savepoint(job_id)
    >>> cluster.submit("jobs.keyed_job", [...], savepoint=savepoint)
    >>> cluster.stop()

    The processes outlive the Python process that started them (``start()`` returns leaving
    them running); ``LocalFlinkCluster.attach(workdir)`` finds a running instance again.
    """

    def __init__(self, workdir: Path | str, rest_port: int = 8081, slots: int = 2, *,
                 taskmanagers: int = 1, python: str | None = None,
                 conf_file: Path | str = PROJECT_CONF, extra_conf: dict | None = None,
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
        self.project_root = Path(project_root).resolve()
        self.python_packages = tuple(python_packages)
        self.rpc_port: int | None = None

    # ---------------------------------------------------------------------- paths

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

    @classmethod
    def attach(cls, workdir: Path | str, **kwargs) -> "LocalFlinkCluster":
        """The cluster last started in ``workdir`` (its ports from ``cluster.json``), or a
        not-yet-started one with the given arguments when there is none."""
        workdir = Path(workdir).resolve()
        state_file = workdir / "cluster.json"
        if state_file.exists():
            state = json.loads(state_file.read_text())
            kwargs.update(rest_port=state["rest_port"], slots=state["slots"],
                          taskmanagers=state.get("taskmanagers", 1), python=state["python"])
            cluster = cls(workdir, **kwargs)
            cluster.rpc_port = state.get("rpc_port")
            return cluster
        return cls(workdir, **kwargs)

    # ---------------------------------------------------------------------- configuration

    def configuration(self) -> dict:
        """The flat configuration written to ``conf/config.yaml``: the distribution's JVM
        options, then the project's file, then this instance's values (which win)."""
        conf = {}
        dist = _read_yaml(FLINK_HOME / "conf" / "config.yaml")
        # Java 17 needs the distribution's --add-opens/--add-exports for Flink's reflection.
        for key in ("env.java.opts.all", "env.java.default-opts.all"):
            if key in dist:
                conf[key] = dist[key]
        conf.update(_read_yaml(self.conf_file))
        conf.update({
            "jobmanager.rpc.address": HOST,
            "jobmanager.rpc.port": self.rpc_port,
            "jobmanager.bind-host": HOST,
            "taskmanager.host": HOST,
            "taskmanager.bind-host": HOST,
            "taskmanager.rpc.port": "0",
            "taskmanager.data.port": 0,
            "blob.server.port": "0",
            "rest.address": HOST,
            "rest.bind-address": HOST,
            "rest.port": self.rest_port,
            "taskmanager.numberOfTaskSlots": self.slots,
            "io.tmp.dirs": str(self.workdir / "tmp"),
            "env.log.dir": str(self.log_dir),
            "env.pid.dir": str(self.pid_dir),
            "execution.checkpointing.dir": self.checkpoint_dir.as_uri(),
            "execution.checkpointing.savepoint-dir": self.savepoint_dir.as_uri(),
            "python.executable": self.python,
            "python.client.executable": self.python,
        })
        conf.update(self.extra_conf)
        return conf

    def _write_conf(self) -> None:
        self.conf_dir.mkdir(parents=True, exist_ok=True)
        for name in LOG_FILES:
            src = FLINK_HOME / "conf" / name
            if src.exists():
                shutil.copyfile(src, self.conf_dir / name)
        header = (f"# Written by modelserving.local.flink_cluster on every start from {self.conf_file}\n"
                  "# plus this instance's ports and directories; edits here are overwritten.\n")
        body = yaml.safe_dump(self.configuration(), sort_keys=False, default_flow_style=False,
                              width=1 << 16)
        (self.conf_dir / "config.yaml").write_text(header + body)
        (self.conf_dir / "masters").write_text(f"{HOST}:{self.rest_port}\n")
        (self.conf_dir / "workers").write_text(f"{HOST}\n" * self.taskmanagers)
        for d in (self.log_dir, self.pid_dir, self.workdir / "tmp", self.checkpoint_dir,
                  self.savepoint_dir):
            d.mkdir(parents=True, exist_ok=True)

    def environment(self, extra: dict | None = None) -> dict[str, str]:
        """The environment of the distribution's scripts (and of ``flink run``)."""
        env = dict(os.environ)
        for key in ("FLINK_ENV_JAVA_OPTS", "FLINK_ENV_JAVA_OPTS_JM", "FLINK_ENV_JAVA_OPTS_TM",
                    "FLINK_ENV_JAVA_OPTS_CLI", "FLINK_LIB_DIR", "FLINK_PLUGINS_DIR", "FLINK_OPT_DIR",
                    "FLINK_BIN_DIR", "_FLINK_HOME_DETERMINED"):
            env.pop(key, None)  # inherited values would point at another installation
        # A cluster not started from this workdir (only its REST port is known) is reached
        # with the distribution's own configuration.
        conf_dir = self.conf_dir if (self.conf_dir / "config.yaml").exists() else FLINK_HOME / "conf"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        env.update({
            "FLINK_HOME": str(FLINK_HOME),
            "FLINK_CONF_DIR": str(conf_dir),
            "FLINK_LOG_DIR": str(self.log_dir),
            "FLINK_PID_DIR": str(self.pid_dir),
            "FLINK_IDENT_STRING": IDENT,
        })
        # The Python processes import the project from the zip shipped with the job (the
        # venv's editable install is only a fallback): a PYTHONPATH inherited from the
        # caller (pytest's rootdir, say) must not put other copies first.
        env.pop("PYTHONPATH", None)
        env.update({k: str(v) for k, v in (extra or {}).items()})
        return env

    def _script(self, name: str, *args: str, timeout: float = 120,
                env: dict | None = None) -> subprocess.CompletedProcess:
        cmd = ["bash", str(FLINK_HOME / "bin" / name), *args]
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

    # ---------------------------------------------------------------------- processes

    def _processes(self, main_class: str) -> list[int]:
        conf = str(self.conf_dir)
        pids = []
        for pid in _all_pids():
            args = _cmdline(pid)
            if main_class in args and any(a == "--configDir" and b == conf
                                          for a, b in zip(args, args[1:])):
                if _alive(pid):
                    pids.append(pid)
        return sorted(pids)

    def jobmanager_pids(self) -> list[int]:
        return self._processes(JM_CLASS)

    def taskmanager_pids(self) -> list[int]:
        """The TaskManager JVMs of this cluster (oldest first by pid order is not
        guaranteed; use the list as a set)."""
        return self._processes(TM_CLASS)

    def _stray_processes(self) -> list[int]:
        """Any other process of this cluster (Python workers, a hanging ``flink run``):
        they carry this cluster's FLINK_CONF_DIR in their environment."""
        entry = f"FLINK_CONF_DIR={self.conf_dir}"
        me = os.getpid()
        return [p for p in _all_pids() if p != me and _environ_has(p, entry) and _alive(p)]

    def is_running(self) -> bool:
        return bool(self.jobmanager_pids()) and self._try_rest("/overview") is not None

    # ---------------------------------------------------------------------- start / stop

    def start(self, timeout: float = 120) -> "LocalFlinkCluster":
        """Start the JobManager and TaskManager(s); return once ``taskmanagers`` TaskManagers
        have registered with the JobManager (REST ``/taskmanagers``)."""
        if self.jobmanager_pids():
            running = LocalFlinkCluster.attach(self.workdir)
            raise FlinkClusterError(f"a Flink cluster is already running from {self.workdir} "
                                    f"(web UI {running.url}); stop it first")
        if not _port_is_free(self.rest_port):
            raise FlinkClusterError(f"port {HOST}:{self.rest_port} is in use: another Flink "
                                    "(or something else) listens there; choose another --rest-port")
        started = time.monotonic()
        self.rpc_port = _free_port()
        for stale in self.pid_dir.glob("*.pid"):
            stale.unlink()
        self._write_conf()
        self.state_file.write_text(json.dumps({
            "rest_port": self.rest_port, "rpc_port": self.rpc_port, "slots": self.slots,
            "taskmanagers": self.taskmanagers, "python": self.python,
            "flink_home": str(FLINK_HOME), "started": time.time()}, indent=2) + "\n")
        done = self._script("start-cluster.sh", timeout=timeout)
        if done.returncode != 0:
            self._cleanup_processes()
            raise FlinkClusterError(f"start-cluster.sh failed ({done.returncode}):\n{done.stdout}"
                                    f"\n{self.log_tail()}")
        try:
            self.wait_taskmanagers(self.taskmanagers, max(5.0, timeout - (time.monotonic() - started)))
        except FlinkClusterError:
            self._cleanup_processes()
            raise
        return self

    def wait_taskmanagers(self, count: int, timeout: float = 60,
                          resource_id: str | None = None) -> list[dict]:
        """Wait until at least ``count`` TaskManagers (or the one named ``resource_id``) are
        registered; returns the registered TaskManagers."""
        deadline = time.monotonic() + timeout
        while True:
            if not self.jobmanager_pids():
                raise FlinkClusterError(f"the JobManager is not running:\n{self.log_tail()}")
            tms = (self._try_rest("/taskmanagers") or {}).get("taskmanagers", [])
            if resource_id is not None:
                if any(tm["id"] == resource_id for tm in tms):
                    return tms
            elif len(tms) >= count:
                return tms
            if time.monotonic() >= deadline:
                what = resource_id or f"{count} TaskManager(s)"
                raise FlinkClusterError(f"{what} not registered after {timeout:.0f} s "
                                        f"({len(tms)} registered):\n{self.log_tail()}")
            time.sleep(0.25)

    def stop(self, timeout: float = 60) -> None:
        """stop-cluster.sh, then SIGTERM/SIGKILL whatever of this cluster is left."""
        if self.conf_dir.exists() and (self.jobmanager_pids() or self.taskmanager_pids()):
            self._script("stop-cluster.sh", timeout=timeout)
        self._cleanup_processes()
        for pid_file in self.pid_dir.glob("*.pid"):
            pid_file.unlink()

    def _cleanup_processes(self, grace: float = 10) -> None:
        pids = self.jobmanager_pids() + self.taskmanager_pids()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        for pid in _wait_gone(pids, grace):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        _wait_gone(pids, 5)
        strays = self._stray_processes()
        for pid in strays:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        for pid in _wait_gone(strays, 5):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def __enter__(self) -> "LocalFlinkCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"LocalFlinkCluster({str(self.workdir)!r}, rest_port={self.rest_port})"

    # ---------------------------------------------------------------------- failure injection

    def kill_taskmanager(self, pid: int | None = None) -> int:
        """SIGKILL one TaskManager JVM (the given one, else the newest) and wait until it is
        gone. Nobody restarts it: ``start_taskmanager()`` brings a new one."""
        pids = self.taskmanager_pids()
        if not pids:
            raise FlinkClusterError("no TaskManager of this cluster is running")
        if pid is None:
            pid = max(pids, key=lambda p: os.stat(f"/proc/{p}").st_mtime)
        elif pid not in pids:
            raise FlinkClusterError(f"pid {pid} is not a TaskManager of this cluster")
        os.kill(pid, signal.SIGKILL)
        if _wait_gone([pid], 10):
            raise FlinkClusterError(f"TaskManager {pid} survived SIGKILL")
        self._forget_pid("taskexecutor", pid)
        return pid

    def start_taskmanager(self, timeout: float = 60) -> str:
        """``bin/taskmanager.sh start`` with this cluster's environment; returns the new
        TaskManager's resource id once it has registered with the JobManager."""
        resource_id = f"tm-{uuid.uuid4().hex[:8]}"
        done = self._script("taskmanager.sh", "start", "-D", f"taskmanager.resource-id={resource_id}",
                            timeout=timeout)
        if done.returncode != 0:
            raise FlinkClusterError(f"taskmanager.sh start failed ({done.returncode}):\n{done.stdout}")
        self.wait_taskmanagers(1, timeout, resource_id=resource_id)
        return resource_id

    def _forget_pid(self, daemon: str, pid: int) -> None:
        """Drop a killed daemon from its pid file, so stop-cluster.sh stops the live ones."""
        pid_file = self.pid_dir / f"flink-{IDENT}-{daemon}.pid"
        with contextlib.suppress(OSError):
            kept = [line for line in pid_file.read_text().splitlines()
                    if line.strip() and line.strip() != str(pid)]
            if kept:
                pid_file.write_text("\n".join(kept) + "\n")
            else:
                pid_file.unlink()

    # ---------------------------------------------------------------------- REST

    def rest(self, path: str, method: str = "GET", body: dict | None = None,
             timeout: float = 10):
        """JSON from the REST API (proxies ignored); FlinkClusterError on any failure."""
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.url + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(request, timeout=timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")
            raise FlinkClusterError(f"{method} {path}: HTTP {exc.code}: {detail}") from None
        except (OSError, ValueError) as exc:
            raise FlinkClusterError(f"{method} {path}: {exc}") from None
        return json.loads(raw) if raw.strip() else {}

    def _try_rest(self, path: str, timeout: float = 3):
        try:
            return self.rest(path, timeout=timeout)
        except FlinkClusterError:
            return None

    # ---------------------------------------------------------------------- jobs

    def submit(self, module: str, job_args: list[str] | tuple[str, ...] = (),
               env: dict | None = None, savepoint: str | None = None,
               allow_non_restored: bool = False, timeout: float = 240) -> str:
        """``flink run -d -pym <module>``: the module's ``main()`` runs in a client Python
        process with ``job_args`` as its arguments and submits the job; returns its id.

        ``--pyFiles`` ships a zip of the project's packages (``job_files()``), which the
        client and the TaskManagers' Python workers put first on their PYTHONPATH;
        ``--pyExecutable``/``--pyClientExecutable`` are this cluster's Python. ``env`` adds
        variables (MODELSERVING_* settings, say) to the client's environment. With
        ``savepoint`` the job starts from that savepoint (or retained checkpoint)."""
        flink = FLINK_HOME / "bin" / "flink"
        cmd = ["bash", str(flink), "run", "--detached", "--jobmanager", f"{HOST}:{self.rest_port}",
               "--pyExecutable", self.python, "--pyClientExecutable", self.python,
               "--pyFiles", str(self.job_files())]
        if savepoint:
            cmd += ["--fromSavepoint", str(savepoint)]
            if allow_non_restored:
                cmd.append("--allowNonRestoredState")
        # "--" ends Flink's own options, so job settings such as --parallelism reach the job
        # (without it, `flink run` takes an option it knows as its own). The job leaves
        # rest.port alone unless told (--rest-port), so --jobmanager decides where it goes.
        cmd += ["--pyModule", module, "--", *map(str, job_args)]
        try:
            done = subprocess.run(cmd, env=self.environment({**self._job_env(), **(env or {})}),
                                  cwd=self.project_root,
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
        """A zip of the project's Python packages for ``--pyFiles``.

        Never the project directory itself: ``flink run`` ships a directory as it is, and
        the project root holds the virtual environment (gigabytes), which the client then
        zips, the blob server stores and every TaskManager unpacks (minutes per submission,
        gigabytes in io.tmp.dirs). The zip is named by its content, so unchanged code is
        built once."""
        entries = []
        for package in self.python_packages:
            base = self.project_root / package
            if not (base / "__init__.py").exists():
                continue
            for path in sorted(base.rglob("*")):
                if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
                    entries.append(path)
        # .proto before generated code: the protos package regenerates its code when the
        # .proto file looks newer, and unpacked files get fresh times in unpacking order
        entries.sort(key=lambda p: (p.suffix != ".proto", str(p)))
        digest = hashlib.sha256()
        for path in entries:
            digest.update(str(path.relative_to(self.project_root)).encode() + b"\0")
            digest.update(path.read_bytes())
        target = self.workdir / "pyfiles" / f"job-files-{digest.hexdigest()[:16]}.zip"
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            for old in target.parent.glob("job-files-*.zip"):
                old.unlink()
            partial = target.with_suffix(".part")
            with zipfile.ZipFile(partial, "w", zipfile.ZIP_DEFLATED) as archive:
                for path in entries:
                    info = zipfile.ZipInfo(str(path.relative_to(self.project_root)),
                                           date_time=(2020, 1, 1, 0, 0, 0))
                    info.compress_type = zipfile.ZIP_DEFLATED
                    info.external_attr = 0o644 << 16
                    archive.writestr(info, path.read_bytes())
            os.replace(partial, target)
        return target

    def _job_env(self) -> dict[str, str]:
        """Environment of the ``flink run`` client: the job finds the connector jar of
        this checkout (the shipped copy of the packages cannot locate build/jars)."""
        env = {}
        if not os.environ.get("MODELSERVING_CONNECTOR_JAR"):
            from modelserving.local.jars import connector_jar
            env["MODELSERVING_CONNECTOR_JAR"] = str(connector_jar())
        return env

    def list_jobs(self) -> list[dict]:
        """Jobs of the cluster, newest first: ``jid``, ``name``, ``state``, ``start-time``,
        ``tasks``..."""
        jobs = self.rest("/jobs/overview").get("jobs", [])
        return sorted(jobs, key=lambda j: j.get("start-time", 0), reverse=True)

    def job(self, job_id: str) -> dict:
        return self.rest(f"/jobs/{job_id}")

    def job_state(self, job_id: str) -> str:
        return self.job(job_id)["state"]

    def job_exception(self, job_id: str) -> str:
        """The root exception of the job's last failure ('' if none)."""
        data = self._try_rest(f"/jobs/{job_id}/exceptions") or {}
        history = (data.get("exceptionHistory") or {}).get("entries") or []
        if history:
            return history[0].get("stacktrace") or history[0].get("exceptionName", "")
        return data.get("root-exception") or ""

    def wait_running(self, job_id: str, timeout: float = 120) -> dict:
        """Wait until the job is RUNNING with every subtask RUNNING; returns the job."""
        deadline = time.monotonic() + timeout
        job: dict = {}
        while True:
            job = self._try_rest(f"/jobs/{job_id}") or {}
            state = job.get("state")
            if state in TERMINAL_STATES:
                raise FlinkClusterError(f"job {job_id} is {state}:\n{self.job_exception(job_id)[:4000]}")
            vertices = job.get("vertices") or []
            if state == "RUNNING" and vertices and all(
                    v.get("tasks", {}).get("RUNNING", 0) == v.get("parallelism") for v in vertices):
                return job
            if time.monotonic() >= deadline:
                raise FlinkClusterError(f"job {job_id} not running after {timeout:.0f} s "
                                        f"(state {state}):\n{self.job_exception(job_id)[:4000]}")
            time.sleep(0.25)

    def wait_restarted(self, job_id: str, since: float, timeout: float = 180) -> dict:
        """Wait until the job has restarted (entered RESTARTING) after ``since`` (a
        ``time.time()`` value) and is running again with every subtask; returns the job.

        Right after a TaskManager dies the job still reads RUNNING until the JobManager
        notices (heartbeats), so RUNNING alone says nothing about a recovery."""
        deadline = time.monotonic() + timeout
        while True:
            job = self._try_rest(f"/jobs/{job_id}") or {}
            if job.get("state") in TERMINAL_STATES:
                raise FlinkClusterError(f"job {job_id} is {job['state']}:\n"
                                        f"{self.job_exception(job_id)[:4000]}")
            if (job.get("timestamps") or {}).get("RESTARTING", 0) >= since * 1000:
                return self.wait_running(job_id, max(1.0, deadline - time.monotonic()))
            if time.monotonic() >= deadline:
                raise FlinkClusterError(f"job {job_id} did not restart within {timeout:.0f} s "
                                        f"(state {job.get('state')})")
            time.sleep(0.25)

    def wait_state(self, job_id: str, states: Iterable[str], timeout: float = 60) -> str:
        states = set(states)
        deadline = time.monotonic() + timeout
        while True:
            state = (self._try_rest(f"/jobs/{job_id}") or {}).get("state")
            if state in states:
                return state
            if time.monotonic() >= deadline:
                raise FlinkClusterError(f"job {job_id} is {state}, not {'/'.join(sorted(states))}, "
                                        f"after {timeout:.0f} s")
            time.sleep(0.25)

    def stop_with_savepoint(self, job_id: str, directory: str | Path | None = None,
                            timeout: float = 120) -> str:
        """Stop the job with a savepoint (REST ``/jobs/:id/stop``) and return its path."""
        target = Path(directory).resolve().as_uri() if directory else self.savepoint_dir.as_uri()
        trigger = self.rest(f"/jobs/{job_id}/stop", "POST",
                            {"targetDirectory": target, "drain": False})["request-id"]
        location = self._await_savepoint(job_id, trigger, timeout)
        self.wait_state(job_id, TERMINAL_STATES, timeout)
        return location

    def savepoint(self, job_id: str, directory: str | Path | None = None,
                  timeout: float = 120) -> str:
        """A savepoint of a job that keeps running; returns its path."""
        target = Path(directory).resolve().as_uri() if directory else self.savepoint_dir.as_uri()
        trigger = self.rest(f"/jobs/{job_id}/savepoints", "POST",
                            {"target-directory": target, "cancel-job": False})["request-id"]
        return self._await_savepoint(job_id, trigger, timeout)

    def _await_savepoint(self, job_id: str, trigger: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            status = self.rest(f"/jobs/{job_id}/savepoints/{trigger}")
            if status.get("status", {}).get("id") == "COMPLETED":
                operation = status.get("operation") or {}
                if operation.get("location"):
                    return operation["location"]
                cause = operation.get("failure-cause") or {}
                raise FlinkClusterError(f"savepoint of job {job_id} failed: "
                                        f"{cause.get('stack-trace') or cause}"[:4000])
            if time.monotonic() >= deadline:
                raise FlinkClusterError(f"savepoint of job {job_id} not done after {timeout:.0f} s")
            time.sleep(0.25)

    def cancel(self, job_id: str, timeout: float = 60) -> str:
        """Cancel the job and wait for a terminal state (normally CANCELED)."""
        state = self.job_state(job_id)
        if state not in TERMINAL_STATES:
            self.rest(f"/jobs/{job_id}?mode=cancel", "PATCH")
        return self.wait_state(job_id, TERMINAL_STATES, timeout)

    def checkpoints(self, job_id: str) -> dict:
        return self.rest(f"/jobs/{job_id}/checkpoints")

    def latest_checkpoint(self, job_id: str) -> str | None:
        """Path of the job's latest completed checkpoint (None before the first)."""
        latest = (self.checkpoints(job_id).get("latest") or {}).get("completed")
        return latest.get("external_path") if latest else None

    def wait_checkpoint(self, job_id: str, after: int = 0, timeout: float = 60) -> dict:
        """Wait for a completed checkpoint with an id greater than ``after``; returns it."""
        deadline = time.monotonic() + timeout
        while True:
            data = self._try_rest(f"/jobs/{job_id}/checkpoints") or {}
            latest = (data.get("latest") or {}).get("completed")
            if latest and latest.get("id", 0) > after:
                return latest
            if time.monotonic() >= deadline:
                raise FlinkClusterError(f"no checkpoint of job {job_id} after #{after} "
                                        f"in {timeout:.0f} s")
            time.sleep(0.25)

    # ---------------------------------------------------------------------- logs

    def log_files(self) -> list[Path]:
        return sorted(self.log_dir.glob("*.log"), key=lambda p: p.stat().st_mtime)

    def log_tail(self, lines: int = 40) -> str:
        parts = []
        for path in sorted(self.log_dir.glob("*")):
            if path.suffix in (".log", ".out"):
                tail = _tail(path, lines)
                if tail.strip():
                    parts.append(f"--- {path.name}\n{tail}")
        return "\n".join(parts)
