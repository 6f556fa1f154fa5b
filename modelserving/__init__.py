"""Command-line tools, Kafka client, local services and demo around the Flink jobs."""
