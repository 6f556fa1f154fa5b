"""``modelserving kafka start|stop|status`` (a local broker) and ``topics create``."""
from __future__ import annotations

from pathlib import Path

from modelserving.cli.common import settings_of, with_settings
from modelserving.paths import var_dir


def cmd_kafka(args) -> int:
    from modelserving.local.kafka_broker import LocalKafka

    broker = LocalKafka(Path(args.workdir), port=args.port, controller_port=args.port + 1)
    if args.action == "start":
        broker.start()
        print(f"Kafka running at {broker.bootstrap} (data in {args.workdir}); "
              f"stop with: modelserving kafka stop")
    elif args.action == "stop":
        broker.stop()
        print("Kafka stopped")
    else:
        running = broker.is_running()
        print(f"Kafka at {broker.bootstrap}: {'running' if running else 'not running'}")
        return 0 if running else 1
    return 0


def cmd_topics(args) -> int:
    from modelserving.kafka.admin import create_topics

    settings = settings_of(args)
    create_topics(settings, args.partitions, args.compact_models)
    models = settings.models_topic + (" (compacted)" if args.compact_models else "")
    compacted = [f"{topic} (compacted)" for topic in (settings.state_topic,
                                                      settings.repository_topic) if topic]
    print(f"topics ready on {settings.bootstrap_servers}: " + ", ".join(
        [settings.data_topic, models, settings.results_topic, settings.dead_letter_topic]
        + compacted))
    return 0


def register(sub) -> None:
    kafka = sub.add_parser("kafka", help="a local single-node Kafka broker (KRaft)")
    kafka.add_argument("action", choices=["start", "stop", "status"])
    kafka.add_argument("--workdir", default=str(var_dir() / "kafka"))
    kafka.add_argument("--port", type=int, default=9092, help="client port; the controller uses port+1")
    kafka.set_defaults(func=cmd_kafka)

    topics = with_settings(sub.add_parser(
        "topics", help="create the job's topics (job settings name them and the cluster)"))
    topics.add_argument("action", choices=["create"])
    topics.add_argument("--partitions", type=int, default=2)
    topics.add_argument("--compact-models", action="store_true",
                        help="compact the models topic (every model message then needs a key)")
    topics.set_defaults(func=cmd_topics)
