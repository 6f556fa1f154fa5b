"""CLI commands for a local standalone Flink cluster and the jobs on it.

    modelserving cluster start|stop|status [--workdir var/flink] [--rest-port 8081]
    modelserving submit keyed|broadcast [job settings ...]      job id and web UI address
    modelserving jobs                                           the cluster's jobs
    modelserving savepoint JOB_ID                               stop with a savepoint
    modelserving cancel JOB_ID
    modelserving resume keyed|broadcast --from SAVEPOINT [job settings ...]

The cluster's state (configuration, logs, checkpoints, savepoints) lives in ``--workdir``
(default ``var/flink``); every command but ``cluster start`` finds the cluster's port there,
so ``--rest-port`` is needed only to start one, or to reach a cluster not started here.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from jobs import JOB_MODULES
from jobs.settings import Settings
from modelserving.errors import FlinkClusterError, UsageError
from modelserving.paths import var_dir


def _cluster(args, for_start: bool = False):
    from modelserving.local.flink_cluster import LocalFlinkCluster

    workdir = Path(args.workdir)
    if for_start:
        return LocalFlinkCluster(workdir, rest_port=args.rest_port or 8081, slots=args.slots,
                                 taskmanagers=args.taskmanagers)
    cluster = LocalFlinkCluster.attach(workdir)
    if args.rest_port:
        cluster.rest_port = args.rest_port
    return cluster


#: Options of these commands that may also follow the job name (argparse hands everything
#: after it to the job settings): option -> (attribute, takes a value).
OWN_OPTIONS = {"--workdir": ("workdir", True), "--rest-port": ("rest_port", True),
               "--from": ("savepoint", True), "--allow-non-restored": ("allow_non_restored", False)}


def _split_own_options(args, job_args: list[str]) -> list[str]:
    """Move this command's own options out of the job settings onto ``args``.

    ``--rest-port`` is the cluster's port here: ``submit`` always tells the job the port of
    the cluster it runs on."""
    rest = []
    items = iter(job_args)
    for arg in items:
        name, _, inline = arg.partition("=")
        if name in OWN_OPTIONS:
            attr, takes_value = OWN_OPTIONS[name]
            if not takes_value:
                setattr(args, attr, True)
                continue
            value = inline or next(items, None)
            if value is None:
                raise UsageError(f"{name} needs a value")
            setattr(args, attr, int(value) if attr == "rest_port" else value)
        else:
            rest.append(arg)
    return rest


def _check_settings(job: str, job_args: list[str]) -> bool:
    """Validate the job settings here (a typo fails in a second, not after `flink run`);
    print the settings' help for -h/--help. Returns False when only help was asked for."""
    if "-h" in job_args or "--help" in job_args:
        parser = argparse.ArgumentParser(prog=f"modelserving submit {job}",
                                         description="job settings (also MODELSERVING_* variables)")
        Settings.argument_parser(parser).print_help()
        return False
    Settings.from_sources(job_args)
    return True


def _submit(args, job_args: list[str], savepoint: str | None = None,
            allow_non_restored: bool = False) -> int:
    module = JOB_MODULES[args.job]
    if not _check_settings(args.job, job_args):
        return 0
    cluster = _cluster(args)
    _require_running(cluster)
    started = time.monotonic()
    job_id = cluster.submit(module, job_args, savepoint=savepoint,
                            allow_non_restored=allow_non_restored)
    how = f" from {savepoint}" if savepoint else ""
    print(f"submitted {module}{how} as job {job_id} ({time.monotonic() - started:.1f} s)")
    print(f"web UI: {cluster.web_ui(job_id)}")
    return 0


def _require_running(cluster) -> None:
    if not cluster.is_running():
        raise FlinkClusterError(f"no Flink cluster answers at {cluster.url}; "
                                "start one with: modelserving cluster start")


def cmd_cluster(args) -> int:
    if args.action == "start":
        cluster = _cluster(args, for_start=True)
        started = time.monotonic()
        cluster.start(timeout=args.timeout)
        print(f"Flink running: web UI {cluster.url} ({cluster.taskmanagers} TaskManager(s) with "
              f"{cluster.slots} slots, state in {cluster.workdir}, started in "
              f"{time.monotonic() - started:.1f} s); stop with: modelserving cluster stop")
        return 0
    cluster = _cluster(args)
    if args.action == "stop":
        running = [j for j in _jobs(cluster) if j["state"] == "RUNNING"]
        if running:
            print(f"stopping with {len(running)} running job(s); their state survives only in "
                  "retained checkpoints (use `modelserving savepoint JOB_ID` first to keep it)")
        cluster.stop()
        print(f"Flink stopped ({cluster.workdir})")
        return 0
    if not cluster.is_running():
        print(f"Flink ({cluster.workdir}): not running")
        return 1
    reaped = cluster.reap_orphans()
    if reaped:
        lost = ", ".join(sorted(set(reaped.values())))
        print(f"ended {len(reaped)} process(es) left behind by lost TaskManager(s) ({lost}): "
              f"pids {', '.join(map(str, sorted(reaped)))}")
    tms = cluster.rest("/taskmanagers").get("taskmanagers", [])
    jobs = _jobs(cluster)
    free = sum(tm.get("freeSlots", 0) for tm in tms)
    total = sum(tm.get("slotsNumber", 0) for tm in tms)
    running = sum(1 for j in jobs if j["state"] == "RUNNING")
    print(f"Flink running: web UI {cluster.url}, {len(tms)} TaskManager(s), {free} of {total} "
          f"slots free, {running} running job(s) ({cluster.workdir})")
    return 0


def _jobs(cluster) -> list[dict]:
    try:
        return cluster.list_jobs()
    except FlinkClusterError:
        return []


def cmd_submit(args) -> int:
    job_args = _split_own_options(args, list(args.job_args))
    return _submit(args, job_args, savepoint=getattr(args, "savepoint", None),
                   allow_non_restored=getattr(args, "allow_non_restored", False))


def cmd_resume(args) -> int:
    job_args = _split_own_options(args, list(args.job_args))
    if not args.savepoint:
        raise UsageError("resume: --from SAVEPOINT is required")
    return _submit(args, job_args, savepoint=args.savepoint,
                   allow_non_restored=args.allow_non_restored)


def cmd_jobs(args) -> int:
    cluster = _cluster(args)
    _require_running(cluster)
    jobs = cluster.list_jobs()
    if not jobs:
        print("no jobs")
        return 0
    print(f"{'JOB ID':<34}{'STATE':<13}{'STARTED':<21}{'TASKS':<8}NAME")
    for job in jobs:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(job["start-time"] / 1000))
        tasks = job.get("tasks", {})
        print(f"{job['jid']:<34}{job['state']:<13}{started:<21}"
              f"{tasks.get('running', 0)}/{tasks.get('total', 0):<6}{job['name']}")
    return 0


def cmd_savepoint(args) -> int:
    cluster = _cluster(args)
    started = time.monotonic()
    path = cluster.stop_with_savepoint(args.job_id, args.directory, timeout=args.timeout)
    print(f"job {args.job_id} stopped with a savepoint ({time.monotonic() - started:.1f} s):")
    print(path)
    print(f"resume with: modelserving resume <keyed|broadcast> --from {path} [job settings]")
    return 0


def cmd_cancel(args) -> int:
    cluster = _cluster(args)
    state = cluster.cancel(args.job_id)
    print(f"job {args.job_id}: {state}")
    return 0


def register(subparsers) -> None:
    """Add the cluster subcommands to the ``modelserving`` parser."""
    def where(p: argparse.ArgumentParser, rest_port_help: str) -> argparse.ArgumentParser:
        p.add_argument("--workdir", default=str(var_dir() / "flink"),
                       help="the cluster's configuration, logs, checkpoints and savepoints "
                            "(default: %(default)s)")
        p.add_argument("--rest-port", type=int, default=None, help=rest_port_help)
        return p

    found = "REST port of the cluster; default: the one started in --workdir"

    cluster = where(subparsers.add_parser(
        "cluster", help="a local standalone Flink cluster (from the pyflink distribution)"),
        "REST / web UI port (start: default 8081; others: the port of the running cluster)")
    cluster.add_argument("action", choices=["start", "stop", "status"])
    cluster.add_argument("--slots", type=int, default=2, help="task slots per TaskManager")
    cluster.add_argument("--taskmanagers", type=int, default=1)
    cluster.add_argument("--timeout", type=float, default=120, help="seconds to wait for start")
    cluster.set_defaults(func=cmd_cluster)

    submit = where(subparsers.add_parser(
        "submit", help="submit a job to the local cluster (flink run)",
        description="Submit a job with `flink run`; job settings as for `modelserving run` "
                    "(`modelserving submit keyed --help` lists them)."), found)
    submit.add_argument("job", choices=sorted(JOB_MODULES))
    submit.add_argument("job_args", nargs=argparse.REMAINDER, help="job settings")
    submit.set_defaults(func=cmd_submit)

    resume = where(subparsers.add_parser(
        "resume", help="submit a job restored from a savepoint (or retained checkpoint)"), found)
    resume.add_argument("job", choices=sorted(JOB_MODULES))
    resume.add_argument("--from", dest="savepoint", help="savepoint or checkpoint path")
    resume.add_argument("--allow-non-restored", action="store_true",
                        help="skip savepoint state of operators the job no longer has")
    resume.add_argument("job_args", nargs=argparse.REMAINDER, help="job settings")
    resume.set_defaults(func=cmd_resume)

    jobs = where(subparsers.add_parser("jobs", help="list the cluster's jobs"), found)
    jobs.set_defaults(func=cmd_jobs)

    savepoint = where(subparsers.add_parser(
        "savepoint", help="stop a job with a savepoint and print its path"), found)
    savepoint.add_argument("job_id")
    savepoint.add_argument("--directory", help="target directory (default: the cluster's savepoints/)")
    savepoint.add_argument("--timeout", type=float, default=120)
    savepoint.set_defaults(func=cmd_savepoint)

    cancel = where(subparsers.add_parser("cancel", help="cancel a job (no savepoint)"), found)
    cancel.add_argument("job_id")
    cancel.set_defaults(func=cmd_cancel)
