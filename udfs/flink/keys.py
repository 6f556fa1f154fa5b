"""How the jobs key their streams, and which parallel instance a key reaches.

The keyed job keys sub-batches of records (one data type each) and models by data type; the
broadcast job keys record batches by a spreading key chosen with Flink's own key-group
arithmetic, so every instance gets the same number of keys. The arithmetic is plain Python,
testable on its own.

Key selectors (and the keyed job's split of a batch by data type) run in Python for every
batch and model, in an operator of their own before the shuffle, where nothing can be
dead-lettered; an exception there would restart the job. So they never raise: a failure of
the project's own code is logged at ERROR with its stack trace (rate-limited, like every
internal error), counted in ``modelserving.internal_errors`` of that operator (a key
selector's in ``modelserving.key.internal_errors``), and the input gets a fallback key:

- keyed job (batches and models): the *failure key*, ``FAILED_KEY`` followed by the failure
  ("Type: message"). No data type starts with a NUL character. The join dead-letters
  whatever arrives under a failure key as INTERNAL_ERROR with that exception type (it cannot
  be served: its model lives under the data type the selector failed to read), and counts it
  in its ``internal_errors`` as any INTERNAL_ERROR dead letter;
- broadcast job (record batches): the first spreading key. The spreading key only spreads
  the load, so the batch is served as usual, by whichever instance owns that key.
"""
from __future__ import annotations

import logging
import zlib

from pyflink.datastream.functions import KeySelector

from udfs.errors import ModelError
from udfs.failures import FailureLog, describe
from udfs.models import parse_descriptor

log = logging.getLogger("modelserving")

#: The keyed job's failure key starts with this, and goes on with "Type: message" (cut to
#: ``FAILURE_KEY_CHARS``).
FAILED_KEY = "\x00key selection failed: "
FAILURE_KEY_CHARS = 200


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


def spread_key(partition: int, first_offset: int, keys: tuple[int, ...]) -> int:
    """Spreads the batches of one partition over every parallel instance: consecutive batches
    start at unrelated offsets, and a batch keeps its key when it is read again."""
    return keys[zlib.crc32(b"%d:%d" % (partition, first_offset)) % len(keys)]


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
    instance; keys picked blindly could leave an instance with none."""
    wanted = {index: [] for index in range(parallelism)}
    key = 0
    while any(len(keys) < per_instance for keys in wanted.values()):
        index = key_group_of(key, max_parallelism) * parallelism // max_parallelism
        if len(wanted[index]) < per_instance:
            wanted[index].append(key)
        key += 1
    return tuple(k for index in range(parallelism) for k in wanted[index])


def failure_key(exc: BaseException) -> str:
    """The keyed job's key of an input whose key selector failed with ``exc``."""
    return FAILED_KEY + describe(exc)[:FAILURE_KEY_CHARS]


def key_failure(key) -> str | None:
    """The failure ("Type: message") a failure key carries; None for any other key."""
    if isinstance(key, str) and key.startswith(FAILED_KEY):
        return key[len(FAILED_KEY):]
    return None


class Guarded:
    """A Python operator before the shuffle that never raises: a failure of ours is logged
    (rate-limited) and counted in the operator's ``modelserving.internal_errors``, and
    ``fallback`` gives the output instead."""

    where = "selecting a key"
    #: Metric groups under ``modelserving`` the counter goes in. PyFlink fuses a function and
    #: the key selector after it into one operator with one metric group, where two gauges of
    #: one name collide (Flink reports the first only).
    metric_groups: tuple[str, ...] = ()

    def __init__(self):
        self.internal_errors = 0
        self._failures: FailureLog | None = None

    def open(self, runtime_context) -> None:
        try:
            group = runtime_context.get_metrics_group().add_group("modelserving")
            for name in self.metric_groups:
                group = group.add_group(name)
            group.gauge("internal_errors", lambda: self.internal_errors)
        except Exception as exc:   # a missing metric must not stop the job either
            self.failures.failed("registering the operator's metric", exc)

    @property
    def failures(self) -> FailureLog:
        if self._failures is None:
            self._failures = FailureLog(log)
        return self._failures

    def guarded(self, value):
        try:
            return self.select(value)
        except Exception as exc:
            self.internal_errors += 1
            self.failures.failed(self.where, exc)
            return self.fallback(value, exc)

    def select(self, value):
        raise NotImplementedError

    def fallback(self, value, exc: Exception):
        raise NotImplementedError


class GuardedKey(Guarded, KeySelector):
    metric_groups = ("key",)

    def get_key(self, value):
        return self.guarded(value)


class DataTypeKey(GuardedKey):
    """The keyed job's keys: a data type ("" when there is none or it does not parse: the
    join dead-letters such input); the failure key when reading it fails."""

    def fallback(self, value, exc):
        return failure_key(exc)


class BatchDataType(DataTypeKey):
    """Key of a sub-batch of records (``udfs.flink.batches.DATA_TYPE_BATCH``)."""

    where = "selecting the key of a batch"

    def select(self, batch):
        return batch[0]


class ModelDataType(DataTypeKey):
    """Key of a models-topic message (``udfs.flink.batches.MODEL_MESSAGE``)."""

    where = "selecting the key of a model"

    def select(self, message):
        return model_data_type(message[2])


class SpreadKey(GuardedKey):
    """The broadcast job's key of a record batch: one of ``keys`` by its partition and first
    offset (see ``spread_key``); the first of them when that fails."""

    where = "selecting the spreading key of a batch"

    def __init__(self, keys: tuple[int, ...]):
        super().__init__()
        self.keys = tuple(keys)

    def select(self, batch):
        return spread_key(batch[0], batch[1][0], self.keys)

    def fallback(self, value, exc):
        return self.keys[0]
