"""Wire compatibility with the original tutorial, checked on hand-encoded protobuf bytes.

The bytes are written field by field from the tutorial's message definitions (field numbers and enum values), not by
our generated code, so a renumbered field in modelserving.proto fails here.
"""
from __future__ import annotations

import struct

import pytest

from protos import DataRecord, ModelDescriptor, ModelType, ServingResult, WineRecord
from udfs.features import WINE_FEATURES
from udfs.records import parse_record, record_data_type


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def field_double(number: int, value: float) -> bytes:
    return varint(number << 3 | 1) + struct.pack("<d", value)


def field_bytes(number: int, value: bytes) -> bytes:
    return varint(number << 3 | 2) + varint(len(value)) + value


def field_varint(number: int, value: int) -> bytes:
    return varint(number << 3) + varint(value)


WINE_VALUES = [7.4, 0.7, 0.01, 1.9, 0.076, 11.0, 34.0, 0.9978, 3.51, 0.56, 9.4]


def tutorial_wine_record() -> bytes:
    body = b"".join(field_double(i + 1, v) for i, v in enumerate(WINE_VALUES))
    return body + field_bytes(12, b"wine") + field_varint(13, 1700000000123)


def test_tutorial_wine_record_parses():
    raw = tutorial_wine_record()
    wine = WineRecord.FromString(raw)
    assert wine.pH == 3.51 and wine.alcohol == 9.4 and wine.fixed_acidity == 7.4
    assert wine.dataType == "wine" and wine.ts == 1700000000123
    record = parse_record(raw)
    assert record.names == WINE_FEATURES
    assert record.values == tuple(WINE_VALUES)
    assert record_data_type(raw) == "wine"


def test_our_wine_record_encodes_like_the_tutorial():
    ours = WineRecord(dataType="wine", ts=1700000000123,
                      **{f.name: v for f, v in zip(WineRecord.DESCRIPTOR.fields, WINE_VALUES)})
    assert ours.SerializeToString() == tutorial_wine_record()


@pytest.mark.parametrize("model_type, number", [("TENSORFLOW", 0), ("TENSORFLOWSAVED", 1),
                                                ("PMML", 2), ("ONNX", 3)])
def test_model_type_enum_values(model_type, number):
    assert ModelType.Value(model_type) == number


def test_tutorial_model_descriptor_parses():
    inline = (field_bytes(1, b"winequality") + field_bytes(2, b"generated from Spark")
              + field_bytes(3, b"wine") + field_varint(4, 2) + field_bytes(5, b"<PMML/>"))
    descriptor = ModelDescriptor.FromString(inline)
    assert (descriptor.name, descriptor.description, descriptor.dataType) == \
        ("winequality", "generated from Spark", "wine")
    assert descriptor.modeltype == ModelType.PMML and descriptor.data == b"<PMML/>"
    by_location = field_bytes(1, b"saved") + field_bytes(3, b"wine") + field_varint(4, 1) \
        + field_bytes(6, b"/models/saved/1")
    descriptor = ModelDescriptor.FromString(by_location)
    assert descriptor.WhichOneof("MessageContent") == "location"
    assert descriptor.location == "/models/saved/1" and descriptor.modeltype == ModelType.TENSORFLOWSAVED


def test_generic_record_shares_the_header_fields():
    raw = DataRecord(dataType="iris", ts=7, id="a", features={"petal": 1.5}).SerializeToString()
    as_wine = WineRecord.FromString(raw)
    assert (as_wine.dataType, as_wine.ts, as_wine.id) == ("iris", 7, "a")
    record = parse_record(raw)
    assert record.names == ("petal",) and record.values == (1.5,)


def test_result_round_trip():
    result = ServingResult(dataType="wine", modelName="m", score=6.0, probabilities=[0.2, 0.8])
    assert ServingResult.FromString(result.SerializeToString()).probabilities == pytest.approx([0.2, 0.8])


def test_dead_letter_numbers_old_and_new():
    """The first nine fields keep their numbers; the bounding fields are new numbers, and a
    reader of the old message reads a new dead letter's old fields unchanged."""
    from protos import DeadLetter

    numbers = {f.name: f.number for f in DeadLetter.DESCRIPTOR.fields}
    assert numbers == {"kind": 1, "raw": 2, "sourceTopic": 3, "reason": 4, "dataType": 5,
                       "modelName": 6, "modelVersion": 7, "atMs": 8, "subtask": 9,
                       "rawSize": 10, "rawSha256": 11, "rawTruncated": 12, "exceptionType": 13,
                       "sourcePartition": 14, "sourceOffset": 15}
    assert (DeadLetter.BAD_RECORD, DeadLetter.BAD_MODEL, DeadLetter.INTERNAL_ERROR) == (0, 1, 2)
    old = field_varint(1, 1) + field_bytes(2, b"abc") + field_bytes(3, b"models") \
        + field_bytes(4, b"why") + field_varint(9, 3)
    letter = DeadLetter.FromString(old)
    assert (letter.kind, letter.raw, letter.sourceTopic, letter.reason, letter.subtask) == \
        (DeadLetter.BAD_MODEL, b"abc", "models", "why", 3)
    new = DeadLetter(kind=DeadLetter.INTERNAL_ERROR, raw=b"ab", rawSize=5_000_000,
                     rawSha256="00" * 32, rawTruncated=True, exceptionType="RuntimeError",
                     sourcePartition=-1, sourceOffset=-1).SerializeToString()
    assert new.startswith(field_varint(1, 2) + field_bytes(2, b"ab"))
    assert field_varint(10, 5_000_000) in new and field_bytes(13, b"RuntimeError") in new
