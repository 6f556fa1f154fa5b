"""ONNX models (inline bytes) through onnxruntime, on the CPU, one thread per model.

The model must take one float tensor ``[N, k]``; its columns are the descriptor's
``inputFeatures`` (or the data type's canonical order). Outputs are read by
``udfs.runtimes.outputs``: scikit-learn classifiers converted by skl2onnx come either as a
``label`` + ``probabilities`` tensor pair (zipmap disabled) or as a ZipMap sequence of maps;
both work, and the class names are taken from the classifier node when the graph has one.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import onnxruntime as ort

from udfs.errors import ModelLoadError, OutputError
from udfs.runtimes.base import FeatureBatch, LoadRequest, ModelRuntime, Prediction
from udfs.runtimes.outputs import (OutputReader, check_batch, describe_error,
                                   vector_input_names, who)

_INPUT_TYPES = {"tensor(float)": np.float32, "tensor(double)": np.float64}
#: ai.onnx.ml operators that carry a classifier's class names.
_CLASSIFIER_OPS = ("LinearClassifier", "TreeEnsembleClassifier", "SVMClassifier", "ZipMap")


class OnnxRuntime(ModelRuntime):
    """One onnxruntime InferenceSession."""

    def __init__(self, session: ort.InferenceSession, input_name: str, dtype: type,
                 input_names: tuple[str, ...], output_names: list[str], reader: OutputReader):
        self._session = session
        self._input = input_name
        self._dtype = dtype
        self.input_names = input_names
        self._outputs = output_names
        self._reader = reader

    @classmethod
    def load(cls, request: LoadRequest) -> "OnnxRuntime":
        if not request.data:
            raise ModelLoadError("an ONNX model must come as inline bytes (data)", **who(request))
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3
        try:
            session = ort.InferenceSession(request.data, sess_options=options,
                                           providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise ModelLoadError(f"not a loadable ONNX model: {describe_error(exc)}",
                                 **who(request)) from None
        inputs = session.get_inputs()
        if len(inputs) != 1:
            raise ModelLoadError(f"an ONNX model must have exactly one input tensor, this one has "
                                 f"{len(inputs)} ({', '.join(i.name for i in inputs)})",
                                 **who(request))
        tensor = inputs[0]
        dtype = _INPUT_TYPES.get(tensor.type)
        if dtype is None or len(tensor.shape) != 2:
            raise ModelLoadError(f"the ONNX input '{tensor.name}' is {tensor.type} "
                                 f"{list(tensor.shape)}; expected a float tensor [N, features]",
                                 **who(request))
        width = tensor.shape[1] if isinstance(tensor.shape[1], int) else None
        input_names = vector_input_names(request, width)
        output_names = [o.name for o in session.get_outputs()]
        try:
            probe = session.run(output_names, {tensor.name: np.zeros((1, len(input_names)), dtype)})
            reader = OutputReader.for_outputs(list(zip(output_names, probe)),
                                              class_labels=request.class_labels,
                                              model_classes=_class_names(request.data))
        except OutputError as exc:
            raise ModelLoadError(f"ONNX outputs not understood: {exc}", **who(request)) from None
        except Exception as exc:
            raise ModelLoadError(f"the ONNX model fails on a test record: {describe_error(exc)}",
                                 **who(request)) from None
        return cls(session, tensor.name, dtype, input_names, output_names, reader)

    def score(self, batch: FeatureBatch) -> Sequence[Prediction]:
        check_batch(batch, self.input_names)
        rows = len(batch)
        if rows == 0:
            return []
        values = np.ascontiguousarray(batch.values, dtype=self._dtype)
        if rows == 1:
            # onnxruntime's CPU kernels take another summation order for a single row (1 ulp
            # apart from the same row in any larger batch); scoring it as two identical rows
            # makes a record's result independent of the micro-batch it happens to be in.
            values = np.repeat(values, 2, axis=0)
        results = self._session.run(self._outputs, {self._input: values})
        if rows == 1:
            results = [result[:1] for result in results]
        return self._reader.read(zip(self._outputs, results), rows)

    def close(self) -> None:
        self._session = None


def _class_names(data: bytes) -> tuple:
    """The class names a classifier node declares, in output order; () when there is none."""
    try:
        import onnx
        from onnx import helper

        model = onnx.load_model_from_string(data)
    except Exception:  # onnx is optional here: without it the labels come from the outputs
        return ()
    for node in model.graph.node:
        if node.op_type not in _CLASSIFIER_OPS:
            continue
        for attribute in node.attribute:
            if attribute.name in ("classlabels_strings", "classlabels_int64s", "classlabels_ints"):
                values = helper.get_attribute_value(attribute)
                if values:
                    return tuple(v.decode() if isinstance(v, bytes) else int(v) for v in values)
    return ()
