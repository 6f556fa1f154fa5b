"""``modelserving run`` (a job on a local Flink in this process) and ``jars fetch``."""
from __future__ import annotations

import argparse
import importlib
import os

from jobs import JOB_MODULES
from modelserving.paths import var_dir


def cmd_run(args) -> int:
    from modelserving.local.jars import connector_jar

    job_args = list(args.job_args)
    if not any(a.startswith("--rest-port") for a in job_args):
        job_args = ["--rest-port", "8081"] + job_args  # the local web UI where people expect it
    if not any(a.startswith("--connector-jar") for a in job_args) and "-h" not in job_args \
            and "--help" not in job_args:
        job_args = ["--connector-jar", str(connector_jar())] + job_args
    if not any(a.startswith("--checkpoint-dir") for a in job_args) \
            and not os.environ.get("MODELSERVING_CHECKPOINT_DIR"):
        # state (inline models, waiting records) over the 5 MB the JobManager's memory takes
        job_args = ["--checkpoint-dir", str(var_dir() / "checkpoints" / args.job)] + job_args
    importlib.import_module(JOB_MODULES[args.job]).main(job_args)
    return 0


def cmd_jars(args) -> int:
    from modelserving.local import jars
    return jars.main(["fetch"])


def register(sub) -> None:
    run = sub.add_parser("run", help="run a job on a local Flink (job settings follow; --help lists them)",
                         add_help=False)
    run.add_argument("job", choices=sorted(JOB_MODULES))
    run.add_argument("job_args", nargs=argparse.REMAINDER)
    run.set_defaults(func=cmd_run)

    jars = sub.add_parser("jars", help="fetch the pinned jars (checksums verified)")
    jars.add_argument("action", choices=["fetch"])
    jars.set_defaults(func=cmd_jars)
