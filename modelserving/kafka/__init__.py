"""Kafka for the tooling: producers, consumers and followers of the job's topics
(``clients``), topic administration (``admin``) and kafka-python failures as one-line
errors (``failures``). Every client is configured by ``jobs.kafka_config`` from Settings."""
