"""Data records: raw Kafka bytes to named features, and features to a model's input matrix.

Two messages share the data topic: the tutorial's ``WineRecord`` (eleven positional fields)
and ``DataRecord`` (named features, any data type). They share field numbers 12-14
(dataType, ts, id), so one parse reads the header of either; a non-empty ``features`` map
marks a DataRecord.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from google.protobuf.message import DecodeError

from protos import DataRecord, WineRecord
from udfs.errors import RecordError
from udfs.features import WINE_FEATURES, WINE_PROTO_FIELDS
from udfs.runtimes.base import FeatureBatch


@dataclass(frozen=True)
class ParsedRecord:
    raw: bytes
    data_type: str
    record_id: str
    ts: int
    names: tuple[str, ...]
    values: tuple[float, ...]


def record_data_type(raw: bytes) -> str:
    """The data type of a record, or "" when it has none or does not parse.

    Used to key the stream before scoring; never raises, so bad records reach the scoring
    function, which turns them into dead letters with a reason.
    """
    try:
        header = DataRecord.FromString(raw)
    except (DecodeError, ValueError):
        return ""
    return header.dataType


def parse_record(raw: bytes) -> ParsedRecord:
    if not raw:
        raise RecordError("empty message")
    try:
        generic = DataRecord.FromString(raw)
    except (DecodeError, ValueError) as exc:
        raise RecordError(f"not a WineRecord or DataRecord protobuf ({exc})") from None
    if not generic.dataType:
        raise RecordError("record has no dataType")
    if generic.features:
        names = tuple(generic.features.keys())
        values = tuple(generic.features[name] for name in names)
    else:
        try:
            wine = WineRecord.FromString(raw)
        except (DecodeError, ValueError) as exc:
            raise RecordError(f"not a WineRecord protobuf ({exc})") from None
        names = WINE_FEATURES
        values = tuple(getattr(wine, f) for f in WINE_PROTO_FIELDS)
    return ParsedRecord(raw=raw, data_type=generic.dataType, record_id=generic.id,
                        ts=generic.ts, names=names, values=values)


def feature_row(record: ParsedRecord, input_names: Sequence[str], exact: bool) -> list[float]:
    """The record's values in the model's input order.

    ``exact`` is for vector models (ONNX, TensorFlow), which take all of a record's features
    by position: a record with a different number of features is refused. Named-input models
    (PMML) pick what they need.
    """
    if record.names == tuple(input_names):
        row = list(record.values)
    else:
        if exact and len(record.names) != len(input_names):
            raise RecordError(f"wrong number of features: the model takes {len(input_names)}, "
                              f"the record has {len(record.names)}")
        by_name = dict(zip(record.names, record.values))
        missing = [n for n in input_names if n not in by_name]
        if missing:
            raise RecordError(f"missing feature(s) {', '.join(repr(m) for m in missing)} "
                              f"required by the model")
        row = [by_name[n] for n in input_names]
    for name, value in zip(input_names, row):
        if not math.isfinite(value):
            raise RecordError(f"feature '{name}' is {value}")
    return row


def to_batch(rows: list[list[float]], input_names: Sequence[str]) -> FeatureBatch:
    return FeatureBatch(names=tuple(input_names),
                        values=np.asarray(rows, dtype=np.float64).reshape(len(rows), len(input_names)))
