"""A local MLServer (Open Inference Protocol V2) serving the demo wine model, for EXTERNAL
models in the demo and the tests.

MLServer and its scikit-learn runtime pin versions the project cannot share, so they live
in their own virtual environment, ``.venv-mlserver`` (``./dev setup`` builds it from
``requirements-mlserver.lock``; ``MODELSERVING_MLSERVER_VENV`` points elsewhere). Layout of
the work directory (default ``var/mlserver``)::

    settings.json                      server settings: loopback only, no worker processes
                                       (``mlserver start <work directory>`` reads it there)
    models/<name>/model.joblib         the demo pipeline (trained here, never committed)
    models/<name>/model-settings.json  MLServer's scikit-learn runtime for it
    mlserver.log, mlserver.pid

The server listens on 127.0.0.1 only; ``stop()`` ends it through the pid file.
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from pathlib import Path

import psutil

from modelserving.errors import DeadlineExceeded, ToolError
from modelserving.local import processes
from modelserving.local.http import request
from modelserving.local.processes import HOST
from modelserving.local.waiting import wait_until
from modelserving.paths import PROJECT_ROOT

VENV_VARIABLE = "MODELSERVING_MLSERVER_VENV"
DEFAULT_PORT = 8085


class MLServerError(ToolError):
    """The local MLServer could not be prepared, started or stopped."""


def mlserver_venv() -> Path:
    return Path(os.environ.get(VENV_VARIABLE) or PROJECT_ROOT / ".venv-mlserver")


class LocalMLServer:
    """MLServer on ``127.0.0.1:port`` serving the demo model as ``model_name``."""

    def __init__(self, workdir: Path, port: int = DEFAULT_PORT, model_name: str = "",
                 venv: Path | None = None):
        from modelserving.demo.training import SERVED_MODEL_NAME

        self.workdir = Path(workdir).resolve()
        self.port = port
        self.model_name = model_name or SERVED_MODEL_NAME
        self.venv = Path(venv) if venv else mlserver_venv()
        self._proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def models_dir(self) -> Path:
        return self.workdir / "models"

    @property
    def log_file(self) -> Path:
        return self.workdir / "mlserver.log"

    @property
    def pid_file(self) -> Path:
        return self.workdir / "mlserver.pid"

    @property
    def executable(self) -> Path:
        return self.venv / "bin" / "mlserver"

    # -- what it serves ------------------------------------------------------------------------

    def prepare(self) -> None:
        """Write the server settings, and the demo model with its model settings."""
        from modelserving.demo.training import export_for_model_server

        self.workdir.mkdir(parents=True, exist_ok=True)
        model_dir = self.models_dir / self.model_name
        export_for_model_server(model_dir)
        (model_dir / "model-settings.json").write_text(json.dumps(self.model_settings(), indent=2))
        (self.workdir / "settings.json").write_text(json.dumps(self.server_settings(), indent=2))

    def server_settings(self) -> dict:
        # parallel_workers 0: inference in the server process itself (on 2 cores a worker
        # pool only adds a hop); gRPC and metrics get ports no other service here uses
        return {"host": HOST, "http_port": self.port, "grpc_port": self.port + 1,
                "metrics_port": self.port + 2, "parallel_workers": 0,
                "load_models_at_startup": True, "debug": False}

    def model_settings(self) -> dict:
        return {"name": self.model_name, "implementation": "mlserver_sklearn.SKLearnModel",
                "parameters": {"uri": "./model.joblib", "version": "1"}}

    def descriptor(self, data_type: str = "", *, url: str = "", timeout_ms: int = 0,
                   name: str = ""):
        """The EXTERNAL ModelDescriptor that serves the demo model from this server (or from
        ``url``, a proxy in front of it): V2, asking for the class and its probabilities."""
        from modelserving.demo.training import DEMO_DATA_TYPE, demo_dataset
        from protos import ExternalModel, ModelDescriptor, ModelType

        data = demo_dataset()
        return ModelDescriptor(
            name=name or self.model_name, version="1", dataType=data_type or DEMO_DATA_TYPE,
            modeltype=ModelType.EXTERNAL,
            description=f"the demo logistic regression served by MLServer at {url or self.url}",
            inputFeatures=list(data.feature_names), classLabels=list(data.class_labels),
            server=ExternalModel(url=url or self.url, protocol=ExternalModel.OPEN_INFERENCE_V2,
                                 model=self.model_name, timeoutMs=timeout_ms,
                                 outputs=["predict", "predict_proba"]))

    # -- process -------------------------------------------------------------------------------

    def pid(self) -> int | None:
        if self._proc is not None and self._proc.poll() is None:
            return self._proc.pid
        pid = processes.read_pid(self.pid_file)
        if pid is not None and self._is_ours(pid):
            return pid
        return None

    def _is_ours(self, pid: int) -> bool:
        try:
            command = processes.cmdline(psutil.Process(pid))
        except psutil.Error:
            return False
        return processes.is_alive(pid) and "start" in command and str(self.workdir) in command

    def is_running(self) -> bool:
        return self.pid() is not None

    def is_ready(self) -> bool:
        """The model answers V2 readiness (GET /v2/models/<name>/ready gives 200)."""
        try:
            request(f"{self.url}/v2/models/{self.model_name}/ready", timeout_s=2)
            return True
        except OSError:
            return False

    def start(self, timeout_s: float = 120) -> "LocalMLServer":
        if self.is_running():
            self._wait_ready(timeout_s)
            return self
        if not self.executable.exists():
            raise MLServerError(f"MLServer is not installed at {self.venv} (./dev setup builds it "
                                f"from requirements-mlserver.lock; {VENV_VARIABLE} points elsewhere)")
        for port in (self.port, self.port + 1, self.port + 2):
            if not processes.port_is_free(port):
                raise MLServerError(f"port {HOST}:{port} is already in use; choose another --port")
        self.prepare()
        with open(self.log_file, "ab") as log:
            log.write(f"\n===== modelserving: starting MLServer on {self.url} at "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S')} =====\n".encode())
            log.flush()
            self._proc = subprocess.Popen(
                [str(self.executable), "start", str(self.workdir)], cwd=self.workdir,
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, close_fds=True)
        self.pid_file.write_text(f"{self._proc.pid}\n")
        try:
            self._wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout_s: float) -> None:
        def ready() -> bool:
            if not self.is_running():
                raise MLServerError(f"MLServer exited during startup; tail of {self.log_file}:\n"
                                    f"{processes.log_tail(self.log_file, 30)}")
            return self.is_ready()
        try:
            wait_until(ready, timeout_s, f"MLServer at {self.url} serving {self.model_name}",
                       interval_s=0.5)
        except DeadlineExceeded as exc:
            raise MLServerError(f"{exc}; tail of {self.log_file}:\n"
                                f"{processes.log_tail(self.log_file, 30)}") from None

    def stop(self, grace_s: float = 20) -> bool:
        """End the server and everything it started; False when none was running."""
        pid = self.pid()
        if pid is None:
            self.pid_file.unlink(missing_ok=True)
            return False
        processes.terminate_group(pid, grace_s)
        if self._proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=5)
        self.pid_file.unlink(missing_ok=True)
        self._proc = None
        return True

    def __enter__(self) -> "LocalMLServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# -- what a call costs -----------------------------------------------------------------------

def measure_calls(descriptor, allowed_url: str, batches: int, rows: int,
                  timeout_ms: int = 1000) -> dict:
    """Score ``batches`` batches of ``rows`` demo records through ``descriptor``'s server, as
    a job's subtask does (one synchronous, bounded call per batch), and say what each cost:
    latency percentiles in ms, records/s, and how many calls failed with which reason."""
    import numpy as np

    from modelserving.demo.training import demo_dataset
    from udfs.errors import ModelUnavailable
    from udfs.models import load_request
    from udfs.runtimes import load_model
    from udfs.runtimes.base import FeatureBatch
    from udfs.runtimes.endpoints import ModelServers, normalize_server_url

    servers = ModelServers(allowed=(normalize_server_url(allowed_url),),
                           timeout_s=timeout_ms / 1000)
    runtime = load_model(load_request(descriptor, [], 1, servers=servers))
    X = demo_dataset().X
    took, failures = [], {}
    started = time.perf_counter()
    try:
        for i in range(batches):
            batch = FeatureBatch(runtime.input_names,
                                 X[[(i * rows + j) % len(X) for j in range(rows)]])
            t0 = time.perf_counter()
            try:
                runtime.score(batch)
            except ModelUnavailable as exc:
                text = str(exc)
                reason = ("refused at once: circuit open" if text.startswith("circuit open")
                          else text[len(str(runtime.endpoint)) + 1:][:70])
                failures[reason] = failures.get(reason, 0) + 1
            took.append((time.perf_counter() - t0) * 1000)
    finally:
        runtime.close()
    total_s = time.perf_counter() - started
    ms = np.array(took)
    return {"batches": batches, "rows": rows, "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)), "max_ms": float(ms.max()),
            "first_calls_ms": [round(t, 3) for t in took[:5]],
            "records_per_s": batches * rows / total_s, "failures": failures}
