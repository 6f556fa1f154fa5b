"""``modelserving``: the one command for people.

    modelserving demo                      everything below, on an embedded local Kafka
    modelserving kafka start|stop|status   a local single-node Kafka (KRaft)
    modelserving topics create             the job's topics
    modelserving train                     one demo model per supported format
    modelserving publish model PATH ...    a model, inline or by location (--validation, --reference;
                                           --canary SHARE or --shadow: beside the serving model)
    modelserving validate PATH --data FILE a model's validation gate, offline (exit 1: it fails)
    modelserving models list|show|history|rollback   the model repository (what served when)
    modelserving models promote|abort TYPE the data type's canary or shadow takes over, or is dropped
    modelserving publish records ...       records from a CSV file or the demo dataset
    modelserving follow                    results and dead letters, readably
    modelserving run keyed [settings]      a job on a local Flink (web UI on :8081)
    modelserving cluster|submit|jobs|savepoint|resume|cancel   a local Flink cluster
    modelserving state serve               the live model state over HTTP
    modelserving mlserver start|stop       a local MLServer serving the demo model (EXTERNAL)
    modelserving jars fetch                the pinned jars (Kafka connector, Kafka broker)
    modelserving bench [--quick]           every system side by side (when installed)

Job settings (``--bootstrap-servers``, ``--models-topic``, ``--sasl-username``...) are
accepted anywhere on the line by every command that talks to Kafka, and read from
``MODELSERVING_*`` variables; ``modelserving run keyed --help`` lists them all.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
from importlib.metadata import entry_points

from jobs.settings import SettingsError
from modelserving.errors import ToolError, UsageError

#: The command groups of this package; each module has ``register(subparsers)``.
COMMAND_MODULES = ("kafka", "publish", "lifecycle", "models", "jobs", "cluster", "state", "demo", "mlserver")
#: Entry-point group through which other packages add command groups (the benchmark does).
PLUGIN_GROUP = "modelserving.commands"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="modelserving", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug logging, and the details of a failure")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(f"{__name__}.{name}").register(sub)
    for plugin in entry_points(group=PLUGIN_GROUP):
        plugin.load()(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    verbose = "-v" in (argv if argv is not None else sys.argv[1:]) or \
        "--verbose" in (argv if argv is not None else sys.argv[1:])
    try:
        parser = build_parser()   # defaults read settings too: a bad variable fails here
        args, unknown = parser.parse_known_args(argv)
        if getattr(args, "takes_settings", False):
            args.job_args = list(getattr(args, "job_args", None) or []) + unknown
        elif unknown:
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        if not args.verbose:
            logging.getLogger("kafka").setLevel(logging.CRITICAL)
        return args.func(args) or 0
    except (ToolError, SettingsError) as exc:
        return report_failure(exc, verbose=verbose)
    except KeyboardInterrupt:
        return 130


def report_failure(exc: Exception, verbose: bool = False) -> int:
    """An expected failure: one line on stderr (all of it with ``-v``), a non-zero exit."""
    text = str(exc).strip() or type(exc).__name__
    first, _, rest = text.partition("\n")
    if verbose and rest:
        print(f"modelserving: {text}", file=sys.stderr)
    else:
        print(f"modelserving: {first}" + (" (details: add -v)" if rest else ""), file=sys.stderr)
    if isinstance(exc, ToolError):
        return exc.exit_code
    return UsageError.exit_code


if __name__ == "__main__":
    sys.exit(main())
