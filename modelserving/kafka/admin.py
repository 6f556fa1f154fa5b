"""Topic administration against any Kafka cluster (kafka-python admin client).

The client's configuration comes from ``jobs.kafka_config.kafka_python(settings)``, so a
secured cluster needs nothing here; failures leave as one-line ``KafkaToolError``s.
"""
from __future__ import annotations

from typing import Iterable, Mapping

import kafka.errors as errors
from kafka.admin import KafkaAdminClient

from jobs.kafka_config import MAX_MESSAGE_BYTES, kafka_python
from modelserving.errors import KafkaToolError
from modelserving.kafka.failures import CONNECT_TIMEOUT_MS, translated


class TopicError(KafkaToolError):
    """The broker refused to create a topic."""


def admin_client(settings, **overrides) -> KafkaAdminClient:
    """A connected admin client for the settings' cluster."""
    config = kafka_python(settings, **{"client_id": "modelserving-admin", "request_timeout_ms": 10000,
                                       "bootstrap_timeout_ms": CONNECT_TIMEOUT_MS, **overrides})
    with translated("connecting to Kafka", config):
        return KafkaAdminClient(**config)


def ensure_topics(settings, topics: Iterable[str], compacted: Iterable[str] = (),
                  partitions: int = 2, replication: int = 1,
                  configs: Mapping[str, Mapping[str, str]] | None = None) -> None:
    """Create the topics that do not exist yet (existing ones are left as they are) and
    return once every topic has a leader. ``compacted`` topics get cleanup.policy=compact;
    ``configs`` adds topic configs by topic name."""
    topics = [topics] if isinstance(topics, str) else list(topics)
    compacted = [compacted] if isinstance(compacted, str) else list(compacted)
    wanted = list(dict.fromkeys([*topics, *compacted]))
    if not wanted:
        return
    spec = {}
    for name in wanted:
        topic_configs = {"max.message.bytes": str(MAX_MESSAGE_BYTES)}
        if name in compacted:
            topic_configs["cleanup.policy"] = "compact"
        topic_configs.update((configs or {}).get(name, {}))
        spec[name] = {"num_partitions": partitions, "replication_factor": replication,
                      "configs": topic_configs}
    admin = admin_client(settings)
    try:
        with translated(f"creating topics {', '.join(wanted)}", admin.config):
            result = admin.create_topics(spec, raise_errors=False)
            failed = []
            for topic in result.get("topics", []):
                err = errors.for_code(topic.get("error_code", 0))
                if err not in (errors.NoError, errors.TopicAlreadyExistsError):
                    failed.append(f"{topic.get('name')}: {err.__name__} {topic.get('error_message') or ''}".strip())
            if failed:
                raise TopicError("creating topics failed: " + "; ".join(failed))
            admin.wait_for_topics(wanted, timeout_ms=30000)
    finally:
        admin.close()


def create_topics(settings, partitions: int = 2, compact_models: bool = False) -> None:
    """The job's topics. The state and repository topics are compacted (the jobs key their
    records); the models topic is not by default: the tutorial's producers send models
    without a key, which a compacted topic refuses."""
    topics = [t for t in (settings.data_topic, settings.results_topic, settings.dead_letter_topic,
                          settings.shadow_topic) if t]
    models = [settings.models_topic]
    state = [t for t in (settings.state_topic, settings.repository_topic) if t]
    ensure_topics(settings, topics + ([] if compact_models else models),
                  compacted=state + (models if compact_models else []), partitions=partitions)
