"""A job in its own process, started the way a user starts it, on its own local Flink.

Used by the end-to-end tests and the benchmark: ``python -m <module>`` with the settings as
MODELSERVING_* variables, ready once Flink's REST API reports every task running.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from jobs.settings import Settings
from modelserving.local.kafka_broker import free_port

PROJECT_ROOT = Path(__file__).resolve().parents[1]


class JobProcess:
    """A job started like a user would (``python -m jobs.<job>`` with MODELSERVING_* variables)
    on its own local Flink, whose REST API tells when it is running."""

    def __init__(self, module: str, settings: Settings, log_path: Path):
        self.module = module
        self.settings = settings.replace(rest_port=settings.rest_port or free_port())
        self.log_path = log_path
        self.process: subprocess.Popen | None = None

    def start(self, timeout_s: float = 240) -> "JobProcess":
        env = {**os.environ, **self.settings.to_environ(),
               "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")])),
               "FLINK_LOG_DIR": str(self.log_path.parent / "flink-log")}
        self.log = open(self.log_path, "w")
        self.process = subprocess.Popen([sys.executable, "-m", self.module], cwd=PROJECT_ROOT,
                                        stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                        start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.module} exited with {self.process.returncode}:\n{self.log_tail()}")
            overview = self.rest("/jobs/overview")
            running = [j for j in (overview or {}).get("jobs", []) if j["state"] == "RUNNING"]
            if running and running[0]["tasks"]["running"] == running[0]["tasks"]["total"]:
                self.job_id = running[0]["jid"]
                return self
            time.sleep(1)
        raise TimeoutError(f"{self.module} not running after {timeout_s} s:\n{self.log_tail()}")

    def rest(self, path: str):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.settings.rest_port}{path}", timeout=3) as r:
                return json.load(r)
        except OSError:
            return None

    def flink_log(self) -> str:
        """The local Flink's log, where the Python workers' log lines go."""
        return "".join(p.read_text(errors="replace") for p in sorted((self.log_path.parent / "flink-log").glob("*.log")))

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text().splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        if getattr(self, "log", None):
            self.log.close()
