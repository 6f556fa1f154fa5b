"""A job in its own process, started the way a user starts it, on its own local Flink.

Used by the demo, the end-to-end tests and the benchmark: ``python -m <module>`` with the
settings as MODELSERVING_* variables, ready once Flink's REST API reports every task
running (``flink_rest.wait_job_running``, the one definition of running).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from jobs.settings import Settings
from modelserving.errors import FlinkClusterError
from modelserving.local import flink_rest, http, processes
from modelserving.paths import PROJECT_ROOT

__all__ = ["JobProcess"]


class JobProcess:
    """``python -m jobs.<job>`` with MODELSERVING_* variables on its own local Flink, whose
    REST API (on a free port unless the settings name one) tells when it is running. The
    Flink log, where the Python workers' log lines go, is kept beside ``log_path``."""

    def __init__(self, module: str, settings: Settings, log_path: Path):
        self.module = module
        self.log_path = Path(log_path)
        self.settings = settings.replace(
            rest_port=settings.rest_port or processes.free_port(),
            connector_jar=settings.connector_jar or self._fetched_connector_jar(),
            checkpoint_dir=settings.checkpoint_dir or str(self.log_path.parent / "checkpoints"))
        self.flink_log_dir = self.log_path.parent / "flink-log"
        self.process: subprocess.Popen | None = None
        self.job_id: str | None = None
        self._log = None

    @staticmethod
    def _fetched_connector_jar() -> str:
        """The job adds the Kafka connector only when told where it is: always tell it."""
        from modelserving.local.jars import connector_jar
        return str(connector_jar())

    @property
    def url(self) -> str:
        return f"http://{processes.HOST}:{self.settings.rest_port}"

    def start(self, timeout_s: float = 240) -> "JobProcess":
        """Start the job and return once every task runs; ``FlinkClusterError`` if the
        process exits first, ``DeadlineExceeded`` after ``timeout_s`` (either way the
        process is stopped)."""
        env = {**processes.child_environ(), **self.settings.to_environ(),
               "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT),
                                                           os.environ.get("PYTHONPATH")])),
               "FLINK_LOG_DIR": str(self.flink_log_dir)}
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "w")
        self.process = subprocess.Popen([sys.executable, "-m", self.module], cwd=PROJECT_ROOT,
                                        stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                        start_new_session=True)
        try:
            job = flink_rest.wait_job_running(self.url, timeout_s=timeout_s,
                                              alive=self._check_alive, details=self.log_tail)
        except BaseException:
            self.stop()  # a start that fails leaves no job (and no local Flink) behind
            raise
        self.job_id = job["jid"]
        return self

    def _check_alive(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            raise FlinkClusterError(f"{self.module} exited with code {self.process.returncode} "
                                    f"(log: {self.log_path}):\n{self.log_tail()}")

    def rest(self, path: str):
        """JSON of the local Flink's REST API at ``path``, None while it does not answer."""
        return http.try_json(self.url + path)

    def flink_log(self) -> str:
        """The local Flink's log, where the Python workers' log lines go."""
        return "".join(p.read_text(errors="replace")
                       for p in sorted(self.flink_log_dir.glob("*.log")))

    def log_tail(self, lines: int = 60) -> str:
        return processes.log_tail(self.log_path, lines)

    def stop(self) -> None:
        """End the job process and everything it started (its session)."""
        if self.process is not None and self.process.poll() is None:
            processes.terminate_group(self.process.pid, grace_s=30)
            self.process.wait(10)
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> "JobProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
