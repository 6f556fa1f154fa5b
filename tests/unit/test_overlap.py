"""The bookkeeping of batches awaiting their model server (udfs.flink.overlap): the codec
of a batch kept in keyed state, and the order and lifetime of the calls."""
from __future__ import annotations

import threading

import pytest

from udfs.flink.overlap import BatchesInFlight, PendingBatch


def test_a_pending_batch_comes_back_from_state_byte_for_byte():
    raws = (b"", b"\n\x00\xff{\"json\": 1}\n", bytes(range(256)))
    batch = PendingBatch("wine", -1, "0123abcd", raws, ((0, 7), (0, 8), (3, 1)))
    again = PendingBatch.decode(batch.encode())
    assert again == batch
    assert again.raws[1] == raws[1] and again.where[2] == (3, 1)


def test_a_pending_batch_whose_records_do_not_add_up_is_refused():
    stored = PendingBatch("wine", 0, "m", (b"abc",), ((0, 1),)).encode()
    with pytest.raises(ValueError, match="holds 4 record bytes, its header accounts for 3"):
        PendingBatch.decode(stored + b"x")


def test_batch_ids_order_as_the_batches_came_even_within_one_millisecond():
    in_flight = BatchesInFlight(2, clock=lambda: 1_700_000_000.0)
    try:
        ids = [in_flight.new_id(subtask=3) for _ in range(12)]
        assert sorted(ids) == ids and len(set(ids)) == 12
        assert ids[0].split("-")[1] == "00003"
    finally:
        in_flight.close()


def test_calls_run_side_by_side_and_are_forgotten_per_key():
    in_flight = BatchesInFlight(3)
    started, release = threading.Barrier(3, timeout=10), threading.Event()

    def call(value):
        started.wait()          # all three calls must be running at once to get past this
        release.wait(10)
        return [value]
    try:
        futures = [in_flight.submit("wine", f"b{i}", lambda i=i: call(i)) for i in range(3)]
        assert in_flight.count("wine") == 3 and in_flight.count("other") == 0
        release.set()
        assert [f.result(10) for f in futures] == [[0], [1], [2]]
        assert in_flight.future("wine", "b1") is futures[1]
        for i in range(3):
            in_flight.forget("wine", f"b{i}")
        assert in_flight.count("wine") == 0 and in_flight.future("wine", "b1") is None
    finally:
        in_flight.close()
