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
from udfs.flink.joins import BYTES, DEAD_LETTERS, KeyedServing
from udfs.flink.keys import ModelDataType, RecordDataType

JOB = "keyed"


def build_pipeline(data: DataStream, models: DataStream, settings: Settings,
                   serving: KeyedServing | None = None) -> tuple[DataStream, DataStream]:
    """Raw record and descriptor bytes in; raw ServingResult and DeadLetter bytes out.

    The key selectors read the data type straight from the bytes; the join gets the bytes
    and the key, so a record crosses into Python once before the shuffle and once to be
    scored, with nothing but its bytes in either crossing. The selectors never raise (see
    ``udfs.flink.keys``). ``serving`` replaces the join function (tests observe the join
    through a subclass)."""
    if serving is None:
        serving = KeyedServing(settings, stats_producer_config(settings))
    results = data.connect(models) \
        .key_by(RecordDataType(), ModelDataType(), key_type=Types.STRING()) \
        .process(serving, output_type=BYTES) \
        .name("serve models (keyed by data type)").uid("keyed-serving")
    return results, results.get_side_output(DEAD_LETTERS)


def main(argv: list[str] | None = None) -> None:
    run_job(JOB, build_pipeline, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
