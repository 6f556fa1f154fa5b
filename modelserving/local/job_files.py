"""The zip of Python packages shipped with a job (``flink run --pyFiles``).

Only what the client and the TaskManagers' Python workers import: ``jobs``, ``udfs`` and
``protos``. The ``modelserving`` tooling is never shipped: the jobs do not import it.

Never the project directory itself: ``flink run`` ships a directory as it is, and the
project root holds the virtual environment (gigabytes) that the client would zip, the blob
server store and every TaskManager unpack. The zip is named by its content, so unchanged
code is packed once.
"""
from __future__ import annotations

import hashlib
import os
import zipfile
from pathlib import Path
from typing import Iterable

from modelserving.paths import PROJECT_ROOT

#: What a TaskManager needs of the project.
JOB_PACKAGES = ("jobs", "udfs", "protos")
#: A fixed time for every entry, so the same files give the same bytes.
ZIP_TIME = (2020, 1, 1, 0, 0, 0)


def package_files(packages: Iterable[str] = JOB_PACKAGES,
                  root: Path = PROJECT_ROOT) -> list[Path]:
    """The files of ``packages`` under ``root`` (the generated protobuf modules included),
    without caches, in a fixed order so the same files give the same zip."""
    files = []
    for package in packages:
        base = root / package
        if not (base / "__init__.py").exists():
            continue
        files.extend(path for path in base.rglob("*")
                     if path.is_file() and "__pycache__" not in path.parts
                     and path.suffix != ".pyc")
    return sorted(files)


def build_zip(target_dir: Path, packages: Iterable[str] = JOB_PACKAGES,
              root: Path = PROJECT_ROOT) -> Path:
    """``target_dir/job-files-<content hash>.zip`` of ``packages``, built when missing (an
    older zip there is removed)."""
    root = Path(root).resolve()
    entries = package_files(packages, root)
    digest = hashlib.sha256()
    for path in entries:
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        digest.update(path.read_bytes())
    target = Path(target_dir) / f"job-files-{digest.hexdigest()[:16]}.zip"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    for old in target.parent.glob("job-files-*.zip"):
        old.unlink()
    partial = target.with_suffix(".part")
    with zipfile.ZipFile(partial, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in entries:
            info = zipfile.ZipInfo(str(path.relative_to(root)), date_time=ZIP_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            archive.writestr(info, path.read_bytes())
    os.replace(partial, target)
    return target
