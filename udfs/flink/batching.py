"""Micro-batching of records per key: when a key's pending records are scored.

A key's records wait in keyed list state (so a checkpoint taken while they wait holds them)
and are scored together when the batch is full, when its wait timer fires, when the join
asks (before a keyed model change) or when a bounded input ends. Written against the little
of Flink it needs, so the state machine is tested without a JVM:

- ``pending``: the keyed list state of the current key (``get``, ``add``, ``clear``);
- ``timers``: a timer service (``current_processing_time``,
  ``register_processing_time_timer``, ``register_event_time_timer``).
"""
from __future__ import annotations

from typing import Callable, Hashable, Iterator

#: Event time of the end-of-input flush timer: only the final watermark of a bounded input
#: reaches it (the Kafka jobs have no watermarks), so a finite stream never ends with records
#: still waiting for their processing-time timer.
END_OF_INPUT = 2 ** 62


class MicroBatcher:
    """The pending records of every key of one parallel instance.

    Each key's records are mirrored in memory, so scoring a batch costs no state read (a round
    trip to the JVM); a key's list state is read once, at its first use after a (re)start,
    which is how records restored from a checkpoint are found."""

    def __init__(self, pending, max_size: int, max_wait_ms: int):
        self.pending = pending
        self.max_size = max_size
        self.max_wait_ms = max_wait_ms
        self._records: dict = {}          # key -> the records in its list state
        self._read: set = set()           # keys whose list state was read since (re)start
        self._flush_due: dict = {}        # key -> processing time of its registered flush timer
        self._end_timers: set = set()     # keys whose end-of-input timer is registered

    def add(self, key: Hashable, raw: bytes, timers) -> list[bytes]:
        """Add a record of the current ``key``. Returns the batch to score now when that
        filled it, else [] (and the key's timers are registered)."""
        batch = self._pending(key)
        self.pending.add(raw)
        batch.append(raw)
        if len(batch) >= self.max_size:
            return self.take(key)
        if key not in self._flush_due:
            due = timers.current_processing_time() + self.max_wait_ms
            timers.register_processing_time_timer(due)
            self._flush_due[key] = due
        if key not in self._end_timers:
            timers.register_event_time_timer(END_OF_INPUT)
            self._end_timers.add(key)
        return []

    def take(self, key: Hashable) -> list[bytes]:
        """Everything pending for the current ``key``, in arrival order, now no longer pending."""
        raws = self._pending(key)
        if not raws:
            return []
        self._records[key] = []
        self.pending.clear()
        return raws

    def on_processing_timer(self, key: Hashable, timestamp: int) -> list[bytes]:
        """A processing-time timer of ``key`` fired: the batch when its wait is over. Other
        timers of the key (statistics) fire too, and must not flush a batch early."""
        due = self._flush_due.get(key)
        if due is not None and due > timestamp:
            return []
        # (due is None after a restore: flushing early is harmless, losing a timer is not)
        self._flush_due.pop(key, None)
        return self.take(key)

    def forget_timer(self, key: Hashable) -> None:
        """The flush timer of ``key`` is gone (it fired and the flush failed): the key's next
        record registers a new one, so later records do not wait for a full batch."""
        self._flush_due.pop(key, None)

    def on_end_of_input(self, key: Hashable) -> list[bytes]:
        """The END_OF_INPUT timer of ``key`` fired: the input is over, score what is left."""
        self._end_timers.discard(key)
        return self.take(key)

    def batches(self, raws: list[bytes], data_type_of: Callable[[bytes], str]
                ) -> Iterator[tuple[str, list[bytes]]]:
        """(data type, records) batches of ``raws``: one data type each, in arrival order,
        none over ``max_size`` (a restore may bring more records than a batch holds)."""
        by_type: dict[str, list[bytes]] = {}
        for raw in raws:
            by_type.setdefault(data_type_of(raw), []).append(raw)
        for data_type, records in by_type.items():
            for start in range(0, len(records), self.max_size):
                yield data_type, records[start:start + self.max_size]

    def _pending(self, key: Hashable) -> list[bytes]:
        if key not in self._read:   # first use since (re)start: records restored?
            self._records[key] = list(self.pending.get() or ())
            self._read.add(key)
        return self._records.setdefault(key, [])
