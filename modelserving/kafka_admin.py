"""Topic administration against any Kafka cluster (kafka-python admin client)."""
from __future__ import annotations

from typing import Iterable

from kafka.admin import KafkaAdminClient, NewTopic
from kafka.errors import TopicAlreadyExistsError


def ensure_topics(bootstrap_servers: str, topics: Iterable[str], compacted: Iterable[str] = (),
                  partitions: int = 2, replication: int = 1) -> None:
    """Create the topics that do not exist yet; existing ones are left as they are."""
    wanted = {t: {} for t in topics}
    wanted.update({t: {"cleanup.policy": "compact"} for t in compacted})
    admin = KafkaAdminClient(bootstrap_servers=bootstrap_servers, client_id="modelserving-admin")
    try:
        missing = [NewTopic(name, partitions, replication, topic_configs=config)
                   for name, config in wanted.items() if name not in set(admin.list_topics())]
        for topic in missing:
            try:
                admin.create_topics([topic])
            except TopicAlreadyExistsError:
                pass
    finally:
        admin.close()
