"""Protobuf messages of the product, generated from ``modelserving.proto`` by the build.

The generated module is not kept in git: ``python -m protos.build`` (run by ``./dev`` and
by ``setup.py build_py``) writes it. Importing this package does nothing else; the
messages are loaded on first use, with a clear error when they were never generated.
"""
from __future__ import annotations

import importlib

_MESSAGES = ("CandidateSlot", "CandidateStats", "DataRecord", "DeadLetter", "ExternalModel",
             "FeatureDrift", "ModelDescriptor", "ModelStats", "Reference", "RepositoryEntry",
             "Rollout", "ServingResult", "SpeculativeModelStats", "SpeculativeOutcome",
             "SpeculativeSet", "Validation", "ValidationFigures", "WineRecord")

__all__ = [*_MESSAGES, "ModelType"]


def __getattr__(name: str):
    if name not in __all__:
        raise AttributeError(f"module 'protos' has no attribute {name!r}")
    try:
        generated = importlib.import_module("protos.modelserving_pb2")
    except ModuleNotFoundError as exc:
        if exc.name != "protos.modelserving_pb2":
            raise
        raise ImportError("the protobuf modules have not been generated: run "
                          "`python -m protos.build` (./dev setup does it)") from None
    values = {message: getattr(generated, message) for message in _MESSAGES}
    values["ModelType"] = generated.ModelDescriptor.ModelType
    globals().update(values)
    return values[name]
