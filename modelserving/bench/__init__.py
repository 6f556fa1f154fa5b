"""Benchmarks of the serving jobs against a plain loop, a pass-through job and in-process scoring.

The names of what is measured live here, light to import: the command, the runner and the
report share them.
"""
from jobs import JOB_MODULES
from udfs.runtimes import FORMAT_NAMES

JOBS: tuple[str, ...] = tuple(JOB_MODULES)
PLAIN_LOOP = "plain-loop"
PASS_THROUGH = "pass-through"
IN_PROCESS = "in-process"
#: Every system the benchmark can measure, in the order it measures them.
SYSTEMS: tuple[str, ...] = (*JOBS, PLAIN_LOOP, PASS_THROUGH, IN_PROCESS)
MODEL_TYPES: tuple[str, ...] = FORMAT_NAMES
