"""How each peer is started: its command lines (one per process), its Python, its processes.

The runner and the end-to-end test start peers through ``PeerProcesses`` alone, so a peer
is measured exactly as it is tested. Every process gets the job settings as
``MODELSERVING_*`` variables (secrets stay off the command line), the project on
``PYTHONPATH``, and a session of its own, so stopping it ends whatever it started.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from jobs.settings import Settings
from modelserving.bench import BYTEWAX, CONFLUENT_LOOP, CONFLUENT_LOOP_2P, PLAIN_LOOP, QUIX
from modelserving.errors import ToolError
from modelserving.local import processes
from modelserving.paths import PROJECT_ROOT

#: Where ``./dev setup`` makes the peers' own virtual environment (Quix Streams).
PEERS_VENV_VARIABLE = "MODELSERVING_PEERS_VENV"
#: Processes of the multi-process peers: one per core of the benchmark machine (2), and
#: the data topics' partitions (2), so none of them idles.
PROCESSES = 2
#: Messages a peer takes per poll.
POLL_BATCH = 1000


class PeerUnavailable(ToolError):
    """A peer whose environment is not installed."""


def peers_python() -> Path:
    venv = Path(os.environ.get(PEERS_VENV_VARIABLE) or PROJECT_ROOT / ".venv-peers")
    python = venv / "bin" / "python"
    if not python.exists():
        raise PeerUnavailable(f"the peers' virtual environment is missing ({venv}): run ./dev setup")
    return python


def _module(python, module: str, *args: str) -> list[str]:
    return [str(python), "-m", module, *args]


def commands(name: str) -> list[list[str]]:
    """The command line of each of the peer's processes."""
    if name == PLAIN_LOOP:
        return [_module(sys.executable, "modelserving.bench.plain_loop")]
    if name in (CONFLUENT_LOOP, CONFLUENT_LOOP_2P):
        count = PROCESSES if name == CONFLUENT_LOOP_2P else 1
        return [_module(sys.executable, "modelserving.bench.peers.confluent_loop",
                        "--batch", str(POLL_BATCH))] * count
    if name == QUIX:
        return [_module(peers_python(), "modelserving.bench.peers.quix_app")]
    if name == BYTEWAX:
        addresses = ";".join(f"{processes.HOST}:{port}" for port in processes.free_ports(PROCESSES))
        return [_module(sys.executable, "bytewax.run",
                        f"modelserving.bench.peers.bytewax_flow:get_flow({POLL_BATCH})",
                        "-i", str(index), "-a", addresses) for index in range(PROCESSES)]
    raise ValueError(f"not a peer: {name}")


def peer_versions() -> dict[str, str]:
    """Versions of the packages in the peers' own environment ({} when it is missing)."""
    try:
        python = peers_python()
    except PeerUnavailable:
        return {}
    script = ("import importlib.metadata as m\n"
              "for p in ('quixstreams', 'confluent-kafka'):\n"
              "    print(p, m.version(p))")
    try:
        out = subprocess.run([str(python), "-c", script], capture_output=True, text=True,
                             timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    return {f"{name} (peers venv)": version for name, version in
            (line.split() for line in out.splitlines() if line.strip())}


class PeerProcesses:
    """The processes of one peer; logs at ``log_path`` (the first) and beside it."""

    def __init__(self, name: str, settings: Settings, log_path: Path):
        self.name, self.settings, self.log_path = name, settings, Path(log_path)
        self.popens: list[subprocess.Popen] = []
        self._logs = []

    def log_paths(self) -> list[Path]:
        return [self._log_path(index) for index in range(len(self.popens))]

    def _log_path(self, index: int) -> Path:
        if index == 0:
            return self.log_path
        return self.log_path.with_name(f"{self.log_path.stem}-{index}{self.log_path.suffix}")

    def start(self) -> "PeerProcesses":
        env = {**os.environ, **self.settings.to_environ(), "PYTHONPATH": str(PROJECT_ROOT)}
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        for index, argv in enumerate(commands(self.name)):
            log = open(self._log_path(index), "w")
            self._logs.append(log)
            self.popens.append(subprocess.Popen(argv, cwd=PROJECT_ROOT, stdout=log,
                                                stderr=subprocess.STDOUT, env=env,
                                                start_new_session=True))
        return self

    def pids(self) -> list[int]:
        return [popen.pid for popen in self.popens]

    def exited(self) -> list[str]:
        """One line per process that is no longer running, with its log's last lines."""
        return [f"{self.name} process {popen.pid} exited with {popen.returncode}:\n"
                f"{processes.log_tail(path, 20)}"
                for popen, path in zip(self.popens, self.log_paths()) if popen.poll() is not None]

    def stop(self) -> None:
        for popen in self.popens:
            if popen.poll() is None:
                processes.terminate_group(popen.pid, grace_s=20)
            try:
                popen.wait(10)
            except subprocess.TimeoutExpired:
                pass
        for log in self._logs:
            log.close()
        self._logs = []

    def __enter__(self) -> "PeerProcesses":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
