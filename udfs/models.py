"""Model descriptors: parse, enforce the policies, and describe the model for results and logs.

Policies are checked before any model library sees the model: the size limit, locations
confined to the configured model directories (symlinks resolved first), model servers
confined to the configured ones (``model_servers``), and the presence of content. Format-specific checks (a PMML DOCTYPE, corrupt bytes) belong to the runtimes.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from google.protobuf.message import DecodeError

from protos import ModelDescriptor, ModelType
from udfs.errors import ModelRejected, UnknownModelType
from udfs.runtimes.base import LoadRequest
from udfs.runtimes.endpoints import (PROTOCOL_NAMES, TENSORFLOW_SERVING, Endpoint, ModelServers,
                                     normalize_server_url, under_prefix)
from udfs.runtimes.inference_protocols import V2_INPUT_DATATYPES

#: A modelId names a model; it is not a payload.
MAX_MODEL_ID_CHARS = 128
#: Formats whose models are a directory, so they can only come by location.
LOCATION_ONLY_TYPES = frozenset({ModelType.TENSORFLOWSAVED})
#: Formats that take every feature by position (the others pick inputs by name).
VECTOR_TYPES = frozenset({ModelType.TENSORFLOW, ModelType.TENSORFLOWSAVED, ModelType.ONNX,
                          ModelType.EXTERNAL})


@dataclass(frozen=True)
class ModelInfo:
    """What results, logs and statistics say about a model."""

    data_type: str
    name: str
    version: str
    description: str
    model_type: int
    model_id: str          # digest of the descriptor bytes: identifies the model in state
    declared_id: str = ""  # the descriptor's modelId: which of its data type's models it is
    digest: str = ""       # SHA-256 of the model (udfs.lifecycle.digest), "" until it is loaded

    @property
    def type_name(self) -> str:
        return ModelType.Name(self.model_type) if self.model_type in ModelType.values() else str(self.model_type)

    def __str__(self) -> str:
        version = f" v{self.version}" if self.version else ""
        declared = f" (id '{self.declared_id}')" if self.declared_id else ""
        return (f"{self.type_name} model '{self.name}'{version}{declared} for data type "
                f"'{self.data_type}'")


def model_id(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()[:16]


def parse_descriptor(raw: bytes) -> ModelDescriptor:
    if not raw:
        raise ModelRejected("empty model message")
    try:
        descriptor = ModelDescriptor.FromString(raw)
    except (DecodeError, ValueError) as exc:
        raise ModelRejected(f"not a ModelDescriptor protobuf ({exc})") from None
    if not descriptor.dataType:
        raise ModelRejected("model descriptor has no dataType", name=descriptor.name,
                            version=descriptor.version)
    return descriptor


def describe(descriptor: ModelDescriptor, raw: bytes) -> ModelInfo:
    return ModelInfo(data_type=descriptor.dataType, name=descriptor.name,
                     version=descriptor.version, description=descriptor.description,
                     model_type=descriptor.modeltype, model_id=model_id(raw),
                     declared_id=descriptor.modelId)


def load_request(descriptor: ModelDescriptor, model_dirs: Sequence[Path],
                 max_model_bytes: int, max_inline_model_bytes: int | None = None,
                 servers: ModelServers | None = None) -> LoadRequest:
    """Check a descriptor against the policies and say what the runtime must load.

    Inline models are also bounded by ``max_inline_model_bytes``: their descriptor is what
    Flink keeps in state, so big models must come by location. An EXTERNAL model's server
    must lie under one of ``servers.allowed``."""
    who = dict(name=descriptor.name, version=descriptor.version, data_type=descriptor.dataType)
    if descriptor.modeltype not in ModelType.values():
        raise UnknownModelType(f"unknown model type {descriptor.modeltype}; supported: "
                               f"{', '.join(ModelType.keys())}", **who)
    content = descriptor.WhichOneof("MessageContent")
    if len(descriptor.modelId) > MAX_MODEL_ID_CHARS:
        raise ModelRejected(f"modelId is {len(descriptor.modelId)} characters, over "
                            f"{MAX_MODEL_ID_CHARS}", **who)
    if descriptor.modeltype == ModelType.EXTERNAL or content == "server":
        return _external_request(descriptor, content, servers or ModelServers(), who)
    data, location = None, None
    if content is None:
        raise ModelRejected("descriptor has neither data nor location", **who)
    if content == "data":
        if not descriptor.data:
            raise ModelRejected("descriptor has empty inline data", **who)
        if descriptor.modeltype in LOCATION_ONLY_TYPES:
            raise ModelRejected(f"{ModelType.Name(descriptor.modeltype)} models are directories "
                                f"and must be sent by location", **who)
        _check_size(len(descriptor.data), max_model_bytes, who)
        if max_inline_model_bytes is not None and len(descriptor.data) > max_inline_model_bytes:
            raise ModelRejected(f"inline model is {len(descriptor.data)} bytes, over the limit of "
                                f"{max_inline_model_bytes} bytes for models kept in state "
                                f"(max_inline_model_bytes): send it by location", **who)
        data = descriptor.data
    else:
        location = confined_location(descriptor.location, model_dirs, who)
        _check_size(_size_of(location), max_model_bytes, who)
        if descriptor.modeltype not in LOCATION_ONLY_TYPES:
            if not location.is_file():
                raise ModelRejected(f"location {descriptor.location} is not a file", **who)
            data, location = location.read_bytes(), None
    return LoadRequest(name=descriptor.name, version=descriptor.version,
                       data_type=descriptor.dataType, model_type=descriptor.modeltype,
                       data=data, location=location,
                       input_features=tuple(descriptor.inputFeatures),
                       signature=descriptor.signature,
                       class_labels=tuple(descriptor.classLabels))


def _external_request(descriptor: ModelDescriptor, content: str | None, servers: ModelServers,
                      who: dict) -> LoadRequest:
    if descriptor.modeltype != ModelType.EXTERNAL:
        raise ModelRejected(f"'server' names a model server, which only EXTERNAL models have "
                            f"(this one is {ModelType.Name(descriptor.modeltype)})", **who)
    if content != "server":
        raise ModelRejected("an EXTERNAL model needs 'server' (its model server), not "
                            f"{content or 'nothing'}", **who)
    server = descriptor.server
    if server.protocol not in PROTOCOL_NAMES:
        raise ModelRejected(f"unknown model server protocol {server.protocol} (known: "
                            f"{', '.join(f'{n}={p}' for p, n in PROTOCOL_NAMES.items())})", **who)
    model = server.model or descriptor.name
    if not model:
        raise ModelRejected("an EXTERNAL model needs the model's name on its server "
                            "(server.model or name)", **who)
    datatype = server.inputDatatype or "FP64"
    if datatype not in V2_INPUT_DATATYPES:
        raise ModelRejected(f"server.inputDatatype must be one of {', '.join(V2_INPUT_DATATYPES)}, "
                            f"not {datatype!r}", **who)
    if server.timeoutMs < 0:
        raise ModelRejected(f"server.timeoutMs must not be negative ({server.timeoutMs})", **who)
    timeout_s = servers.timeout_s
    if server.timeoutMs:   # a descriptor may shorten the job's timeout, never lengthen it
        timeout_s = min(timeout_s, server.timeoutMs / 1000)
    endpoint = Endpoint(url=confined_server(server.url, servers, who), protocol=server.protocol,
                        model=model, model_version=server.modelVersion, timeout_s=timeout_s,
                        input_name=server.inputName, input_datatype=datatype,
                        outputs=tuple(server.outputs),
                        signature=descriptor.signature if server.protocol == TENSORFLOW_SERVING
                        else "")
    return LoadRequest(name=descriptor.name, version=descriptor.version,
                       data_type=descriptor.dataType, model_type=descriptor.modeltype,
                       input_features=tuple(descriptor.inputFeatures),
                       signature=descriptor.signature,
                       class_labels=tuple(descriptor.classLabels),
                       extra={"endpoint": endpoint, "servers": servers})


def confined_server(url: str, servers: ModelServers, who: dict) -> str:
    """The normalized server URL; refused unless it lies under a configured model server."""
    if not servers.allowed:
        raise ModelRejected(f"model server {url!r} refused: no model servers are configured "
                            f"(set model_servers)", **who)
    try:
        normalized = normalize_server_url(url)
    except ValueError as exc:
        raise ModelRejected(f"model server {url!r} refused: {exc}", **who) from None
    if not under_prefix(normalized, servers.allowed):
        raise ModelRejected(f"model server {url!r} is not one of the configured model servers "
                            f"({', '.join(servers.allowed)})", **who)
    return normalized


def confined_location(location: str, model_dirs: Sequence[Path], who: dict) -> Path:
    """Resolve a location (a path or file:// URI) and refuse anything outside ``model_dirs``."""
    if not model_dirs:
        raise ModelRejected(f"location {location!r} refused: no model directories are configured "
                            f"(set model_dirs)", **who)
    text = location[len("file://"):] if location.startswith("file://") else location
    if not text:
        raise ModelRejected("empty location", **who)
    candidates = [Path(text)] if os.path.isabs(text) else [d / text for d in model_dirs]
    for candidate in candidates:
        resolved = candidate.resolve()
        inside = any(resolved == d or d in resolved.parents for d in model_dirs)
        if not inside:
            raise ModelRejected(f"location {location!r} lies outside the model directories "
                                f"({', '.join(str(d) for d in model_dirs)})", **who)
        if resolved.exists():
            return resolved
    raise ModelRejected(f"location {location!r} does not exist", **who)


def _size_of(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _check_size(size: int, limit: int, who: dict) -> None:
    if size > limit:
        raise ModelRejected(f"model is {size} bytes, over the limit of {limit} bytes "
                            f"(max_model_bytes)", **who)
