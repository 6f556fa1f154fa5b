"""The Flink jobs: one module per join, each a ``build_pipeline`` plus a thin ``main``.

This package and ``udfs``/``protos`` are all a TaskManager needs; nothing here imports the
``modelserving`` tooling.
"""

#: Short job name -> module; the CLI, the cluster commands and the benchmark read it here.
JOB_MODULES = {"keyed": "jobs.keyed_job", "broadcast": "jobs.broadcast_job"}
