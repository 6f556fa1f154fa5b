"""``modelserving``: the one command for people.

    modelserving demo                      everything below, on an embedded local Kafka
    modelserving kafka start|stop|status   a local single-node Kafka (KRaft)
    modelserving topics create             the job's topics
    modelserving train                     one demo model per supported format
    modelserving publish model PATH ...    a model, inline or by location
    modelserving publish records ...       records from a CSV file or the demo dataset
    modelserving follow                    results and dead letters, readably
    modelserving run keyed [settings]      the keyed job on a local Flink (web UI on :8081)
    modelserving bench [--quick]            every system side by side: throughput, latency, switches
    modelserving jars fetch                the pinned jars (Kafka connector, Kafka broker)
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from jobs.settings import Settings

PROJECT_ROOT = Path(__file__).resolve().parents[1]
VAR_DIR = Path(os.environ.get("MODELSERVING_VAR_DIR", PROJECT_ROOT / "var"))
DEFAULT_MODELS_DIR = VAR_DIR / "models"
DEFAULT_KAFKA_DIR = VAR_DIR / "kafka"
JOBS = ("keyed", "broadcast")
BENCH_SYSTEMS = ("keyed", "broadcast", "plain-loop", "pass-through", "in-process")
BENCH_FORMATS = ("ONNX", "TENSORFLOWSAVED", "TENSORFLOW", "PMML")


def _settings(args) -> Settings:
    return Settings.from_sources(getattr(args, "job_args", None) or [],
                                 **({"bootstrap_servers": args.bootstrap} if getattr(args, "bootstrap", None) else {}))


def cmd_bench(args) -> int:
    from modelserving.bench.runner import run_bench

    def subset(text, known):
        chosen = tuple(part for part in text.split(",") if part)
        unknown = set(chosen) - set(known)
        if unknown:
            raise SystemExit(f"unknown: {', '.join(sorted(unknown))} (known: {', '.join(known)})")
        return chosen

    settings = Settings.from_sources(args.job_args or [])
    if settings.parallelism == 0:
        settings = settings.replace(parallelism=2)  # one per core here; fixed, to compare runs
    results = run_bench(args.out, VAR_DIR / "bench" / "work", args.quick, settings,
                        subset(args.systems, BENCH_SYSTEMS), subset(args.formats, BENCH_FORMATS),
                        args.experiments, subset(args.profile, BENCH_FORMATS))
    print(f"{len(results['results'])} results in {results['elapsed_s']} s; see {args.out}/results.md")
    return 0


def cmd_jars(args) -> int:
    from modelserving.local import jars
    return jars.main(["fetch"])


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
        print(f"Kafka at {broker.bootstrap}: {'running' if broker.is_running() else 'not running'}")
        return 0 if broker.is_running() else 1
    return 0


def cmd_topics(args) -> int:
    settings = _settings(args)
    from modelserving.kafka.admin import create_topics
    create_topics(settings, args.partitions, args.compact_models)
    print(f"topics ready on {settings.bootstrap_servers}: {settings.data_topic}, "
          f"{settings.models_topic}{' (compacted)' if args.compact_models else ''}, "
          f"{settings.results_topic}, {settings.dead_letter_topic}, {settings.state_topic} (compacted)")
    return 0


def cmd_train(args) -> int:
    from modelserving.demo.training import train_all
    for model in train_all(Path(args.out)):
        print(f"trained {model.name} v{model.version} -> {model.path}")
    return 0


def cmd_publish(args) -> int:
    from modelserving.kafka import clients as client
    settings = _settings(args)
    kafka = client.producer(settings.bootstrap_servers)
    try:
        if args.what == "model":
            from modelserving.demo.training import manifest_entry
            from protos import ModelType
            trained = manifest_entry(args.path)  # `train` output: its manifest fills the gaps
            descriptor = client.model_descriptor(
                args.path, args.data_type, name=args.name or (trained.name if trained else ""),
                version=args.version or (trained.version if trained else ""),
                description=args.description or (trained.description if trained else ""),
                model_type=ModelType.Value(args.type) if args.type else None,
                by_location=True if args.location else (False if args.inline else None),
                input_features=(args.input_features.split(",") if args.input_features
                                else trained.input_features if trained else ()),
                class_labels=(args.class_labels.split(",") if args.class_labels
                              else trained.class_labels if trained else ()))
            client.publish_model(kafka, settings.models_topic, descriptor)
            how = f"location {descriptor.location}" if descriptor.location else f"{len(descriptor.data)} bytes inline"
            print(f"published {ModelType.Name(descriptor.modeltype)} model '{descriptor.name}' "
                  f"for data type '{descriptor.dataType}' ({how}) to {settings.models_topic}")
        else:
            if args.csv:
                rows = client.rows_from_csv(args.csv, args.data_type or "wine")
            else:
                from modelserving.kafka.clients import demo_rows
                rows = demo_rows()
            sent = client.publish_records(kafka, settings.data_topic, rows, rate=args.rate,
                                          count=args.count, loop=args.loop)
            print(f"published {sent} records to {settings.data_topic}")
    finally:
        kafka.close()
    return 0


def cmd_follow(args) -> int:
    from modelserving.kafka import clients as client
    settings = _settings(args)
    kafka = client.consumer(settings.bootstrap_servers,
                            [settings.results_topic, settings.dead_letter_topic],
                            from_beginning=args.from_beginning)
    try:
        for _, message in client.follow(kafka, settings.dead_letter_topic, timeout_s=args.timeout):
            print(client.describe_message(message), flush=True)
    except KeyboardInterrupt:
        pass
    finally:
        kafka.close()
    return 0


def cmd_run(args) -> int:
    import importlib
    job_args = list(args.job_args)
    if not any(a.startswith("--rest-port") for a in job_args):
        job_args = ["--rest-port", "8081"] + job_args  # the local web UI where people expect it
    importlib.import_module(f"jobs.{args.job}_job").main(job_args)
    return 0


def cmd_demo(args) -> int:
    from modelserving.demo.run import run_demo
    return run_demo(duration_s=args.duration, rest_port=args.rest_port, kafka_port=args.kafka_port,
                    rate=args.rate, switch_every_s=args.switch_every)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="modelserving", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    jars = sub.add_parser("jars", help="fetch the pinned jars (checksums verified)")
    jars.add_argument("action", choices=["fetch"])
    jars.set_defaults(func=cmd_jars)

    kafka = sub.add_parser("kafka", help="a local single-node Kafka broker (KRaft)")
    kafka.add_argument("action", choices=["start", "stop", "status"])
    kafka.add_argument("--workdir", default=str(DEFAULT_KAFKA_DIR))
    kafka.add_argument("--port", type=int, default=9092, help="client port; the controller uses port+1")
    kafka.set_defaults(func=cmd_kafka)

    def with_bootstrap(p):
        p.add_argument("--bootstrap", help="Kafka bootstrap servers (else MODELSERVING_BOOTSTRAP_SERVERS)")
        p.set_defaults(takes_settings=True)  # other options are job settings (--models-topic ...)
        return p

    topics = with_bootstrap(sub.add_parser("topics", help="create the job's topics"))
    topics.add_argument("action", choices=["create"])
    topics.add_argument("--partitions", type=int, default=2)
    topics.add_argument("--compact-models", action="store_true",
                        help="compact the models topic (every model message then needs a key)")
    topics.set_defaults(func=cmd_topics)

    train = sub.add_parser("train", help="train one demo model per supported format")
    train.add_argument("--out", default=str(DEFAULT_MODELS_DIR))
    train.set_defaults(func=cmd_train)

    publish = sub.add_parser("publish", help="publish a model or records")
    publish_sub = publish.add_subparsers(dest="what", required=True)
    model = publish_sub.add_parser("model", help="a model file or SavedModel directory")
    model.add_argument("path")
    model.add_argument("--data-type", required=True)
    model.add_argument("--name", default="")
    model.add_argument("--version", default="")
    model.add_argument("--description", default="")
    model.add_argument("--type", choices=["TENSORFLOW", "TENSORFLOWSAVED", "PMML", "ONNX"],
                       help="model type; guessed from the path when absent")
    how = model.add_mutually_exclusive_group()
    how.add_argument("--location", action="store_true", help="send the path, not the bytes")
    how.add_argument("--inline", action="store_true", help="send the bytes (default for files)")
    model.add_argument("--input-features", help="comma-separated input order for vector models")
    model.add_argument("--class-labels", help="comma-separated class labels")
    with_bootstrap(model).set_defaults(func=cmd_publish)
    records = publish_sub.add_parser("records", help="records from a CSV file or the demo dataset")
    records.add_argument("--csv", help="CSV file; without it, the bundled demo dataset")
    records.add_argument("--data-type", default="")
    records.add_argument("--rate", type=float, default=10.0, help="records per second, 0 = unlimited")
    records.add_argument("--count", type=int, default=0, help="stop after this many")
    records.add_argument("--loop", action="store_true", help="cycle through the rows")
    with_bootstrap(records).set_defaults(func=cmd_publish)

    follow = with_bootstrap(sub.add_parser("follow", help="print results and dead letters"))
    follow.add_argument("--from-beginning", action="store_true")
    follow.add_argument("--timeout", type=float, default=None, help="stop after this many idle seconds")
    follow.set_defaults(func=cmd_follow)

    run = sub.add_parser("run", help="run a job on a local Flink", add_help=False)
    run.add_argument("job", choices=JOBS)
    run.add_argument("job_args", nargs=argparse.REMAINDER)
    run.set_defaults(func=cmd_run)

    demo = sub.add_parser("demo", help="the whole product on an embedded local Kafka and Flink")
    demo.add_argument("--duration", type=float, default=0, help="stop after N seconds (0: Ctrl-C)")
    demo.add_argument("--rest-port", type=int, default=8081, help="Flink web UI port")
    demo.add_argument("--kafka-port", type=int, default=9092)
    demo.add_argument("--rate", type=float, default=20.0, help="records per second")
    demo.add_argument("--switch-every", type=float, default=20.0, help="seconds between model switches")
    demo.set_defaults(func=cmd_demo)

    bench = sub.add_parser("bench", help="throughput, latency and model switches of every system, "
                           "side by side (job settings after the options tune the jobs under test)")
    bench.add_argument("--quick", action="store_true", help="shorter trials: under 10 minutes")
    bench.add_argument("--out", type=Path, default=VAR_DIR / "bench" / "latest",
                       help="where the JSON, Markdown table and plots go")
    bench.add_argument("--systems", default=",".join(BENCH_SYSTEMS),
                       help=f"comma-separated subset of {','.join(BENCH_SYSTEMS)}")
    bench.add_argument("--formats", default=",".join(BENCH_FORMATS),
                       help=f"comma-separated subset of {','.join(BENCH_FORMATS)}")
    bench.add_argument("--experiments", action="store_true",
                       help="also measure each tuning choice (execution mode, bundles, batching, "
                       "chaining) on the keyed job")
    bench.add_argument("--profile", default="",
                       help="comma-separated model formats whose first sustain trial is profiled "
                       "with py-spy (every system's Python workers)")
    bench.set_defaults(func=cmd_bench, takes_settings=True)

    from modelserving import cluster_cli, state_service
    cluster_cli.register(sub)    # standalone Flink cluster: start, submit, savepoint...
    state_service.register(sub)  # the live model state over HTTP
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if getattr(args, "takes_settings", False):
        args.job_args = unknown  # job settings, e.g. --models-topic, anywhere on the line
    elif unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        logging.getLogger("kafka").setLevel(logging.WARNING)
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
