"""Benchmarks of the serving jobs against Python peers, a pass-through job and in-process scoring.

The names of what is measured live here, light to import: the command, the runner, the
report and the peers share them.
"""
from jobs import JOB_MODULES
from udfs.runtimes import FORMAT_NAMES

JOBS: tuple[str, ...] = tuple(JOB_MODULES)
PLAIN_LOOP = "plain-loop"
QUIX = "quix"
BYTEWAX = "bytewax"
CONFLUENT_LOOP = "confluent-loop"
CONFLUENT_LOOP_2P = "confluent-loop-2p"
#: Model serving without Flink, each in its own process(es) (``modelserving.bench.peers``).
PEERS: tuple[str, ...] = (PLAIN_LOOP, QUIX, BYTEWAX, CONFLUENT_LOOP, CONFLUENT_LOOP_2P)
#: The keyed job with its records spread over four data types (four keys, one model each).
KEYED_FOUR_TYPES = "keyed-4types"
#: How many data types a system's records spread over, when not one.
DATA_TYPES_PER_SYSTEM: dict[str, int] = {KEYED_FOUR_TYPES: 4}
PASS_THROUGH = "pass-through"
IN_PROCESS = "in-process"
#: Every system the benchmark can measure, in the order it measures them.
SYSTEMS: tuple[str, ...] = (*JOBS, KEYED_FOUR_TYPES, *PEERS, PASS_THROUGH, IN_PROCESS)
MODEL_TYPES: tuple[str, ...] = FORMAT_NAMES
