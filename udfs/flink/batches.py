"""The elements that cross between Flink's JVM side and the jobs' Python functions: batches.

Entering Python costs about as much as everything else a record needs, so the jobs enter it
once per batch of records, never once per record, on the way in and on the way out. Flink
forms the batches on its JVM side (``jobs.pipeline``: a processing-time tumbling window of
``batch_max_wait_ms`` per Kafka partition, ``ARRAY_AGG`` of the values and their offsets);
the joins answer a batch with one batch of results, which Flink flattens on its JVM side
again (``UNNEST``) before the results topic. Dead letters are rare and cross one by one.

Every batch keeps where its records came from (partition and offsets), so a dead letter
names the Kafka position of its input.
"""
from __future__ import annotations

import logging
from typing import Iterator, Sequence

from pyflink.common import Row, Types
from pyflink.datastream import FlatMapFunction

from udfs.flink.keys import Guarded, failure_key
from udfs.records import record_data_type

log = logging.getLogger("modelserving")

BYTES = Types.PRIMITIVE_ARRAY(Types.BYTE())
#: Records of one window of one partition: their offsets and bytes, in partition order.
RECORD_BATCH = Types.ROW_NAMED(["partition", "offsets", "records"],
                               [Types.INT(), Types.OBJECT_ARRAY(Types.LONG()),
                                Types.OBJECT_ARRAY(BYTES)])
#: The keyed job's sub-batch: the records of one data type from one record batch.
DATA_TYPE_BATCH = Types.ROW_NAMED(["dataType", "partition", "offsets", "records"],
                                  [Types.STRING(), Types.INT(), Types.OBJECT_ARRAY(Types.LONG()),
                                   Types.OBJECT_ARRAY(BYTES)])
#: A join's answer to a batch: ServingResult bytes, in the batch's order.
RESULT_BATCH = Types.ROW_NAMED(["results"], [Types.OBJECT_ARRAY(BYTES)])
#: One message of the models topic, with its position.
MODEL_MESSAGE = Types.ROW_NAMED(["partition", "offset", "descriptor"],
                                [Types.INT(), Types.LONG(), BYTES])


def positions(partition: int, offsets: Sequence[int]) -> list[tuple[int, int]]:
    return [(partition, offset) for offset in offsets]


def by_data_type(records: Sequence[bytes]) -> dict[str, list[int]]:
    """Indexes of ``records`` per data type, in arrival order ("" for a record whose data type
    cannot be read: the join dead-letters it with the reason)."""
    groups: dict[str, list[int]] = {}
    for index, raw in enumerate(records):
        groups.setdefault(record_data_type(raw), []).append(index)
    return groups


def chunks(indexes: list[int], size: int) -> Iterator[list[int]]:
    """``indexes`` in pieces of at most ``size``: one model call scores one piece."""
    for start in range(0, len(indexes), size):
        yield indexes[start:start + size]


def split_by_data_type(batch) -> list[Row]:
    """The keyed job's sub-batches of a record batch: one per data type, each keeping its
    records' offsets."""
    partition, offsets, records = batch[0], batch[1], batch[2]
    return [Row(data_type, partition, [offsets[i] for i in indexes], [records[i] for i in indexes])
            for data_type, indexes in by_data_type(records).items()]


class SplitByDataType(Guarded, FlatMapFunction):
    """``split_by_data_type`` that never raises (see ``udfs.flink.keys``): when splitting
    fails (a bug of ours), the whole batch goes on under the failure key, and the join
    dead-letters its records with the failure."""

    where = "splitting a batch by data type"

    def flat_map(self, batch):
        return self.guarded(batch)

    def select(self, batch):
        return split_by_data_type(batch)

    def fallback(self, batch, exc):
        return [Row(failure_key(exc), batch[0], batch[1], batch[2])]
