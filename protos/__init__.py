"""Protobuf messages of the product, generated from ``modelserving.proto`` by the build.

The generated module is not kept in git. The build (``setup.py build_py`` and ``./dev``)
writes it; importing this package regenerates it when it is missing or older than the
.proto file, so a fresh checkout used straight from source also works.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
PROTO_FILES = ("modelserving.proto",)


def _generated_path(proto: str) -> Path:
    return PROTO_DIR / (Path(proto).stem + "_pb2.py")


def _is_stale(proto: str) -> bool:
    generated = _generated_path(proto)
    return not generated.exists() or generated.stat().st_mtime < (PROTO_DIR / proto).stat().st_mtime


def generate(force: bool = False) -> list[Path]:
    """Compile the .proto files with grpcio-tools; atomic, so parallel importers are safe."""
    from grpc_tools import protoc  # build-time dependency, imported only when needed

    written = []
    for proto in PROTO_FILES:
        if not force and not _is_stale(proto):
            continue
        with tempfile.TemporaryDirectory(dir=PROTO_DIR.parent) as out:
            args = ["protoc", f"-I{PROTO_DIR.parent}", f"--python_out={out}", f"--pyi_out={out}",
                    str(PROTO_DIR / proto)]
            if protoc.main(args) != 0:
                raise RuntimeError(f"protoc failed on {proto}")
            for produced in (Path(out) / "protos").iterdir():
                os.replace(produced, PROTO_DIR / produced.name)
                written.append(PROTO_DIR / produced.name)
    return written


if any(_is_stale(p) for p in PROTO_FILES):
    generate()

from protos.modelserving_pb2 import (  # noqa: E402
    ModelStats,
    DataRecord,
    DeadLetter,
    ModelDescriptor,
    ServingResult,
    WineRecord,
)

ModelType = ModelDescriptor.ModelType

__all__ = ["DataRecord", "DeadLetter", "ModelDescriptor", "ModelStats", "ModelType", "ServingResult",
           "WineRecord", "generate"]
