"""The configuration a container's Flink process starts with (run by docker/entrypoint.sh).

``python docker/flink_conf.py CONF_DIR`` writes ``CONF_DIR/config.yaml``: the
distribution's Java 17 options, then the project's ``flink-conf/config.yaml``, then what a
container needs instead of the file's localhost values (listen on every interface, the
JobManager at ``$JOB_MANAGER_RPC_ADDRESS``, a TaskManager's address found by Flink,
state under ``/var/lib/modelserving``), then ``$FLINK_PROPERTIES`` (YAML, one ``key: value``
a line, as with the official Flink images), which wins. The project's logging files go
beside it. A Kubernetes pod does not run this: the operator mounts its own ConfigMap.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import yaml

from modelserving.local.flink_config import PROJECT_CONF, cluster_configuration, write_conf_dir

#: Checkpoints, savepoints and models by location: a volume shared by every container.
STATE_DIR = Path(os.environ.get("MODELSERVING_STATE_DIR", "/var/lib/modelserving"))


def container_configuration(environ: dict[str, str]) -> dict:
    jobmanager = environ.get("JOB_MANAGER_RPC_ADDRESS", "jobmanager")
    conf = cluster_configuration(STATE_DIR, rest_port=8081, rpc_port=6123, slots=2,
                                 python=sys.executable, conf_file=PROJECT_CONF)
    conf.update({
        "jobmanager.rpc.address": jobmanager,
        "jobmanager.bind-host": "0.0.0.0",
        "taskmanager.bind-host": "0.0.0.0",
        "rest.address": jobmanager,
        "rest.bind-address": "0.0.0.0",
        "blob.server.port": "6124",
        "io.tmp.dirs": "/tmp",
        "env.log.dir": os.environ.get("FLINK_LOG_DIR", "/opt/flink/log"),
    })
    # Flink's defaults: any free port, /tmp, and a TaskManager's address found by connecting
    # to the JobManager (the container's own, whatever its hostname resolves to)
    for key in ("taskmanager.host", "taskmanager.rpc.port", "taskmanager.data.port", "env.pid.dir"):
        conf.pop(key, None)
    conf.update(yaml.safe_load(environ.get("FLINK_PROPERTIES") or "") or {})
    return conf


def main(argv: list[str]) -> int:
    conf_dir = Path(argv[0] if argv else os.environ["FLINK_CONF_DIR"])
    conf = container_configuration(dict(os.environ))
    write_conf_dir(conf_dir, conf, rest_port=conf["rest.port"], taskmanagers=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
