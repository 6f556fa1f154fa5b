"""The runtime registry, keyed by the protobuf enum ``ModelDescriptor.ModelType``.

A format's module is imported only when a model of that format arrives, so a job that serves
only ONNX or PMML never imports TensorFlow. ``load_model`` is the one entry point the serving
code uses: whatever goes wrong inside a model library comes out as a ``ModelError`` whose
message names the model.
"""
from __future__ import annotations

import importlib
import logging

from protos import ModelType
from udfs.errors import ModelError, ModelLoadError, UnknownModelType
from udfs.runtimes.base import LoadRequest, ModelRuntime
from udfs.runtimes.outputs import describe_error

log = logging.getLogger(__name__)

#: model type -> (module, class) of its runtime.
_RUNTIMES: dict[int, tuple[str, str]] = {
    ModelType.TENSORFLOW: ("udfs.runtimes.tensorflow_graph", "TensorFlowGraphRuntime"),
    ModelType.TENSORFLOWSAVED: ("udfs.runtimes.tensorflow_saved", "TensorFlowSavedRuntime"),
    ModelType.PMML: ("udfs.runtimes.pmml", "PmmlRuntime"),
    ModelType.ONNX: ("udfs.runtimes.onnx_runtime", "OnnxRuntime"),
    ModelType.EXTERNAL: ("udfs.runtimes.external", "ExternalRuntime"),
}

#: Every model type a runtime is registered for.
SUPPORTED_TYPES: frozenset[int] = frozenset(_RUNTIMES)
#: Their enum names, in the order the tooling lists and measures them.
FORMAT_NAMES: tuple[str, ...] = ("ONNX", "TENSORFLOWSAVED", "TENSORFLOW", "PMML")


def type_name(model_type: int) -> str:
    """The enum name of ``model_type``, or the bare number when the enum does not know it."""
    try:
        return ModelType.Name(model_type)
    except ValueError:
        return str(model_type)


def runtime_for(model_type: int) -> type[ModelRuntime]:
    """The runtime class of ``model_type``; imports its module on first use."""
    entry = _RUNTIMES.get(model_type)
    if entry is None:
        supported = ", ".join(f"{type_name(t)}={t}" for t in sorted(SUPPORTED_TYPES))
        raise UnknownModelType(f"unknown model type {model_type} (no runtime registered; "
                               f"supported: {supported})")
    module_name, class_name = entry
    return getattr(importlib.import_module(module_name), class_name)


def load_model(request: LoadRequest) -> ModelRuntime:
    """Build the runtime for ``request``; every failure is a ModelError naming the model."""
    who = dict(name=request.name, version=request.version, data_type=request.data_type)
    try:
        runtime_class = runtime_for(request.model_type)
    except UnknownModelType as exc:
        raise UnknownModelType(exc.reason, **who) from None
    except Exception as exc:  # the library itself cannot be imported
        raise ModelLoadError(f"the {type_name(request.model_type)} runtime is unavailable: "
                             f"{describe_error(exc)}", **who) from exc
    try:
        return runtime_class.load(request)
    except ModelError as exc:
        if not exc.name and not exc.data_type:
            raise type(exc)(exc.reason, **who) from exc
        raise
    except Exception as exc:  # anything a library throws becomes a readable load error
        log.debug("loading %s model %r failed", type_name(request.model_type), request.name,
                  exc_info=True)
        raise ModelLoadError(f"{type_name(request.model_type)} model could not be loaded: "
                             f"{describe_error(exc)}", **who) from exc


__all__ = ["SUPPORTED_TYPES", "load_model", "runtime_for", "type_name"]
