"""The keyed join: records and models keyed by data type meet in a KeyedCoProcessFunction.

Scales with the number of data types; all records of one data type are scored on one
subtask, which holds that data type's model in keyed state.

    python -m jobs.keyed_job --bootstrap-servers host:9092 --parallelism 2
"""
from __future__ import annotations

import sys

from pyflink.common import Types
from pyflink.datastream import DataStream

from jobs.pipeline import run_job
from jobs.settings import Settings
from udfs.joins import BYTES, DEAD_LETTERS, KEYED_BYTES, KeyedServing, keyed_model, keyed_record

JOB = "keyed"


def data_type_of(pair) -> str:
    return pair[0]


def build_pipeline(data: DataStream, models: DataStream, settings: Settings) -> tuple[DataStream, DataStream]:
    """Raw record and descriptor bytes in; raw ServingResult and DeadLetter bytes out."""
    keyed_data = data.map(keyed_record, output_type=KEYED_BYTES) \
        .name("record data type").uid("keyed-record-data-type")
    keyed_models = models.map(keyed_model, output_type=KEYED_BYTES) \
        .name("model data type").uid("keyed-model-data-type")
    results = keyed_data.connect(keyed_models) \
        .key_by(data_type_of, data_type_of, key_type=Types.STRING()) \
        .process(KeyedServing(settings), output_type=BYTES) \
        .name("serve models (keyed by data type)").uid("keyed-serving")
    return results, results.get_side_output(DEAD_LETTERS)


def main(argv: list[str] | None = None) -> None:
    run_job(JOB, build_pipeline, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
