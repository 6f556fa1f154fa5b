"""Where the tooling keeps things on this machine: one place for every path it derives.

``MODELSERVING_VAR_DIR`` moves everything the commands write (broker data, Flink state,
models, benchmark results); ``MODELSERVING_JARS_DIR`` moves the fetched jars.
"""
from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
FLINK_CONF_DIR = PROJECT_ROOT / "flink-conf"


def var_dir() -> Path:
    """Everything the commands write; read when called so a test or a caller can move it."""
    return Path(os.environ.get("MODELSERVING_VAR_DIR") or PROJECT_ROOT / "var")


def jars_dir() -> Path:
    return Path(os.environ.get("MODELSERVING_JARS_DIR") or PROJECT_ROOT / "build" / "jars").resolve()
