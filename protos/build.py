"""``python -m protos.build``: generate the Python modules from the .proto files.

Regenerates only what is missing or older than its .proto (``--force``: everything).
Writes atomically, so parallel builds are safe.
"""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
PROTO_FILES = ("modelserving.proto",)


def _generated_path(proto: str) -> Path:
    return PROTO_DIR / (Path(proto).stem + "_pb2.py")


def is_stale(proto: str) -> bool:
    generated = _generated_path(proto)
    return not generated.exists() or generated.stat().st_mtime < (PROTO_DIR / proto).stat().st_mtime


def generate(force: bool = False) -> list[Path]:
    """Compile the .proto files with grpcio-tools (a build-time dependency)."""
    from grpc_tools import protoc

    written = []
    for proto in PROTO_FILES:
        if not force and not is_stale(proto):
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


if __name__ == "__main__":
    for path in generate(force="--force" in sys.argv[1:]):
        print(f"generated {path}")
