"""``modelserving models list|show|history|rollback|promote|abort``: the model repository.

    modelserving models list                       per data type: latest version, who serves what
    modelserving models show DATA_TYPE [--version V]   one version: what was published, decisions
    modelserving models history DATA_TYPE          every version, each job's decisions, oldest first
    modelserving models rollback DATA_TYPE [--to V]    republish a version from the repository
    modelserving models promote DATA_TYPE          the data type's candidate becomes its model
    modelserving models abort DATA_TYPE            the data type's candidate is dropped

The jobs record every model they accept or refuse, and when it stops serving, in the
compacted repository topic (``repository_topic``, default ``model-repository``). These
commands read it from the beginning to its end offsets (the state service's feed) and fold
it (``udfs.lifecycle.repository``); ``--json`` prints what the state service answers.
``rollback`` republishes the chosen version's descriptor as it was first published (stamped
now) to the models topic: without ``--to``, the version accepted before the one serving.
A model by location whose files changed since it was first published is refused (exit 1),
the two digests named.

``promote`` and ``abort`` end a canary or shadow deployment (``publish model --canary SHARE``
or ``--shadow``): they publish a descriptor with only the data type, the time and the
rollout's action to the models topic, and print it. They do not read the repository first:
a job without a candidate for the data type dead-letters the request (BAD_MODEL), which
says so where it matters.
"""
from __future__ import annotations

import argparse
import json
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Sequence

from modelserving.cli.common import settings_of, with_settings
from modelserving.errors import KafkaToolError, ToolError, UsageError

#: Seconds ``read_repository`` waits for the topic by default.
READ_TIMEOUT_S = 30.0


def read_repository(settings, timeout_s: float = READ_TIMEOUT_S):
    """The repository topic folded into a ``RepositoryView``, read from the beginning up to
    the end offsets it had when reading started. Raises ``KafkaToolError`` when it cannot be
    read within ``timeout_s`` (no broker, no such topic), ``UsageError`` without a topic."""
    from jobs.settings import SettingsError
    from modelserving.state.feed import KafkaStateFeed
    from modelserving.state.repository import RepositoryView

    topic = settings.repository_topic
    if not topic:
        raise UsageError("the repository topic is empty (repository_topic / "
                         "MODELSERVING_REPOSITORY_TOPIC): there is no repository to read")
    view = RepositoryView()
    try:
        feed = KafkaStateFeed(view, settings, topic=topic)
    except SettingsError as exc:
        raise UsageError(f"reading {topic}: {exc}") from None
    feed.start()
    try:
        ready = feed.ready.wait(timeout_s)
    finally:
        feed.stop()
    if not ready:
        if feed.error:
            raise KafkaToolError(feed.error)
        if feed.status == "waiting_for_topic":
            raise KafkaToolError(f"the repository topic {topic} does not exist on "
                                 f"{settings.bootstrap_servers} (no job has recorded a model "
                                 f"there yet; `modelserving topics create` creates it)")
        raise KafkaToolError(f"reading {topic} from {settings.bootstrap_servers} did not reach "
                             f"its end within {timeout_s:g} s ({feed.status})")
    return view


def rollback(settings, data_type: str, to_version: str | None = None, job: str | None = None,
             repository=None, now_ms: int | None = None):
    """Republish a version of ``data_type`` from the repository to the models topic (see the
    module's docstring); returns (its entry, the descriptor sent). ``repository``: a folded
    ``Repository`` (read from the topic when None). Raises ``ToolError`` saying why not."""
    from modelserving.kafka import clients
    from udfs.errors import ModelError
    from udfs.lifecycle.digest import location_changed
    from udfs.lifecycle.repository import RollbackError, republished

    if repository is None:
        repository = read_repository(settings).repository()
    try:
        target = repository.rollback_target(data_type, to_version, job=job)
        descriptor = republished(target, int(time.time() * 1000) if now_ms is None else now_ms)
    except RollbackError as exc:
        raise ToolError(f"not rolled back: {exc}") from None
    # a version first published as a candidate comes back as the data type's model
    descriptor.ClearField("rollout")
    if descriptor.WhichOneof("MessageContent") == "location":
        try:
            changed = location_changed(descriptor, target.digest,
                                       _model_dirs(settings, descriptor.location))
        except ModelError as exc:
            raise ToolError(f"not rolled back: version '{target.version}' of data type "
                            f"'{data_type}' cannot be read at its location: {exc}") from None
        if changed:
            raise ToolError(f"not rolled back: {changed}")
    producer = clients.producer(settings)
    try:
        clients.publish_model(producer, settings.models_topic, descriptor)
    finally:
        producer.close()
    return target, descriptor


def _model_dirs(settings, location: str) -> tuple[Path, ...]:
    """Where a location may point: the settings' model directories, else (an absolute
    location) its own directory."""
    dirs = settings.resolved_model_dirs()
    if dirs:
        return dirs
    path = Path(location[len("file://"):] if location.startswith("file://") else location)
    if not path.is_absolute():
        raise UsageError(f"the location {location!r} is relative: give --model-dirs to say where "
                         f"it lies")
    return (path.resolve().parent,)


# -- printing -----------------------------------------------------------------------------------

def when(ms: int | None) -> str:
    """A time for a table: UTC to the second, "-" for none."""
    if not ms:
        return "-"
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def table(header: Sequence[str], rows: Iterable[Sequence]) -> list[str]:
    """Left-aligned columns as wide as their widest cell; the last one is not padded."""
    rows = [["-" if cell in (None, "") else str(cell) for cell in row] for row in rows]
    widths = [max([len(name)] + [len(row[i]) for row in rows]) for i, name in enumerate(header)]
    return ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip()
            for line in [list(header)] + rows]


def version_of(entry: dict) -> str:
    return entry["version"] or entry["key"].rsplit("/", 1)[-1]


def listing_lines(listing: dict) -> list[str]:
    if not listing["data_types"]:
        return ["the repository is empty: no job has recorded a model yet"]
    rows = []
    for data_type, item in listing["data_types"].items():
        latest = item["latest"]
        serving = ", ".join(f"{job}: {s['version'] or s['name']}"
                            for job, s in item["serving"].items())
        candidates = ", ".join(f"{job}: {c['version'] or c['name']} ({c['role']})"
                               for job, c in item.get("candidates", {}).items())
        rows.append([data_type, item["versions"], version_of(latest), latest["name"],
                     latest["type"], when(latest["created_ms"]), latest["outcome"], serving,
                     candidates])
    return table(["DATA TYPE", "VERSIONS", "LATEST", "NAME", "TYPE", "CREATED (UTC)", "OUTCOME",
                  "SERVING (JOB: VERSION)", "CANDIDATE (JOB: VERSION)"], rows)


def history_lines(history: dict) -> list[str]:
    rows = []
    for entry in history["versions"]:
        first = [version_of(entry), entry["model_id"], entry["name"], entry["type"],
                 entry["digest"][:12], when(entry["created_ms"])]
        for deployment in entry["deployments"] or [None]:
            if deployment is None:
                rows.append(first + ["-", "-", entry["outcome"], "-", "-", ""])
                continue
            rows.append(first + [deployment["job"], deployment["role_label"],
                                 deployment["outcome"], when(deployment["deployed_ms"]),
                                 when(deployment["retired_ms"]), deployment["note"]])
    return table(["VERSION", "MODEL ID", "NAME", "TYPE", "DIGEST", "CREATED (UTC)", "JOB", "ROLE",
                  "OUTCOME", "DEPLOYED", "RETIRED", "NOTE"], rows)


def show_lines(entry: dict) -> list[str]:
    where = (f"location {entry['location']}" if entry["location"]
             else f"{entry['inline_bytes']} bytes inline" if entry["inline_bytes"] else "-")
    quality = ", ".join(f"{name}={value:g}" for name, value in entry["quality_metrics"].items())
    fields = [("data type", entry["data_type"]), ("version", version_of(entry)),
              ("model id", entry["model_id"]), ("name", entry["name"]),
              ("description", entry["description"]), ("type", entry["type"]),
              ("digest (SHA-256)", entry["digest"]), ("model", where),
              ("created (UTC)", when(entry["created_ms"])),
              ("published (UTC)", when(entry["published_ms"])),
              ("input features", ", ".join(entry["input_features"])),
              ("class labels", ", ".join(entry["class_labels"])),
              ("quality metrics", quality),
              ("validation gate", "yes" if entry["has_validation"] else "no"),
              ("drift reference", "yes" if entry["has_reference"] else "no"),
              ("rollback", "possible (descriptor kept)" if entry["descriptor_kept"]
               else "not from the repository (descriptor too large to keep)"),
              ("outcome", entry["outcome"]),
              ("serving on", ", ".join(entry["serving_on"])),
              ("candidate on", ", ".join(entry.get("candidate_on", [])))]
    lines = table(["FIELD", "VALUE"], fields)[1:]
    if entry["deployments"]:
        lines += ["", "decisions:"]
        lines += ["  " + line for line in table(
            ["JOB", "ROLE", "OUTCOME", "DEPLOYED (UTC)", "RETIRED (UTC)", "NOTE"],
            [[d["job"], d["role_label"], d["outcome"], when(d["deployed_ms"]),
              when(d["retired_ms"]), d["note"]] for d in entry["deployments"]])]
    return lines


def _print(args, answer, lines) -> None:
    if args.json:
        print(json.dumps(answer, indent=2))
    else:
        print("\n".join(lines(answer)))


def _unknown(view, data_type: str, what: str = "") -> ToolError:
    known = ", ".join(view.data_types()) or "none yet"
    return ToolError(f"the repository has no {what}model of data type '{data_type}' "
                     f"(known data types: {known})")


def _read(args, settings=None):
    """The repository for a command; the feed's progress lines only with ``-v``."""
    import logging

    if not args.verbose:
        logging.getLogger("modelserving.state.feed").setLevel(logging.WARNING)
    return read_repository(settings or settings_of(args), args.timeout)


def cmd_list(args) -> int:
    view = _read(args)
    _print(args, view.listing(), listing_lines)
    return 0


def cmd_history(args) -> int:
    view = _read(args)
    history = view.history(args.data_type)
    if history is None:
        raise _unknown(view, args.data_type)
    _print(args, history, history_lines)
    return 0


def cmd_show(args) -> int:
    view = _read(args)
    entry = view.show(args.data_type, args.version)
    if entry is None:
        if view.history(args.data_type) is None:
            raise _unknown(view, args.data_type)
        raise ToolError(f"data type '{args.data_type}' has no version '{args.version}' in the "
                        f"repository")
    _print(args, entry, show_lines)
    return 0


def cmd_rollback(args) -> int:
    settings = settings_of(args)
    view = _read(args, settings)
    if view.history(args.data_type) is None:
        raise _unknown(view, args.data_type)
    target, descriptor = rollback(settings, args.data_type, args.to, args.job, view.repository())
    how = (f"location {descriptor.location}" if descriptor.location
           else f"{len(descriptor.data)} bytes inline")
    print(f"republished version '{target.version}' of data type '{args.data_type}' "
          f"({target.name}, {how}, digest {target.digest[:12] or '-'}) to {settings.models_topic}")
    return 0


def control_descriptor(data_type: str, action: int, now_ms: int | None = None):
    """The descriptor that ends ``data_type``'s candidate: only the data type, the time and
    a rollout with ``action`` (``Rollout.PROMOTE`` or ``Rollout.ABORT``)."""
    from protos import ModelDescriptor, Rollout

    return ModelDescriptor(dataType=data_type, rollout=Rollout(action=action),
                           publishedMs=int(time.time() * 1000) if now_ms is None else now_ms)


def publish_control(settings, data_type: str, action: int, now_ms: int | None = None):
    """Publish ``control_descriptor`` to the models topic; returns it."""
    from modelserving.kafka import clients

    if not data_type.strip():
        raise UsageError("the data type is empty: name the data type whose candidate to end")
    descriptor = control_descriptor(data_type, action, now_ms)
    producer = clients.producer(settings)
    try:
        clients.publish_model(producer, settings.models_topic, descriptor)
    finally:
        producer.close()
    return descriptor


#: What a job does with each action, for the commands' output.
_CONTROLS = {"promote": ("PROMOTE", "each job's candidate of the data type becomes its model "
                                    "(the model serving it retires)"),
             "abort": ("ABORT", "each job drops its candidate of the data type (the model "
                                "serving it serves alone)")}


def cmd_control(args) -> int:
    from protos import Rollout

    settings = settings_of(args)
    action, effect = _CONTROLS[args.models_action]
    descriptor = publish_control(settings, args.data_type, Rollout.Action.Value(action))
    print(f"published {action} for data type '{descriptor.dataType}' to {settings.models_topic} "
          f"(rollout action {action}, publishedMs {descriptor.publishedMs}): {effect}; a job "
          f"without a candidate dead-letters it (BAD_MODEL)")
    return 0


def register(sub) -> None:
    models = sub.add_parser("models", help="the model repository: list, show, history, rollback; "
                                           "promote or abort a canary or shadow",
                            description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = models.add_subparsers(dest="models_action", required=True)

    def action(name: str, help_text: str, func, data_type: bool = True):
        parser = with_settings(actions.add_parser(name, help=help_text))
        if data_type:
            parser.add_argument("data_type", metavar="DATA_TYPE")
        parser.add_argument("--timeout", type=float, default=READ_TIMEOUT_S,
                            help="seconds to wait for the repository topic (default %(default)s)")
        parser.set_defaults(func=func)
        return parser

    action("list", "per data type: latest version and what serves where", cmd_list,
           data_type=False).add_argument("--json", action="store_true")
    show = action("show", "one version (the latest by default)", cmd_show)
    show.add_argument("--version", help="which version (default: the latest published)")
    show.add_argument("--json", action="store_true")
    action("history", "every version of a data type with each job's decisions",
           cmd_history).add_argument("--json", action="store_true")
    back = action("rollback", "republish a version from the repository", cmd_rollback)
    back.add_argument("--to", metavar="VERSION",
                      help="the version to republish (default: the one accepted before the "
                           "version serving now)")
    back.add_argument("--job", help="the job whose serving version counts (default: the most "
                                    "recently deployed on any job)")
    for name, help_text in (("promote", "the data type's candidate (canary or shadow) becomes "
                                        "its model"),
                            ("abort", "the data type's candidate (canary or shadow) is dropped")):
        control = with_settings(actions.add_parser(
            name, help=help_text,
            description=f"{help_text[0].upper()}{help_text[1:]}: publishes a descriptor of only "
                        f"the data type, the time and the rollout's action to the models topic "
                        f"(a job without a candidate dead-letters it)."))
        control.add_argument("data_type", metavar="DATA_TYPE")
        control.set_defaults(func=cmd_control)
