"""The broadcast ("flat") join: every model goes to every parallel instance.

Scales with the data volume of one or a few data types: record batches are spread over all
instances by a spreading key (not the data type), and each instance scores with the model
for each record's data type held in broadcast state. For a moment after an update, instances
may disagree on the current model ("model jitter").

    python -m jobs.broadcast_job --bootstrap-servers host:9092 --parallelism 2
"""
from __future__ import annotations

import sys

from pyflink.common import Types
from pyflink.datastream import DataStream

from jobs.pipeline import run_job, stats_producer_config
from jobs.settings import Settings
from udfs.flink.batches import RESULT_BATCH
from udfs.flink.joins import BroadcastServing, dead_letters_of
from udfs.flink.keys import SpreadKey, balanced_spread_keys
from udfs.flink.state_bytes import StateBytes, broadcast_states

JOB = "broadcast"


def build_pipeline(batches: DataStream, models: DataStream, settings: Settings,
                   serving: BroadcastServing | None = None) -> tuple[DataStream, DataStream]:
    """Record batches and models-topic messages in; result batches and dead-letter bytes out
    (``udfs.flink.batches``). The spreading key never raises (see ``udfs.flink.keys``).
    ``serving`` replaces the join function (tests observe the join through a subclass)."""
    if serving is None:
        serving = BroadcastServing(settings, stats_producer_config(settings))
    broadcast_models = models.broadcast(*broadcast_states(StateBytes.of(settings)))
    parallelism = settings.parallelism or batches.get_execution_environment().get_parallelism()
    keys = balanced_spread_keys(parallelism, settings.spread_keys)
    results = batches.key_by(SpreadKey(keys), key_type=Types.INT()) \
        .connect(broadcast_models) \
        .process(serving, output_type=RESULT_BATCH) \
        .name("serve models (broadcast)").uid("broadcast-serving")
    return results, dead_letters_of(results)


def main(argv: list[str] | None = None) -> None:
    run_job(JOB, build_pipeline, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
