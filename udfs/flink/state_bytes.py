"""Bytes in Flink state (model descriptors, speculative sets, statistics), in both Python
execution modes.

Process mode keeps them as ``byte[]`` (``BYTES``). Thread mode cannot: PyFlink 2.2's embedded
converter picks its converter from the state's Python type information, maps ``byte[]`` to
a tuple of integers, and hands Java an ``Object[]`` the ``byte[]`` serializer cannot copy, so
the first checkpoint with a model in state fails (``ClassCastException`` in
``BytePrimitiveArraySerializer.copy``). Strings pass through that converter unchanged, so
thread mode keeps the bytes as a latin-1 string: one character per byte, exact both ways.

The choice follows ``python_execution_mode``; a savepoint taken in one mode restores only
in the same mode (the state's serializer differs).
"""
from __future__ import annotations

from typing import NamedTuple

from pyflink.common import Types
from pyflink.datastream.state import MapStateDescriptor, ValueStateDescriptor

from udfs.flink.batches import BYTES

#: The code page that maps every byte to one character and back.
_BYTE_CHARS = "latin-1"


class StateBytes:
    """How this job's bytes are typed and coded in state."""

    def __init__(self, thread_mode: bool):
        self.thread_mode = thread_mode
        self.type_info = Types.STRING() if thread_mode else BYTES

    @classmethod
    def of(cls, settings) -> "StateBytes":
        return cls(settings.python_execution_mode == "thread")

    def encode(self, raw: bytes):
        return raw.decode(_BYTE_CHARS) if self.thread_mode else raw

    def decode(self, stored) -> bytes | None:
        if stored is None:
            return None
        return stored.encode(_BYTE_CHARS) if self.thread_mode else stored

    def value_descriptor(self, name: str) -> ValueStateDescriptor:
        return ValueStateDescriptor(name, self.type_info)

    def map_descriptor(self, name: str) -> MapStateDescriptor:
        """String keys to bytes."""
        return MapStateDescriptor(name, Types.STRING(), self.type_info)

    def value(self, state) -> "BytesValue":
        return BytesValue(state, self)

    def map(self, state) -> "BytesMap":
        return BytesMap(state, self)


class BytesValue:
    """A bytes ``ValueState``."""

    def __init__(self, state, coding: StateBytes):
        self.state, self.coding = state, coding

    def value(self) -> bytes | None:
        """None when empty. (In thread mode PyFlink 2.2 converts an empty ``byte[]`` state
        as if it held an array and raises TypeError instead of returning None.)"""
        try:
            return self.coding.decode(self.state.value())
        except TypeError:
            return None

    def update(self, raw: bytes) -> None:
        self.state.update(self.coding.encode(raw))

    def clear(self) -> None:
        self.state.clear()


class BytesMap:
    """A string-to-bytes ``MapState`` or broadcast state. Ask ``contains`` before ``get``:
    a missing key's ``get`` raises in thread mode."""

    def __init__(self, state, coding: StateBytes):
        self.state, self.coding = state, coding

    def contains(self, key: str) -> bool:
        return self.state.contains(key)

    def get(self, key: str) -> bytes | None:
        return self.coding.decode(self.state.get(key))

    def put(self, key: str, raw: bytes) -> None:
        self.state.put(key, self.coding.encode(raw))

    def remove(self, key: str) -> None:
        self.state.remove(key)

    def keys(self):
        return self.state.keys()

    def items(self):
        return ((key, self.coding.decode(stored)) for key, stored in self.state.items())

    def clear(self) -> None:
        self.state.clear()


class BroadcastStates(NamedTuple):
    """The broadcast join's broadcast state: data type -> descriptor bytes and -> model id;
    ``member_key(data type, modelId)`` -> descriptor bytes and -> model id of the models
    published with a modelId; data type -> speculative set bytes; ``member_key(data type,
    entry_key)`` -> the job's repository entry of a model (``udfs.flink.model_repository``);
    data type -> its candidate's ``CandidateSlot`` bytes (``udfs.candidates``)."""

    descriptors: MapStateDescriptor
    ids: MapStateDescriptor
    slots: MapStateDescriptor
    slot_ids: MapStateDescriptor
    sets: MapStateDescriptor
    entries: MapStateDescriptor
    candidates: MapStateDescriptor


def broadcast_states(coding: StateBytes) -> BroadcastStates:
    """The descriptors the pipeline broadcasts with and the join reads through (one place,
    so both name and type them alike)."""
    strings = lambda name: MapStateDescriptor(name, Types.STRING(), Types.STRING())
    return BroadcastStates(descriptors=coding.map_descriptor("model-descriptors"),
                           ids=strings("model-ids"),
                           slots=coding.map_descriptor("model-slots"),
                           slot_ids=strings("model-slot-ids"),
                           sets=coding.map_descriptor("speculative-sets"),
                           entries=coding.map_descriptor("repository-entries"),
                           candidates=coding.map_descriptor("candidate-slots"))
