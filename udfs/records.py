"""Data records: raw Kafka bytes to named features, and features to a model's input matrix.

Two messages share the data topic: the tutorial's ``WineRecord`` (eleven positional fields)
and ``DataRecord`` (named features, any data type). They share field numbers 12-14
(dataType, ts, id), so one parse reads the header of either; a non-empty ``features`` map
marks a DataRecord.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from google.protobuf.message import DecodeError

from protos import DataRecord, WineRecord
from udfs.errors import RecordError
from udfs.features import WINE_FEATURES, WINE_PROTO_FIELDS
from udfs.runtimes.base import FeatureBatch


class ParsedRecord:
    """A record's header, and its features as the message has them: reading a protobuf map
    costs microseconds per call, so a record's values are read once, in the model's input
    order (``feature_row``), not first into names and values."""

    __slots__ = ("raw", "data_type", "record_id", "ts", "features", "wine_values")

    def __init__(self, raw: bytes, data_type: str, record_id: str, ts: int,
                 features=None, wine_values: tuple[float, ...] | None = None):
        self.raw, self.data_type, self.record_id, self.ts = raw, data_type, record_id, ts
        self.features = features          # a DataRecord's feature map, else None
        self.wine_values = wine_values    # a WineRecord's values, in WINE_FEATURES order

    @property
    def names(self) -> tuple[str, ...]:
        return WINE_FEATURES if self.features is None else tuple(self.features.keys())

    @property
    def values(self) -> tuple[float, ...]:
        if self.features is None:
            return self.wine_values
        return tuple(self.features[name] for name in self.names)


def record_data_type(raw: bytes) -> str:
    """The data type of a record, or "" when it has none or does not parse.

    Used to key the stream before scoring; never raises, so bad records reach the scoring
    function, which turns them into dead letters with a reason.
    """
    try:   # the shared header, read as a WineRecord: a DataRecord's feature map is then an
        # unknown field, skipped unparsed (half the time of a DataRecord parse)
        header = WineRecord.FromString(raw)
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
        return ParsedRecord(raw, generic.dataType, generic.id, generic.ts, features=generic.features)
    try:
        wine = WineRecord.FromString(raw)
    except (DecodeError, ValueError) as exc:
        raise RecordError(f"not a WineRecord protobuf ({exc})") from None
    return ParsedRecord(raw, generic.dataType, generic.id, generic.ts,
                        wine_values=tuple(getattr(wine, f) for f in WINE_PROTO_FIELDS))


def feature_row(record: ParsedRecord, input_names: Sequence[str], exact: bool) -> list[float]:
    """The record's values in the model's input order.

    ``exact`` is for vector models (ONNX, TensorFlow), which take all of a record's features
    by position: a record with a different number of features is refused. Named-input models
    (PMML) pick what they need.
    """
    features = record.features
    if features is not None:
        present = len(features)
        if exact and present != len(input_names):
            raise RecordError(f"wrong number of features: the model takes {len(input_names)}, "
                              f"the record has {present}")
        row = [features[name] for name in input_names]
        if len(features) != present:   # reading a missing key of a protobuf map adds it
            original = DataRecord.FromString(record.raw).features
            missing = [name for name in input_names if name not in original]
            raise RecordError(f"missing feature(s) {', '.join(repr(m) for m in missing)} "
                              f"required by the model")
    elif tuple(input_names) == WINE_FEATURES:
        row = list(record.wine_values)
    else:
        if exact and len(WINE_FEATURES) != len(input_names):
            raise RecordError(f"wrong number of features: the model takes {len(input_names)}, "
                              f"the record has {len(WINE_FEATURES)}")
        by_name = dict(zip(WINE_FEATURES, record.wine_values))
        missing = [n for n in input_names if n not in by_name]
        if missing:
            raise RecordError(f"missing feature(s) {', '.join(repr(m) for m in missing)} "
                              f"required by the model")
        row = [by_name[n] for n in input_names]
    if not all(map(math.isfinite, row)):
        name, value = next((n, v) for n, v in zip(input_names, row) if not math.isfinite(v))
        raise RecordError(f"feature '{name}' is {value}")
    return row


def to_batch(rows: list[list[float]], input_names: Sequence[str]) -> FeatureBatch:
    return FeatureBatch(names=tuple(input_names),
                        values=np.asarray(rows, dtype=np.float64).reshape(len(rows), len(input_names)))
