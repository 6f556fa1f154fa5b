"""``modelserving publish model|speculative|records`` and ``follow``: talking to the job's topics."""
from __future__ import annotations


from modelserving.cli.common import settings_of, with_settings
from modelserving.cli.lifecycle import (add_lifecycle_options, add_model_options,
                                        add_rollout_options, attach_lifecycle, descriptor_of,
                                        rollout_of)


def cmd_publish_model(args) -> int:
    from modelserving.kafka import clients
    from udfs.candidates import role_of
    from udfs.runtimes import type_name

    settings = settings_of(args)
    rollout = rollout_of(args)    # a bad --canary share fails before the model is read
    descriptor = descriptor_of(args, args.data_type)  # `train` output: its manifest fills the gaps
    descriptor.modelId = args.model_id
    attach_lifecycle(descriptor, args)
    if rollout is not None:
        descriptor.rollout.CopyFrom(rollout)
    producer = clients.producer(settings)
    try:
        clients.publish_model(producer, settings.models_topic, descriptor)
    finally:
        producer.close()
    how = f"location {descriptor.location}" if descriptor.location else f"{len(descriptor.data)} bytes inline"
    named = f" as '{descriptor.modelId}'" if descriptor.modelId else ""
    as_candidate = f", as its candidate: {role_of(rollout)}" if rollout is not None else ""
    print(f"published {type_name(descriptor.modeltype)} model '{descriptor.name}'{named} "
          f"for data type '{descriptor.dataType}' ({how}) to {settings.models_topic}"
          f"{as_candidate}")
    return 0


def cmd_publish_speculative(args) -> int:
    from modelserving.kafka import clients
    from protos import ModelDescriptor, SpeculativeSet

    settings = settings_of(args)
    models = [m for m in (args.models or "").split(",") if m]
    descriptor = ModelDescriptor(name=args.name, dataType=args.data_type, withdraw=args.end)
    descriptor.speculative.CopyFrom(SpeculativeSet(
        models=[] if args.end else models, budgetMs=args.budget_ms,
        decider=SpeculativeSet.Decider.Value(args.decider.upper())))
    producer = clients.producer(settings)
    try:
        clients.publish_model(producer, settings.models_topic, descriptor)
    finally:
        producer.close()
    if args.end or not models:
        print(f"published the end of speculative serving for data type '{args.data_type}'")
    else:
        print(f"published a speculative set for data type '{args.data_type}': {args.decider} of "
              f"{', '.join(models)} within {args.budget_ms} ms")
    return 0


def cmd_publish_records(args) -> int:
    from modelserving.kafka import clients

    settings = settings_of(args)
    if args.csv:
        rows = clients.rows_from_csv(args.csv, args.data_type or "wine")
    else:
        from modelserving.demo.training import demo_rows
        rows = demo_rows()
    producer = clients.producer(settings)
    try:
        sent = clients.publish_records(producer, settings.data_topic, rows, rate=args.rate,
                                       count=args.count, loop=args.loop)
    finally:
        producer.close()
    print(f"published {sent} records to {settings.data_topic}")
    return 0


def cmd_follow(args) -> int:
    from modelserving.kafka import clients

    settings = settings_of(args)
    consumer = clients.consumer(settings, [settings.results_topic, settings.dead_letter_topic],
                                from_beginning=args.from_beginning)
    try:
        for _, message in clients.follow(consumer, settings.dead_letter_topic, timeout_s=args.timeout):
            print(clients.describe_message(message), flush=True)
    finally:
        consumer.close()
    return 0


def register(sub) -> None:
    publish = sub.add_parser("publish", help="publish a model or records")
    publish_sub = publish.add_subparsers(dest="what", required=True)

    model = with_settings(publish_sub.add_parser("model", help="a model file or SavedModel directory"))
    add_model_options(model)
    model.add_argument("--data-type", required=True)
    model.add_argument("--model-id", default="", help="name it among its data type's models "
                       "(models with different ids coexist; a speculative set lists them)")
    add_lifecycle_options(model)
    add_rollout_options(model)
    model.set_defaults(func=cmd_publish_model)

    speculative = with_settings(publish_sub.add_parser(
        "speculative", help="a speculative set: several models answer, a decider picks"))
    speculative.add_argument("--data-type", required=True)
    speculative.add_argument("--models", help="comma-separated model ids, in order of preference")
    speculative.add_argument("--budget-ms", type=int, default=100)
    speculative.add_argument("--decider", choices=("preferred", "consensus", "confidence"),
                             default="preferred")
    speculative.add_argument("--name", default="speculative-set")
    speculative.add_argument("--end", action="store_true",
                             help="end speculation: the latest model serves alone again")
    speculative.set_defaults(func=cmd_publish_speculative)

    records = with_settings(publish_sub.add_parser(
        "records", help="records from a CSV file or the demo dataset"))
    records.add_argument("--csv", help="CSV file; without it, the bundled demo dataset")
    records.add_argument("--data-type", default="")
    records.add_argument("--rate", type=float, default=10.0, help="records per second, 0 = unlimited")
    records.add_argument("--count", type=int, default=0, help="stop after this many")
    records.add_argument("--loop", action="store_true", help="cycle through the rows")
    records.set_defaults(func=cmd_publish_records)

    follow = with_settings(sub.add_parser("follow", help="print results and dead letters"))
    follow.add_argument("--from-beginning", action="store_true")
    follow.add_argument("--timeout", type=float, default=None, help="stop after this many idle seconds")
    follow.set_defaults(func=cmd_follow)
