"""Several batches of EXTERNAL models in flight per key, so a subtask is not bound to one
model-server call at a time.

A synchronous call holds the subtask for the server's whole round trip (about 10 ms to
MLServer here, so at most ~100 batches a second per subtask, whatever the server could take).
Instead a batch whose data type is served by an EXTERNAL model is called from a small thread
pool, and its records wait in keyed state (``PendingBatch``) until the answer is collected: by
a processing-time timer, by the next batch of the key once ``limit`` batches are in flight
(which waits for the oldest: back-pressure), or at the end of a bounded input. Because the
records are in keyed state, a checkpoint holds the calls in flight; after a restore they are
called again, so nothing is lost and exactly-once still holds (results are emitted only once
a batch leaves state).

This module keeps the bookkeeping and the batch codec; it imports no pyflink.
"""
from __future__ import annotations

import itertools
import json
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

#: How soon the timer looks again for answers while batches are in flight.
POLL_MS = 5
#: Event time of the timer that empties the key at the end of a bounded input (the final
#: watermark fires every event-time timer; records never carry such a time).
FLUSH_AT_MS = 2 ** 62


@dataclass(frozen=True)
class PendingBatch:
    """A batch of one data type waiting for its model server: what answering it needs."""

    data_type: str
    part: int
    model_id: str                       # the model it was sent to (digest of its descriptor)
    raws: tuple[bytes, ...]
    where: tuple[tuple[int, int], ...]  # Kafka (partition, offset) of each record

    def encode(self) -> bytes:
        """A JSON header line, then the records back to back (their sizes are in the header):
        plain data, nothing executable."""
        header = {"dataType": self.data_type, "part": self.part, "modelId": self.model_id,
                  "sizes": [len(raw) for raw in self.raws], "where": self.where}
        return json.dumps(header, separators=(",", ":")).encode() + b"\n" + b"".join(self.raws)

    @classmethod
    def decode(cls, stored: bytes) -> "PendingBatch":
        line, _, body = stored.partition(b"\n")
        header = json.loads(line)
        raws, start = [], 0
        for size in header["sizes"]:
            raws.append(body[start:start + size])
            start += size
        if start != len(body):
            raise ValueError(f"a pending batch holds {len(body)} record bytes, its header "
                             f"accounts for {start}")
        return cls(data_type=header["dataType"], part=header["part"], model_id=header["modelId"],
                   raws=tuple(raws), where=tuple((p, o) for p, o in header["where"]))


class BatchesInFlight:
    """The calls of one subtask: a thread pool and, per key, its batches' futures by id.

    Only the futures live here; the batches themselves are in keyed state. Batch ids order
    as the batches came, so answers are emitted oldest first."""

    def __init__(self, limit: int, clock: Callable[[], float] = time.time):
        self.limit = limit
        self.pool = ThreadPoolExecutor(max_workers=limit, thread_name_prefix="model-server-call")
        self.futures: dict[object, dict[str, Future]] = {}
        self._sequence = itertools.count()
        self._clock = clock

    def new_id(self, subtask: int) -> str:
        """Unique within the job (subtask, start time and a sequence), ordered within a subtask."""
        return f"{int(self._clock() * 1000):015d}-{subtask:05d}-{next(self._sequence):012d}"

    def submit(self, key, batch_id: str, call: Callable[[], list]) -> Future:
        future = self.pool.submit(call)
        self.futures.setdefault(key, {})[batch_id] = future
        return future

    def future(self, key, batch_id: str) -> Future | None:
        return self.futures.get(key, {}).get(batch_id)

    def forget(self, key, batch_id: str) -> None:
        of_key = self.futures.get(key)
        if of_key is not None:
            of_key.pop(batch_id, None)
            if not of_key:
                del self.futures[key]

    def count(self, key) -> int:
        return len(self.futures.get(key, ()))

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.futures.clear()
