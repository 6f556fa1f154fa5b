"""How the jobs key their streams, and which parallel instance a key reaches.

The keyed job keys records and models by data type; the broadcast job keys records by a
spreading key chosen with Flink's own key-group arithmetic, so every instance gets the same
number of keys. Plain Python (no pyflink), so the arithmetic is testable on its own.
"""
from __future__ import annotations

import zlib

from udfs.errors import ModelError
from udfs.models import parse_descriptor


def subtask_index(runtime_context) -> int:
    """Index of this parallel instance, from a PyFlink ``RuntimeContext``."""
    try:
        return runtime_context.get_index_of_this_subtask()
    except AttributeError:
        # PyFlink 2.2 in thread mode asks the Java RuntimeContext for getIndexOfThisSubtask,
        # which Flink 2 moved to its TaskInfo
        return runtime_context._runtime_context.getTaskInfo().getIndexOfThisSubtask()


def model_data_type(raw: bytes) -> str:
    """Key of a model descriptor: its data type; "" when it does not parse (it is
    dead-lettered by the join)."""
    try:
        return parse_descriptor(raw).dataType
    except ModelError:
        return ""


def spread_key(raw: bytes, keys: tuple[int, ...]) -> int:
    """Spreads the records of one data type over every parallel instance; a hash of the
    bytes keeps a record's key stable across restarts."""
    return keys[zlib.crc32(raw) % len(keys)]


def _rotate_left(value: int, bits: int) -> int:
    return ((value << bits) | (value >> (32 - bits))) & 0xFFFFFFFF


def key_group_of(key: int, max_parallelism: int) -> int:
    """Flink's key group of a PyFlink INT key: murmur3's mixing of the key's Java hashCode,
    modulo the maximum parallelism. PyFlink keys by a one-field Row, whose hashCode is
    key + 62; a job test checks the whole computation against Flink's own routing."""
    h = (key + 62) & 0xFFFFFFFF
    h = _rotate_left((h * 0xCC9E2D51) & 0xFFFFFFFF, 15)
    h = _rotate_left((h * 0x1B873593) & 0xFFFFFFFF, 13)
    h = (h * 5 + 0xE6546B64) & 0xFFFFFFFF
    h ^= 4
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & 0xFFFFFFFF
    h ^= h >> 16
    signed = h - (1 << 32) if h & 0x80000000 else h
    positive = -signed if signed != -(1 << 31) else 0
    return (signed if signed >= 0 else positive) % max_parallelism


def balanced_spread_keys(parallelism: int, per_instance: int, max_parallelism: int = 128) -> tuple[int, ...]:
    """Spreading keys that Flink routes evenly: ``per_instance`` keys for every parallel
    instance. Few keys mean full micro-batches (a batch is per key); keys picked blindly
    could leave an instance with none."""
    wanted = {index: [] for index in range(parallelism)}
    key = 0
    while any(len(keys) < per_instance for keys in wanted.values()):
        index = key_group_of(key, max_parallelism) * parallelism // max_parallelism
        if len(wanted[index]) < per_instance:
            wanted[index].append(key)
        key += 1
    return tuple(k for index in range(parallelism) for k in wanted[index])
