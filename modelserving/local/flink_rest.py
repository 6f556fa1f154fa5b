"""Flink's REST API as the tooling reads it: the one definition of "a job is running"."""
from __future__ import annotations

from typing import Callable

from modelserving.errors import FlinkClusterError
from modelserving.local import http
from modelserving.local.waiting import wait_until

TERMINAL_STATES = {"FINISHED", "CANCELED", "FAILED", "SUSPENDED"}


def job_exception(rest_url: str, job_id: str) -> str:
    """The root exception of the job's last failure ('' if none)."""
    data = http.try_json(f"{rest_url}/jobs/{job_id}/exceptions") or {}
    history = (data.get("exceptionHistory") or {}).get("entries") or []
    if history:
        return history[0].get("stacktrace") or history[0].get("exceptionName", "")
    return data.get("root-exception") or ""


def is_fully_running(job: dict) -> bool:
    """RUNNING with every subtask of every vertex RUNNING: before that, records may wait."""
    vertices = job.get("vertices") or []
    return job.get("state") == "RUNNING" and bool(vertices) and all(
        v.get("tasks", {}).get("RUNNING", 0) == v.get("parallelism") for v in vertices)


def running_job(rest_url: str, job_id: str | None = None) -> dict | None:
    """The job (``job_id``, or the only/newest one) once it is fully running, else None.
    Raises ``FlinkClusterError`` when it has ended."""
    if job_id is None:
        jobs = (http.try_json(f"{rest_url}/jobs/overview") or {}).get("jobs") or []
        if not jobs:
            return None
        job_id = max(jobs, key=lambda j: j.get("start-time", 0))["jid"]
    job = http.try_json(f"{rest_url}/jobs/{job_id}") or {}
    if job.get("state") in TERMINAL_STATES:
        raise FlinkClusterError(f"job {job_id} is {job['state']}:\n"
                                f"{job_exception(rest_url, job_id)[:4000]}")
    return job if is_fully_running(job) else None


def wait_job_running(rest_url: str, job_id: str | None = None, timeout_s: float = 180, *,
                     alive: Callable[[], None] | None = None,
                     details: Callable[[], str] | None = None) -> dict:
    """Wait until the job is fully running and return it. ``alive`` is called on every
    poll and may raise to give up early (the process running the job has exited)."""
    def check():
        if alive is not None:
            alive()
        return running_job(rest_url, job_id)

    return wait_until(check, timeout_s, f"job {job_id or ''} running at {rest_url}".replace("  ", " "),
                      interval_s=0.25, details=details)
