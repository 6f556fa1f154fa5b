"""``modelserving demo`` (the whole product on an embedded Kafka and Flink) and ``train``."""
from __future__ import annotations

from pathlib import Path

from modelserving.paths import var_dir


def cmd_demo(args) -> int:
    from modelserving.demo.run import run_demo
    return run_demo(duration_s=args.duration, rest_port=args.rest_port, kafka_port=args.kafka_port,
                    rate=args.rate, switch_every_s=args.switch_every)


def cmd_train(args) -> int:
    from modelserving.demo.training import train_all
    for model in train_all(Path(args.out)):
        print(f"trained {model.name} v{model.version} -> {model.path}")
    return 0


def register(sub) -> None:
    demo = sub.add_parser("demo", help="the whole product on an embedded local Kafka and Flink")
    demo.add_argument("--duration", type=float, default=0, help="stop after N seconds (0: Ctrl-C)")
    demo.add_argument("--rest-port", type=int, default=8081, help="Flink web UI port")
    demo.add_argument("--kafka-port", type=int, default=9092)
    demo.add_argument("--rate", type=float, default=20.0, help="records per second")
    demo.add_argument("--switch-every", type=float, default=20.0, help="seconds between model switches")
    demo.set_defaults(func=cmd_demo)

    train = sub.add_parser("train", help="train one demo model per supported format")
    train.add_argument("--out", default=str(var_dir() / "models"))
    train.set_defaults(func=cmd_train)
