"""Flink's REST API as the tooling reads it: the one definition of "a job is running", and
every job operation (savepoints, cancellation, checkpoints, TaskManagers) the local cluster,
the job processes and the demo use. ``rest_url`` is ``http://host:port`` of a JobManager.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Iterable

from modelserving.errors import FlinkClusterError
from modelserving.local import http
from modelserving.local.waiting import wait_until

TERMINAL_STATES = frozenset({"FINISHED", "CANCELED", "FAILED", "SUSPENDED"})
#: How often the waits ask: REST answers are cheap, jobs change state in sub-second steps.
POLL_S = 0.25


def call(rest_url: str, path: str, method: str = "GET", body: dict | None = None,
         timeout_s: float = 10.0) -> dict:
    """JSON of one REST call; ``FlinkClusterError`` for an error status or no answer."""
    try:
        return http.get_json(rest_url + path, method, body, timeout_s) or {}
    except http.HttpError as exc:
        raise FlinkClusterError(f"{method} {path}: HTTP {exc.status}: {exc.body[:2000]}") from None
    except (OSError, ValueError) as exc:
        raise FlinkClusterError(f"{method} {path} at {rest_url}: {exc}") from None


def answers(rest_url: str) -> bool:
    return http.try_json(f"{rest_url}/overview") is not None


def list_jobs(rest_url: str) -> list[dict]:
    """The jobs, newest first: ``jid``, ``name``, ``state``, ``start-time``, ``tasks``..."""
    jobs = call(rest_url, "/jobs/overview").get("jobs", [])
    return sorted(jobs, key=lambda j: j.get("start-time", 0), reverse=True)


def job(rest_url: str, job_id: str) -> dict:
    return call(rest_url, f"/jobs/{job_id}")


def job_exception(rest_url: str, job_id: str) -> str:
    """The root exception of the job's last failure ('' if none)."""
    data = http.try_json(f"{rest_url}/jobs/{job_id}/exceptions") or {}
    history = (data.get("exceptionHistory") or {}).get("entries") or []
    if history:
        return history[0].get("stacktrace") or history[0].get("exceptionName", "")
    return data.get("root-exception") or ""


def _ended(rest_url: str, job_id: str, state: str) -> FlinkClusterError:
    return FlinkClusterError(f"job {job_id} is {state}:\n{job_exception(rest_url, job_id)[:4000]}")


def is_fully_running(job: dict) -> bool:
    """RUNNING with every subtask of every vertex RUNNING: before that, records may wait."""
    vertices = job.get("vertices") or []
    return job.get("state") == "RUNNING" and bool(vertices) and all(
        v.get("tasks", {}).get("RUNNING", 0) == v.get("parallelism") for v in vertices)


def running_job(rest_url: str, job_id: str | None = None) -> dict | None:
    """The job (``job_id``, or the newest one) once it is fully running, else None.
    Raises ``FlinkClusterError`` when it has ended."""
    if job_id is None:
        jobs = (http.try_json(f"{rest_url}/jobs/overview") or {}).get("jobs") or []
        if not jobs:
            return None
        job_id = max(jobs, key=lambda j: j.get("start-time", 0))["jid"]
    current = http.try_json(f"{rest_url}/jobs/{job_id}") or {}
    if current.get("state") in TERMINAL_STATES:
        raise _ended(rest_url, job_id, current["state"])
    return current if is_fully_running(current) else None


def wait_job_running(rest_url: str, job_id: str | None = None, timeout_s: float = 180, *,
                     alive: Callable[[], None] | None = None,
                     details: Callable[[], str] | None = None) -> dict:
    """Wait until the job is fully running and return it. ``alive`` is called on every
    poll and may raise to give up early (the process running the job has exited)."""
    def check():
        if alive is not None:
            alive()
        return running_job(rest_url, job_id)

    what = f"job {job_id} running at {rest_url}" if job_id else f"a job running at {rest_url}"
    return wait_until(check, timeout_s, what, interval_s=POLL_S,
                      details=details or (lambda: job_exception(rest_url, job_id)[:4000]
                                          if job_id else ""))


def wait_restarted(rest_url: str, job_id: str, since: float, timeout_s: float = 180) -> dict:
    """Wait until the job has restarted (entered RESTARTING) after ``since`` (a
    ``time.time()`` value) and is fully running again; returns the job.

    Right after a TaskManager dies the job still reads RUNNING until the JobManager
    notices (heartbeats), so RUNNING alone says nothing about a recovery."""
    started = time.monotonic()

    def restarted() -> bool:
        current = http.try_json(f"{rest_url}/jobs/{job_id}") or {}
        if current.get("state") in TERMINAL_STATES:
            raise _ended(rest_url, job_id, current["state"])
        return (current.get("timestamps") or {}).get("RESTARTING", 0) >= since * 1000

    wait_until(restarted, timeout_s, f"job {job_id} restarting", interval_s=POLL_S)
    left = max(1.0, timeout_s - (time.monotonic() - started))
    return wait_job_running(rest_url, job_id, left)


def wait_state(rest_url: str, job_id: str, states: Iterable[str], timeout_s: float = 60) -> str:
    """Wait until the job is in one of ``states``; returns that state."""
    states = frozenset(states)

    def state() -> str | None:
        current = (http.try_json(f"{rest_url}/jobs/{job_id}") or {}).get("state")
        return current if current in states else None

    return wait_until(state, timeout_s, f"job {job_id} {'/'.join(sorted(states))}",
                      interval_s=POLL_S)


def cancel(rest_url: str, job_id: str, timeout_s: float = 60) -> str:
    """Cancel the job and wait for a terminal state (normally CANCELED)."""
    if job(rest_url, job_id)["state"] not in TERMINAL_STATES:
        call(rest_url, f"/jobs/{job_id}?mode=cancel", "PATCH")
    return wait_state(rest_url, job_id, TERMINAL_STATES, timeout_s)


# -- savepoints -------------------------------------------------------------------------------

def stop_with_savepoint(rest_url: str, job_id: str, directory: Path,
                        timeout_s: float = 120) -> str:
    """Stop the job with a savepoint in ``directory``; returns the savepoint's path once
    the job has ended."""
    trigger = call(rest_url, f"/jobs/{job_id}/stop", "POST",
                   {"targetDirectory": Path(directory).resolve().as_uri(),
                    "drain": False})["request-id"]
    location = await_savepoint(rest_url, job_id, trigger, timeout_s)
    wait_state(rest_url, job_id, TERMINAL_STATES, timeout_s)
    return location


def savepoint(rest_url: str, job_id: str, directory: Path, timeout_s: float = 120) -> str:
    """A savepoint of a job that keeps running; returns its path."""
    trigger = call(rest_url, f"/jobs/{job_id}/savepoints", "POST",
                   {"target-directory": Path(directory).resolve().as_uri(),
                    "cancel-job": False})["request-id"]
    return await_savepoint(rest_url, job_id, trigger, timeout_s)


def await_savepoint(rest_url: str, job_id: str, trigger: str, timeout_s: float) -> str:
    def location() -> str | None:
        status = call(rest_url, f"/jobs/{job_id}/savepoints/{trigger}")
        if status.get("status", {}).get("id") != "COMPLETED":
            return None
        operation = status.get("operation") or {}
        if operation.get("location"):
            return operation["location"]
        cause = operation.get("failure-cause") or {}
        raise FlinkClusterError(f"savepoint of job {job_id} failed: "
                                f"{cause.get('stack-trace') or cause}"[:4000])

    return wait_until(location, timeout_s, f"savepoint of job {job_id}", interval_s=POLL_S)


# -- checkpoints ------------------------------------------------------------------------------

def checkpoints(rest_url: str, job_id: str) -> dict:
    return call(rest_url, f"/jobs/{job_id}/checkpoints")


def latest_checkpoint(rest_url: str, job_id: str) -> dict | None:
    """The job's latest completed checkpoint (``id``, ``external_path``...), None before
    the first."""
    return (checkpoints(rest_url, job_id).get("latest") or {}).get("completed")


def wait_checkpoint(rest_url: str, job_id: str, after: int = 0, timeout_s: float = 60) -> dict:
    """Wait for a completed checkpoint with an id greater than ``after``; returns it."""
    def newer() -> dict | None:
        data = http.try_json(f"{rest_url}/jobs/{job_id}/checkpoints") or {}
        latest = (data.get("latest") or {}).get("completed")
        return latest if latest and latest.get("id", 0) > after else None

    return wait_until(newer, timeout_s, f"a checkpoint of job {job_id} after #{after}",
                      interval_s=POLL_S)


# -- TaskManagers -----------------------------------------------------------------------------

def taskmanagers(rest_url: str) -> list[dict]:
    """The registered TaskManagers ([] while the JobManager does not answer)."""
    return (http.try_json(f"{rest_url}/taskmanagers") or {}).get("taskmanagers") or []
