"""The benchmark's Python peers: model serving without Flink, as Python users write it.

One module per peer, each started by the runner as its own process(es) with the job
settings as ``MODELSERVING_*`` variables, as ``modelserving.bench.plain_loop`` is:

- ``confluent_loop``: a plain confluent-kafka (librdkafka) loop, ``consume(num_messages=...)``
  per poll; run as one process, and as one process per core in one consumer group;
- ``quix_app``: a Quix Streams application (its own virtual environment, ``.venv-peers``:
  quixstreams pins a confluent-kafka older than the project's);
- ``bytewax_flow``: a bytewax dataflow with bytewax's Kafka connector, one worker per process.

What they all do alike (the model table per data type, batch scoring into ``ServingResult``
bytes, client settings) is ``scoring``; the kafka-python plain loop uses it too. Nothing
here imports the tooling beyond ``jobs.settings``/``jobs.kafka_config``, ``protos`` and
``udfs``, so the peers run in a virtual environment without Flink.
"""
