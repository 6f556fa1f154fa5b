#!/usr/bin/env bash
# The job image's entrypoint (docker/Dockerfile). Commands:
#   jobmanager                 the JobManager of a session cluster (foreground)
#   taskmanager                a TaskManager (foreground), registering with $JOB_MANAGER_RPC_ADDRESS
#   submit [keyed|broadcast] [SETTINGS...]
#                              submit the job to the session cluster at $JOB_MANAGER_RPC_ADDRESS:8081
#                              once it answers, unless it runs there already (docker/submit.py);
#                              the job's settings as options or MODELSERVING_* variables
#   modelserving ARGS...       the project's command: topics create, state serve, publish, ...
#   help                       this text
#   anything else              runs as it is (a Kubernetes operator's pod: `bash -c ...`, with
#                              the operator's configuration mounted at $FLINK_CONF_DIR)
# jobmanager, taskmanager and submit run with the configuration docker/flink_conf.py writes
# from flink-conf/config.yaml and $FLINK_PROPERTIES.
set -euo pipefail
APP=/opt/modelserving

conf() {
  export FLINK_CONF_DIR=$APP/var/flink-conf
  python "$APP/docker/flink_conf.py" "$FLINK_CONF_DIR"
}

cmd=${1:-help}
[ $# -gt 0 ] && shift
case "$cmd" in
  jobmanager)
    conf
    exec "$FLINK_HOME/bin/jobmanager.sh" start-foreground "$@" ;;
  taskmanager)
    conf
    exec "$FLINK_HOME/bin/taskmanager.sh" start-foreground "$@" ;;
  submit)
    conf
    exec python "$APP/docker/submit.py" "$@" ;;
  modelserving)
    exec modelserving "$@" ;;
  help|--help|-h)
    sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//' ;;
  *)
    exec "$cmd" "$@" ;;
esac
