"""Topic administration against any Kafka cluster (kafka-python admin client)."""
from __future__ import annotations

from typing import Iterable, Mapping

import kafka.errors as errors
from kafka.admin import KafkaAdminClient

#: Models travel as messages and can be big; the client side allows the same.
MAX_MESSAGE_BYTES = 20 * 1024 * 1024


class TopicError(RuntimeError):
    pass


def ensure_topics(bootstrap_servers: str, topics: Iterable[str], compacted: Iterable[str] = (),
                  partitions: int = 2, replication: int = 1,
                  configs: Mapping[str, Mapping[str, str]] | None = None) -> None:
    """Create the topics that do not exist yet (existing ones are left as they are) and
    return once every topic has a leader. ``compacted`` topics get cleanup.policy=compact;
    ``configs`` adds topic configs by topic name."""
    if isinstance(topics, str):
        topics = [topics]
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
    admin = KafkaAdminClient(bootstrap_servers=bootstrap_servers, client_id="modelserving-admin",
                             request_timeout_ms=10000)
    try:
        result = admin.create_topics(spec, raise_errors=False)
        failed = []
        for topic in result.get("topics", []):
            err = errors.for_code(topic.get("error_code", 0))
            if err not in (errors.NoError, errors.TopicAlreadyExistsError):
                failed.append(f"{topic.get('name')}: {err.__name__} {topic.get('error_message') or ''}")
        if failed:
            raise TopicError("creating topics failed: " + "; ".join(failed))
        admin.wait_for_topics(wanted, timeout_ms=30000)
    finally:
        admin.close()


def create_topics(settings, partitions: int = 2, compact_models: bool = False) -> None:
    """The job's topics. The models topic is not compacted by default: the tutorial's
    producers send models without a key, which a compacted topic refuses."""
    topics = [settings.data_topic, settings.results_topic, settings.dead_letter_topic]
    models = [settings.models_topic]
    state = [settings.state_topic] if settings.state_topic else []
    ensure_topics(settings.bootstrap_servers, topics + ([] if compact_models else models),
                  compacted=state + (models if compact_models else []), partitions=partitions)
