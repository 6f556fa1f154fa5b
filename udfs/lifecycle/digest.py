"""SHA-256 of a model: what results, the repository and a rollback know a model by.

A name and a version are whatever the publisher wrote; the digest says which bytes scored a
record. Inline models hash their bytes. Models by location hash their file (the same digest
as the same file sent inline), or their directory (a SavedModel): every file under it, in
sorted order of its relative path, as its path, its size and its contents, so the same files
give the same digest on every machine and a renamed or moved file changes it.

Locations are confined exactly as for loading (``udfs.models.confined_location``); a link
inside a directory is followed only to a regular file inside the model directories, since the
digest reads what the model library would read.
"""
from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path
from typing import Sequence

from protos import ModelDescriptor
from udfs.errors import ModelRejected
from udfs.models import confined_location

_CHUNK = 1 << 20


def digest_bytes(data: bytes) -> str:
    """SHA-256 of inline model bytes, lowercase hex."""
    return hashlib.sha256(data).hexdigest()


def digest_path(path: Path, model_dirs: Sequence[Path] = (), who: dict | None = None) -> str:
    """SHA-256 of a model file, or of a model directory (see the module's docstring).

    ``model_dirs`` (resolved) bound where links inside a directory may point; ``who`` names
    the model in the errors (``ModelRejected``)."""
    who = who or {}
    path = Path(path)
    if path.is_file():
        digest = hashlib.sha256()
        _update_with_file(digest, path)
        return digest.hexdigest()
    if not path.is_dir():
        raise ModelRejected(f"{path} is neither a file nor a directory", **who)
    digest = hashlib.sha256()
    for relative, file in _files_under(path, model_dirs, who):
        size = file.stat().st_size
        digest.update(f"{relative}\0{size}\0".encode())
        _update_with_file(digest, file)
    return digest.hexdigest()


def model_digest(descriptor: ModelDescriptor, model_dirs: Sequence[Path | str] = ()) -> str:
    """The digest of a descriptor's model: its inline bytes, or the file(s) at its location
    (confined to ``model_dirs``; raises ``ModelRejected`` as loading would). "" for a model
    whose bytes do not travel (EXTERNAL: they live on the model server) and for what is not
    a model (a speculative set, a withdrawal without content)."""
    content = descriptor.WhichOneof("MessageContent")
    if content == "data":
        return digest_bytes(descriptor.data)
    if content != "location":
        return ""
    who = dict(name=descriptor.name, version=descriptor.version, data_type=descriptor.dataType)
    dirs = tuple(Path(d).expanduser().resolve() for d in model_dirs)
    return digest_path(confined_location(descriptor.location, dirs, who), dirs, who)


def location_changed(descriptor: ModelDescriptor, published_digest: str,
                     model_dirs: Sequence[Path | str] = ()) -> str | None:
    """Why a model by location may not be served again (a rollback): its files changed since
    it was first published, as a reason naming both digests; None when they did not (or
    when the model is not by location, or no digest was recorded to compare with)."""
    if descriptor.WhichOneof("MessageContent") != "location" or not published_digest:
        return None
    now = model_digest(descriptor, model_dirs)
    return None if now == published_digest else changed_reason(descriptor.location, now,
                                                               published_digest)


def changed_reason(location: str, now: str, published: str) -> str:
    """The refusal of a model by location whose files are no longer those first published."""
    return (f"the files at location {location!r} changed since the model was first published: "
            f"their SHA-256 is now {now}, it was {published}")


def _files_under(root: Path, model_dirs: Sequence[Path], who: dict):
    """(relative POSIX path, file to read) of every file under ``root``, sorted by path."""
    found = []
    for directory, subdirectories, names in os.walk(root, followlinks=False):
        for name in subdirectories:
            if os.path.islink(os.path.join(directory, name)):
                raise ModelRejected(f"{os.path.join(directory, name)} is a link to a directory: "
                                    f"a model directory's digest reads files only", **who)
        for name in names:
            file = Path(directory, name)
            found.append((file.relative_to(root).as_posix(), _readable_file(file, model_dirs, who)))
    return sorted(found)


def _readable_file(file: Path, model_dirs: Sequence[Path], who: dict) -> Path:
    """``file`` itself, or the regular file its link points to inside the model directories."""
    if file.is_symlink():
        target = file.resolve()
        if not any(target == d or d in target.parents for d in model_dirs):
            raise ModelRejected(f"{file} links to {target}, outside the model directories", **who)
        file = target
    mode = file.stat().st_mode
    if not stat.S_ISREG(mode):
        raise ModelRejected(f"{file} is not a regular file", **who)
    return file


def _update_with_file(digest, path: Path) -> None:
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
