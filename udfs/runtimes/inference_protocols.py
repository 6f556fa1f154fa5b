"""The two REST protocols an EXTERNAL model is called through: request bodies and answers.

Pure functions, no network: ``*_request`` builds the path and JSON body of one call for a
batch of rows, ``*_outputs`` reads an answer into named numpy outputs, which
``udfs.runtimes.outputs`` turns into predictions exactly as it does for an embedded model.
An answer that does not follow the protocol raises ``ProtocolError`` saying what is wrong.

* Open Inference Protocol V2 (MLServer, Triton, KServe):
  ``POST /v2/models/{name}[/versions/{v}]/infer`` with
  ``{"inputs": [{"name", "shape", "datatype", "data"}], "outputs": [{"name"}]}``; the answer
  has ``"outputs"``, each a tensor with name, shape, datatype and row-major data.
* TensorFlow Serving REST predict: ``POST /v1/models/{name}[/versions/{v}]:predict`` with
  ``{"signature_name"?, "instances": [...]}`` (the row format); the answer is
  ``{"predictions": [...]}``, one entry per row: the single output's value, or a
  ``{output: value}`` object when the signature has several. The columnar answer
  (``{"outputs": ...}``) is read too.
"""
from __future__ import annotations

import json
import math
from typing import Any, Sequence
from urllib.parse import quote

import numpy as np

#: V2 tensor datatypes and the numpy types their data is read as.
V2_DATATYPES = {
    "BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32,
    "UINT64": np.uint64, "INT8": np.int8, "INT16": np.int16, "INT32": np.int32,
    "INT64": np.int64, "FP16": np.float16, "FP32": np.float32, "FP64": np.float64,
    "BYTES": np.object_,
}
#: Input datatypes a descriptor may ask for (the features are float64 in the job).
V2_INPUT_DATATYPES = ("FP64", "FP32")
DEFAULT_V2_INPUT = "input-0"

NamedOutputs = list[tuple[str, np.ndarray]]


class ProtocolError(ValueError):
    """An answer that does not follow the protocol, or outputs that do not fit the batch."""


def _segment(text: str) -> str:
    """A model name or version as one URL path segment (a '/' in it cannot change the path)."""
    return quote(text, safe="")


def model_path(prefix: str, model: str, version: str) -> str:
    path = f"/{prefix}/models/{_segment(model)}"
    return path + f"/versions/{_segment(version)}" if version else path


# -- Open Inference Protocol V2 ------------------------------------------------------------------

def v2_request(values: np.ndarray, model: str, version: str = "", *, input_name: str = "",
               datatype: str = "FP64", outputs: Sequence[str] = ()) -> tuple[str, bytes]:
    """Path and body of one V2 inference call for the rows of ``values`` ([N, k] float)."""
    if datatype not in V2_INPUT_DATATYPES:
        raise ValueError(f"V2 input datatype must be one of {', '.join(V2_INPUT_DATATYPES)}, "
                         f"not {datatype!r}")
    matrix = np.asarray(values, dtype=np.float32 if datatype == "FP32" else np.float64)
    body: dict[str, Any] = {"inputs": [{
        "name": input_name or DEFAULT_V2_INPUT, "shape": list(matrix.shape),
        "datatype": datatype, "data": matrix.reshape(-1).tolist()}]}
    if outputs:
        body["outputs"] = [{"name": name} for name in outputs]
    return model_path("v2", model, version) + "/infer", _json_bytes(body)


def v2_outputs(answer: bytes, rows: int) -> NamedOutputs:
    """The named output tensors of a V2 answer, each shaped as the answer says."""
    document = _json_object(answer)
    tensors = document.get("outputs")
    if not isinstance(tensors, list) or not tensors:
        raise ProtocolError(f"a V2 answer needs a non-empty 'outputs' list; got keys "
                            f"{sorted(document)[:10]}")
    named = []
    for i, tensor in enumerate(tensors):
        if not isinstance(tensor, dict):
            raise ProtocolError(f"output {i} is not an object")
        name, shape, datatype = tensor.get("name"), tensor.get("shape"), tensor.get("datatype")
        if not isinstance(name, str) or not name:
            raise ProtocolError(f"output {i} has no name")
        dtype = V2_DATATYPES.get(datatype)
        if dtype is None:
            raise ProtocolError(f"output '{name}' has an unknown datatype {datatype!r}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise ProtocolError(f"output '{name}' has no valid shape ({shape!r})")
        try:
            data = np.asarray(tensor.get("data"), dtype=dtype)
            array = data.reshape(shape)
        except (TypeError, ValueError) as exc:
            raise ProtocolError(f"output '{name}': data does not fit {datatype} {shape} "
                                f"({exc})") from None
        named.append((name, array))
    return _per_row(named, rows)


# -- TensorFlow Serving REST predict -------------------------------------------------------------

def tf_serving_request(values: np.ndarray, model: str, version: str = "", *,
                       input_name: str = "", signature: str = "") -> tuple[str, bytes]:
    """Path and body of one TensorFlow Serving predict call (row format)."""
    rows = np.asarray(values, dtype=np.float64).tolist()
    instances = [{input_name: row} for row in rows] if input_name else rows
    body: dict[str, Any] = {"instances": instances}
    if signature:
        body["signature_name"] = signature
    return model_path("v1", model, version) + ":predict", _json_bytes(body)


def tf_serving_outputs(answer: bytes, rows: int, keep: Sequence[str] = ()) -> NamedOutputs:
    """The named outputs of a predict answer; ``keep`` limits them to those names."""
    document = _json_object(answer)
    if "predictions" in document:
        named = _rows_to_columns(document["predictions"], rows)
    elif "outputs" in document:
        outputs = document["outputs"]
        items = outputs.items() if isinstance(outputs, dict) else [("outputs", outputs)]
        named = [(str(name), _array(name, value)) for name, value in items]
    else:
        error = document.get("error")
        raise ProtocolError(f"the server answered an error: {str(error)[:300]}" if error else
                            f"a predict answer needs 'predictions' or 'outputs'; got keys "
                            f"{sorted(document)[:10]}")
    if keep:
        missing = [name for name in keep if name not in dict(named)]
        if missing:
            raise ProtocolError(f"the answer has no output {', '.join(missing)} (it has "
                                f"{', '.join(n for n, _ in named)})")
        named = [(name, value) for name, value in named if name in keep]
    return _per_row(named, rows)


def _rows_to_columns(predictions: Any, rows: int) -> NamedOutputs:
    if not isinstance(predictions, list):
        raise ProtocolError("'predictions' is not a list")
    if predictions and all(isinstance(p, dict) for p in predictions):
        names = list(predictions[0])
        if any(list(p) != names for p in predictions):
            raise ProtocolError("the rows of 'predictions' name different outputs")
        return [(str(n), _array(n, [p[n] for p in predictions])) for n in names]
    return [("predictions", _array("predictions", predictions))]


# -- shared ----------------------------------------------------------------------------------

def _array(name: Any, value: Any) -> np.ndarray:
    try:
        array = np.asarray(value)
    except (TypeError, ValueError):
        array = None
    if array is None or array.dtype == np.object_:
        raise ProtocolError(f"output '{name}' is ragged or mixed, not a tensor")
    return array


def _per_row(named: NamedOutputs, rows: int) -> NamedOutputs:
    """Refuse outputs that do not have one entry per row of the batch."""
    for name, array in named:
        if array.ndim == 0 or array.shape[0] != rows:
            raise ProtocolError(f"output '{name}' has shape {list(array.shape)}, not one entry "
                                f"for each of the {rows} rows sent")
    return named


def _json_bytes(body: dict) -> bytes:
    return json.dumps(body, separators=(",", ":"), allow_nan=False).encode()


def _json_object(answer: bytes) -> dict:
    try:
        document = json.loads(answer, parse_constant=_nonstandard_number)
    except (UnicodeDecodeError, ValueError) as exc:
        preview = answer[:80].decode("utf-8", "replace")
        raise ProtocolError(f"the answer is not JSON ({exc}; it starts {preview!r})") from None
    if not isinstance(document, dict):
        raise ProtocolError(f"the answer is JSON {type(document).__name__}, not an object")
    return document


def _nonstandard_number(name: str) -> float:
    """NaN and Infinity are not JSON, but Python servers write them: read as such
    (probabilities pass NaN through, as the embedded runtimes do)."""
    return math.nan if name == "NaN" else (math.inf if name == "Infinity" else -math.inf)
