"""The Flink distribution inside the installed ``pyflink`` package, and the configuration
directory a local cluster runs with.

A cluster's ``conf/`` is written on every start: ``config.yaml`` is the distribution's Java
options, then the project's ``flink-conf/config.yaml``, then the instance's own values
(ports, 127.0.0.1 addresses, directories in the workdir, the Python interpreter), which
win; the distribution's log configuration files are copied beside it.
"""
from __future__ import annotations

import functools
import importlib.util
import shutil
from pathlib import Path

import yaml

from modelserving.errors import FlinkClusterError
from modelserving.paths import FLINK_CONF_DIR

HOST = "127.0.0.1"
PROJECT_CONF = FLINK_CONF_DIR / "config.yaml"
#: The logging files the distribution's scripts look for in the conf dir: the project's
#: (``flink-conf/``) where it has one, else the distribution's.
LOG_FILES = ("log4j.properties", "log4j-console.properties", "log4j-cli.properties",
             "log4j-session.properties", "logback.xml", "logback-console.xml",
             "logback-session.xml")
#: The distribution's Java options kept: Java 17 needs its --add-opens/--add-exports.
JAVA_OPTION_KEYS = ("env.java.opts.all", "env.java.default-opts.all")
PROMETHEUS_PORT_KEY = "metrics.reporter.prom.port"


@functools.cache
def flink_home() -> Path:
    """The distribution inside the installed pyflink package (found without importing
    pyflink, which costs seconds)."""
    spec = importlib.util.find_spec("pyflink")
    if spec is None or not spec.origin:
        raise FlinkClusterError("the pyflink package is not installed in this environment")
    return Path(spec.origin).resolve().parent


def flatten(tree: dict | None, prefix: str = "") -> dict:
    """Nested YAML maps as Flink's flat keys (``rest: {port: 1}`` -> ``rest.port: 1``)."""
    flat = {}
    for key, value in (tree or {}).items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def read_flat(path: Path) -> dict:
    return flatten(yaml.safe_load(path.read_text()) or {})


def port_range(spec) -> list[int]:
    """The ports of a Flink port setting: ``9249``, ``"9249-9260"`` or ``"9249,9251"``."""
    ports: list[int] = []
    for part in str(spec).split(","):
        part = part.strip()
        if not part:
            continue
        low, _, high = part.partition("-")
        ports.extend(range(int(low), int(high or low) + 1))
    return ports


def cluster_configuration(workdir: Path, *, rest_port: int, rpc_port: int, slots: int,
                          python: str, conf_file: Path = PROJECT_CONF,
                          extra: dict | None = None) -> dict:
    """The flat configuration of one local cluster instance: the distribution's Java
    options, the project's file, then this instance's values, then ``extra`` (which win
    over everything)."""
    conf = {}
    dist = read_flat(flink_home() / "conf" / "config.yaml")
    conf.update({key: dist[key] for key in JAVA_OPTION_KEYS if key in dist})
    conf.update(read_flat(Path(conf_file)))
    conf.update({
        "jobmanager.rpc.address": HOST,
        "jobmanager.rpc.port": rpc_port,
        "jobmanager.bind-host": HOST,
        "taskmanager.host": HOST,
        "taskmanager.bind-host": HOST,
        "taskmanager.rpc.port": "0",
        "taskmanager.data.port": 0,
        "blob.server.port": "0",
        "rest.address": HOST,
        "rest.bind-address": HOST,
        "rest.port": rest_port,
        "taskmanager.numberOfTaskSlots": slots,
        "io.tmp.dirs": str(workdir / "tmp"),
        "env.log.dir": str(workdir / "log"),
        "env.pid.dir": str(workdir / "pid"),
        "execution.checkpointing.dir": (workdir / "checkpoints").as_uri(),
        "execution.checkpointing.savepoint-dir": (workdir / "savepoints").as_uri(),
        "python.executable": python,
        "python.client.executable": python,
    })
    conf.update(extra or {})
    return conf


def write_conf_dir(conf_dir: Path, conf: dict, *, rest_port: int, taskmanagers: int,
                   source: Path = PROJECT_CONF) -> None:
    """``config.yaml``, ``masters``, ``workers`` and the logging files into ``conf_dir``."""
    conf_dir.mkdir(parents=True, exist_ok=True)
    dist_conf = flink_home() / "conf"
    for name in LOG_FILES:   # the project's own logging file where it has one
        for directory in (source.parent, dist_conf):
            if (directory / name).exists():
                shutil.copyfile(directory / name, conf_dir / name)
                break
    header = (f"# Written by modelserving.local.flink_config on every start from {source}\n"
              "# plus this instance's ports and directories; edits here are overwritten.\n")
    body = yaml.safe_dump(conf, sort_keys=False, default_flow_style=False, width=1 << 16)
    (conf_dir / "config.yaml").write_text(header + body)
    (conf_dir / "masters").write_text(f"{HOST}:{rest_port}\n")
    (conf_dir / "workers").write_text(f"{HOST}\n" * taskmanagers)
