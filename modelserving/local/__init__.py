"""Services on this machine: a KRaft Kafka broker (``kafka_broker``), a standalone Flink
cluster (``flink_cluster``, ``flink_config``, ``flink_rest``, ``job_files``), a job in its own
process (``job_process``), the pinned jars (``jars``), and the helpers every one of them
uses: ``processes`` (psutil), ``waiting`` (deadlines) and ``http`` (no proxies)."""
