"""``submit [keyed|broadcast] [SETTINGS...]`` of the job image (docker/entrypoint.sh).

Waits for the session cluster's REST API at ``$JOB_MANAGER_RPC_ADDRESS:8081`` (up to
``$SUBMIT_WAIT_S``, 300 s), then submits the job with ``flink run --detached -pym``, unless
a job of the same name (setting ``job_name``, default ``modelserving-<job>``) is already
running or restarting there: the compose stack's submitter runs again on every
``compose up`` and must not start a second copy. With ``$FROM_SAVEPOINT`` the job starts
from that savepoint (an upgrade). The job's packages are installed in the image, so nothing
is shipped with the job.
"""
from __future__ import annotations

import os
import sys

from jobs.settings import Settings
from modelserving.local import flink_rest
from modelserving.local.waiting import wait_until

ACTIVE = {"CREATED", "INITIALIZING", "RUNNING", "RESTARTING"}


def main(argv: list[str]) -> int:
    job = argv.pop(0) if argv and argv[0] in ("keyed", "broadcast") else "keyed"
    name = Settings.from_sources(argv).for_job(job).job_name
    url = f"http://{os.environ.get('JOB_MANAGER_RPC_ADDRESS', 'jobmanager')}:8081"
    wait_until(lambda: flink_rest.answers(url), float(os.environ.get("SUBMIT_WAIT_S", 300)),
               f"the JobManager's REST API at {url}", interval_s=1.0)
    running = [j["jid"] for j in flink_rest.list_jobs(url)
               if j.get("name") == name and j.get("state") in ACTIVE]
    if running:
        print(f"submit: {name} is already running at {url} (job {running[0]}); not submitted again",
              file=sys.stderr)
        return 0
    flink = os.path.join(os.environ["FLINK_HOME"], "bin", "flink")
    savepoint = os.environ.get("FROM_SAVEPOINT", "")
    # "--" ends flink run's own options: the rest are the job's settings
    os.execv(flink, [flink, "run", "--detached", "--jobmanager", url.removeprefix("http://"),
                     *(["--fromSavepoint", savepoint] if savepoint else []),
                     "--pyModule", f"jobs.{job}_job", "--", *argv])
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
