"""TensorFlow SavedModel directories (model type TENSORFLOWSAVED, sent by location).

Loaded with ``tf.saved_model.load``; the signature is the descriptor's ``signature``, else
"predict" when the model has it, else "serving_default". Scoring calls the signature's
concrete function directly on a float32 tensor (Keras ``predict`` costs ~35 ms per call).
TensorFlow is imported by this module only, and only when such a model arrives.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from udfs.errors import ModelLoadError, OutputError
from udfs.runtimes.base import FeatureBatch, LoadRequest, ModelRuntime, Prediction
from udfs.runtimes.outputs import (OutputReader, check_batch, describe_error, in_fixed_calls,
                                   vector_input_names, who)
from udfs.runtimes.tensorflow_graph import import_tensorflow

DEFAULT_SIGNATURES = ("predict", "serving_default")


class TensorFlowSavedRuntime(ModelRuntime):
    """One signature of a loaded SavedModel."""

    def __init__(self, loaded, function, input_key: str, dtype, input_names: tuple[str, ...],
                 reader: OutputReader, signature: str):
        self._loaded = loaded          # keeps the variables the function reads alive
        self._function = function
        self._input = input_key
        self._dtype = dtype
        self.input_names = input_names
        self._reader = reader
        self.signature = signature

    @classmethod
    def load(cls, request: LoadRequest) -> "TensorFlowSavedRuntime":
        if request.location is None:
            raise ModelLoadError("a TensorFlow SavedModel must come by location (a directory)",
                                 **who(request))
        location = Path(request.location)
        if not location.is_dir():
            raise ModelLoadError(f"SavedModel directory {location} does not exist", **who(request))
        tf = import_tensorflow()
        logger = tf.get_logger()
        level = logger.level
        logger.setLevel("ERROR")   # TF1-era SavedModels warn once per reference variable
        try:
            loaded = tf.saved_model.load(str(location))
        except Exception as exc:
            raise ModelLoadError(f"not a loadable SavedModel at {location}: "
                                 f"{describe_error(exc)}", **who(request)) from None
        finally:
            logger.setLevel(level)
        signatures = dict(getattr(loaded, "signatures", {}) or {})
        name = request.signature or next((s for s in DEFAULT_SIGNATURES if s in signatures), "")
        if name not in signatures:
            wanted = f"signature '{request.signature}'" if request.signature else \
                f"a '{DEFAULT_SIGNATURES[0]}' or '{DEFAULT_SIGNATURES[1]}' signature"
            raise ModelLoadError(f"the SavedModel at {location} has no {wanted} (it has: "
                                 f"{', '.join(sorted(signatures)) or 'none'})", **who(request))
        function = signatures[name]
        _, kwargs = function.structured_input_signature
        if len(kwargs) != 1:
            raise ModelLoadError(f"signature '{name}' must take exactly one input tensor, it takes "
                                 f"{len(kwargs)} ({', '.join(sorted(kwargs))})", **who(request))
        (key, spec), = kwargs.items()
        if not spec.dtype.is_floating or spec.shape.rank != 2:
            raise ModelLoadError(f"signature '{name}' input '{key}' is {spec.dtype.name} "
                                 f"{spec.shape}; expected a float tensor [N, features]",
                                 **who(request))
        input_names = vector_input_names(request, spec.shape[1])
        try:
            probe = function(**{key: tf.zeros((1, len(input_names)), spec.dtype)})
            reader = OutputReader.for_outputs(_numpy_outputs(probe),
                                              class_labels=request.class_labels)
        except OutputError as exc:
            raise ModelLoadError(f"signature '{name}' outputs not understood: {exc}",
                                 **who(request)) from None
        except Exception as exc:
            raise ModelLoadError(f"signature '{name}' fails on a test record: "
                                 f"{describe_error(exc)}", **who(request)) from None
        return cls(loaded, function, key, spec.dtype.as_numpy_dtype, input_names, reader, name)

    def score(self, batch: FeatureBatch) -> Sequence[Prediction]:
        check_batch(batch, self.input_names)
        rows = len(batch)
        if rows == 0:
            return []
        values = np.ascontiguousarray(batch.values, dtype=self._dtype)
        outputs = in_fixed_calls(values, lambda chunk: _numpy_outputs(self._function(**{self._input: chunk})))
        return self._reader.read(outputs, rows)

    def close(self) -> None:
        self._function = None
        self._loaded = None


def _numpy_outputs(outputs) -> list[tuple[str, np.ndarray]]:
    if isinstance(outputs, dict):
        return [(k, v.numpy()) for k, v in outputs.items()]
    if isinstance(outputs, (list, tuple)):
        return [(f"output_{i}", v.numpy()) for i, v in enumerate(outputs)]
    return [("output_0", outputs.numpy())]
