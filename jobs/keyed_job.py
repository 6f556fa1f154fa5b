"""The keyed join: records and models keyed by data type meet in a KeyedCoProcessFunction.

Scales with the number of data types; all records of one data type are scored on one
subtask, which holds that data type's model in keyed state.

    python -m jobs.keyed_job --bootstrap-servers host:9092 --parallelism 2
"""
from __future__ import annotations

import sys

from pyflink.common import Types
from pyflink.datastream import DataStream

from jobs.pipeline import run_job, stats_producer_config
from jobs.settings import Settings
from udfs.flink.batches import DATA_TYPE_BATCH, RESULT_BATCH, SplitByDataType
from udfs.flink.joins import KeyedServing, dead_letters_of
from udfs.flink.keys import BatchDataType, ModelDataType

JOB = "keyed"


def build_pipeline(batches: DataStream, models: DataStream, settings: Settings,
                   serving: KeyedServing | None = None) -> tuple[DataStream, DataStream]:
    """Record batches and models-topic messages in; result batches and dead-letter bytes out
    (``udfs.flink.batches``).

    Each record batch is split by data type (one Python crossing per batch, chained with the
    key selector), and each data type's sub-batch meets its model in the join: one more
    crossing per sub-batch, and one per batch of results. The split and the selectors never
    raise (see ``udfs.flink.keys``). ``serving`` replaces the join function (tests observe
    the join through a subclass)."""
    if serving is None:
        serving = KeyedServing(settings, stats_producer_config(settings))
    by_data_type = batches.flat_map(SplitByDataType(), output_type=DATA_TYPE_BATCH) \
        .name("split batches by data type").uid("keyed-split")
    results = by_data_type.connect(models) \
        .key_by(BatchDataType(), ModelDataType(), key_type=Types.STRING()) \
        .process(serving, output_type=RESULT_BATCH) \
        .name("serve models (keyed by data type)").uid("keyed-serving")
    return results, dead_letters_of(results)


def main(argv: list[str] | None = None) -> None:
    run_job(JOB, build_pipeline, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
