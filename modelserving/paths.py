"""Where the tooling keeps things on this machine: one place for every path it derives.

The settings ``var_dir`` (``MODELSERVING_VAR_DIR``) and ``jars_dir``
(``MODELSERVING_JARS_DIR``) move what the commands write and the fetched jars; they are
read at each call, so a test or a caller can move them.
"""
from __future__ import annotations

from pathlib import Path

from jobs.settings import Settings

PROJECT_ROOT = Path(__file__).resolve().parents[1]
FLINK_CONF_DIR = PROJECT_ROOT / "flink-conf"


def var_dir() -> Path:
    """Everything the commands write: broker data, Flink state, models, benchmark output."""
    return Path(Settings.from_sources().var_dir or PROJECT_ROOT / "var")


def jars_dir() -> Path:
    return Path(Settings.from_sources().jars_dir or PROJECT_ROOT / "build" / "jars").resolve()
