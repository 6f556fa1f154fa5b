"""The state service: the jobs' serving statistics, queryable over HTTP.

PyFlink state cannot be made queryable, so both jobs publish their serving statistics as
``ModelStats`` messages to a compacted Kafka topic (default ``model-state``), keyed by
``<job>/<dataType>`` (keyed job, part -1) or ``<job>/<dataType>/<part>`` (broadcast job, one
key per share of the spread records). This module reads that topic and answers questions:

    GET /models               every data type, per job: current model and statistics
    GET /state/<data_type>    one data type (404 naming the known ones if unknown)
    GET /history/<data_type>  the last models seen for a data type, newest first (?limit=N)
    GET /health               200 once caught up with the topic, 503 before (status catching_up)
    GET /                     a self-contained HTML page of the same, refreshing every 2 s

Three layers, each usable on its own:

* :class:`ModelStateView`: pure and Kafka-free. ``ingest(key, value)`` takes the topic's
  records (``value`` None is a tombstone) and answers ``models()``, ``state()``, ``history()``
  and ``health()`` as JSON-able dicts.
* :class:`KafkaStateFeed`: a background thread reading the topic from the beginning
  (kafka-python, no consumer group, read_committed) into a view; ``ready`` once it has read
  up to the end offsets it found at start.
* :class:`StateService`: the HTTP server (werkzeug) over a view and an optional feed;
  ``start()`` runs it in a thread, ``stop()`` ends it. :func:`serve` runs it in the
  foreground and :func:`register` adds ``modelserving state serve`` to the CLI.

Restarts: the current view is rebuilt exactly from the compacted topic, because every key
keeps its latest message. The history is best-effort across a restart of this service:
compaction keeps only the latest message per key, so models replaced before the service
started may be missing. Every history answer says from when it is complete
(``history_complete_since_ms``: the moment this service started reading the topic).
"""
from __future__ import annotations

import argparse
import html
import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from google.protobuf.message import DecodeError
from werkzeug.exceptions import HTTPException
from werkzeug.routing import Map, Rule
from werkzeug.serving import make_server
from werkzeug.wrappers import Request, Response

from protos import ModelStats, ModelType

log = logging.getLogger(__name__)

DEFAULT_TOPIC = "model-state"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 5500
DEFAULT_HISTORY_LIMIT = 10
#: History entries kept per (job, data type); older ones are forgotten.
HISTORY_KEPT = 100
KEYED_PART = -1
#: Seconds between attempts while Kafka or the topic is unavailable.
RETRY_S = 1.0
#: Seconds between checks for partitions added to the topic.
PARTITION_CHECK_S = 30.0


def _now_ms() -> int:
    return int(time.time() * 1000)


def _iso(ms: int | None) -> str | None:
    if not ms:
        return None
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).isoformat(timespec="milliseconds")


def _type_name(value: int) -> str:
    try:
        return ModelType.Name(value)
    except ValueError:
        return f"UNKNOWN({value})"


def model_label(name: str, version: str) -> str:
    """How a model is named to people: ``name vVERSION`` (just the name without a version)."""
    return f"{name} v{version}" if version else name


# -- the pure view ----------------------------------------------------------------------------

@dataclass
class _HistoryEntry:
    """One model that served a (job, data type), with what its keys last said about it."""
    job: str
    model_id: str
    name: str
    version: str
    model_type: int
    since_ms: int
    usage_by_key: dict[str, int] = field(default_factory=dict)
    last_seen_ms: int = 0

    def as_json(self) -> dict:
        return {"job": self.job, "model": model_label(self.name, self.version), "name": self.name,
                "version": self.version, "type": _type_name(self.model_type), "model_id": self.model_id,
                "since_ms": self.since_ms, "since": _iso(self.since_ms),
                "usage": sum(self.usage_by_key.values()), "last_seen_ms": self.last_seen_ms}


class ModelStateView:
    """Serving statistics of every job and data type, built from the state topic's records.

    Thread-safe: one thread may ingest while others query. Keys identify the publisher
    (``<job>/<dataType>`` or ``<job>/<dataType>/<part>``); the job, data type and part are read
    from the message itself and from the key only when the message leaves them empty.

    The current view is a function of the latest message per key, so rebuilding it from a
    compacted topic gives the same answer. The history is derived from the stream (a part
    switching to a new ``modelId`` starts or joins a history entry) and is therefore only
    complete from the moment ingestion started (``history_complete_since_ms``); before that,
    compaction may have removed the messages of replaced models.
    """

    def __init__(self, history_complete_since_ms: int | None = None):
        self._lock = threading.RLock()
        self._latest: dict[str, ModelStats] = {}
        self._history: dict[tuple[str, str], list[_HistoryEntry]] = {}
        self._entry_of_key: dict[str, _HistoryEntry] = {}
        self.history_complete_since_ms = (_now_ms() if history_complete_since_ms is None
                                          else history_complete_since_ms)
        self.messages = 0
        self.tombstones = 0
        self.undecodable = 0
        self.last_message_ms: int | None = None

    # -- ingestion ------------------------------------------------------------------------

    def ingest(self, key: str | bytes | None, value: bytes | None) -> ModelStats | None:
        """Take one record of the state topic: a serialized ``ModelStats``, or None (tombstone)
        to forget that key. Undecodable records are counted (``health()``) and skipped."""
        if isinstance(key, bytes):
            key = key.decode("utf-8", errors="replace")
        with self._lock:
            self.messages += 1
            self.last_message_ms = _now_ms()
            if value is None:
                self.tombstones += 1
                if key is not None:
                    self._latest.pop(key, None)
                    self._entry_of_key.pop(key, None)
                return None
            try:
                stats = ModelStats.FromString(value)
            except DecodeError as exc:
                self.undecodable += 1
                log.warning("skipping an undecodable state record (key %r): %s", key, exc)
                return None
            self._complete_from_key(stats, key)
            if not stats.dataType:
                self.undecodable += 1
                log.warning("skipping a state record without data type (key %r)", key)
                return None
            key = key or self._key_of(stats)
            self._latest[key] = stats
            self._record_history(key, stats)
            return stats

    @staticmethod
    def _key_of(stats: ModelStats) -> str:
        base = f"{stats.job}/{stats.dataType}"
        return base if stats.part == KEYED_PART else f"{base}/{stats.part}"

    @staticmethod
    def _complete_from_key(stats: ModelStats, key: str | None) -> None:
        if not key or (stats.job and stats.dataType):
            return
        pieces = key.split("/")
        if not stats.job and pieces:
            stats.job = pieces[0]
        if not stats.dataType and len(pieces) > 1:
            stats.dataType = pieces[1]
        if len(pieces) == 2 and stats.part == 0:
            stats.part = KEYED_PART

    def _record_history(self, key: str, stats: ModelStats) -> None:
        if not stats.hasModel or not stats.modelId:
            self._entry_of_key.pop(key, None)
            return
        entries = self._history.setdefault((stats.job, stats.dataType), [])
        entry = self._entry_of_key.get(key)
        if entry is None or entry.model_id != stats.modelId:
            entry = self._entry_for(entries, stats)
            self._entry_of_key[key] = entry
        entry.usage_by_key[key] = stats.usage
        entry.last_seen_ms = max(entry.last_seen_ms, stats.publishedMs or _now_ms())
        if stats.sinceMs and (not entry.since_ms or stats.sinceMs < entry.since_ms):
            entry.since_ms = stats.sinceMs

    @staticmethod
    def _entry_for(entries: list[_HistoryEntry], stats: ModelStats) -> _HistoryEntry:
        """The entry a key switching to ``stats.modelId`` belongs to: the newest entry of that
        model, unless another model started serving after it and before this key's switch (then
        the model came back: a new entry)."""
        same = [e for e in entries if e.model_id == stats.modelId]
        if same:
            newest = max(same, key=lambda e: e.since_ms)
            later = [e for e in entries if e is not newest and e.since_ms > newest.since_ms]
            if all(e.since_ms >= stats.sinceMs for e in later):
                return newest
        entry = _HistoryEntry(job=stats.job, model_id=stats.modelId, name=stats.modelName,
                              version=stats.modelVersion, model_type=stats.modelType,
                              since_ms=stats.sinceMs)
        entries.append(entry)
        entries.sort(key=lambda e: e.since_ms)
        del entries[:-HISTORY_KEPT]
        return entry

    # -- queries --------------------------------------------------------------------------

    def data_types(self) -> list[str]:
        with self._lock:
            return sorted({s.dataType for s in self._latest.values()})

    def models(self) -> dict:
        """Every data type with, per job, its current model and statistics."""
        with self._lock:
            by_type: dict[str, dict[str, list[tuple[str, ModelStats]]]] = {}
            for key, stats in self._latest.items():
                by_type.setdefault(stats.dataType, {}).setdefault(stats.job, []).append((key, stats))
            return {"data_types": {dt: self._data_type_json(dt, jobs) for dt, jobs in sorted(by_type.items())},
                    "count": len(by_type), "as_of_ms": _now_ms(),
                    "history_complete_since_ms": self.history_complete_since_ms}

    def state(self, data_type: str) -> dict | None:
        """One data type as in :meth:`models` (with ``data_type`` and ``jobs``), or None."""
        with self._lock:
            jobs: dict[str, list[tuple[str, ModelStats]]] = {}
            for key, stats in self._latest.items():
                if stats.dataType == data_type:
                    jobs.setdefault(stats.job, []).append((key, stats))
            if not jobs:
                return None
            return self._data_type_json(data_type, jobs)

    def history(self, data_type: str, limit: int = DEFAULT_HISTORY_LIMIT) -> dict | None:
        """The last ``limit`` models that served ``data_type`` (in any job), newest first, each
        with the last usage reported for it; None for a data type never seen. Complete only
        from ``history_complete_since_ms`` on (see the class docstring)."""
        with self._lock:
            entries = [e for (job, dt), es in self._history.items() if dt == data_type for e in es]
            if not entries and not any(s.dataType == data_type for s in self._latest.values()):
                return None
            entries.sort(key=lambda e: (e.since_ms, e.last_seen_ms), reverse=True)
            return {"data_type": data_type, "models": [e.as_json() for e in entries[:max(limit, 0)]],
                    "history_complete_since_ms": self.history_complete_since_ms,
                    "history_complete_since": _iso(self.history_complete_since_ms),
                    "note": "complete from history_complete_since on; earlier models are only known "
                            "if their statistics survived the topic's compaction"}

    def health(self) -> dict:
        with self._lock:
            return {"keys": len(self._latest), "data_types": len({s.dataType for s in self._latest.values()}),
                    "messages": self.messages, "tombstones": self.tombstones,
                    "undecodable": self.undecodable, "last_message_ms": self.last_message_ms}

    # -- merging --------------------------------------------------------------------------

    def _data_type_json(self, data_type: str, jobs: dict[str, list[tuple[str, ModelStats]]]) -> dict:
        return {"data_type": data_type,
                "jobs": {job: self._job_json(job, data_type, parts) for job, parts in sorted(jobs.items())}}

    @staticmethod
    def _job_json(job: str, data_type: str, parts: list[tuple[str, ModelStats]]) -> dict:
        """Merge the parts of one (job, data type). The current model is the one of the most
        recent ``sinceMs``; usage and scoring times count the parts serving it (all of them
        unless there is jitter); records without model and dead letters count every part."""
        parts = sorted(parts, key=lambda kv: (kv[1].part, kv[0]))
        stats = [s for _, s in parts]
        with_model = [s for s in stats if s.hasModel]
        current = max(with_model, key=lambda s: (s.sinceMs, s.publishedMs), default=None)
        serving = [s for s in with_model if current is not None and s.modelId == current.modelId]
        usage = sum(s.usage for s in serving)
        scored = [s for s in serving if s.usage > 0]
        total_micros = sum(s.totalMicros for s in serving)
        answer: dict[str, Any] = {
            "job": job, "data_type": data_type, "parts": len(stats),
            "has_model": current is not None,
            "model": None,
            "stats": {
                "usage": usage,
                "mean_ms": round(total_micros / usage / 1000, 6) if usage else None,
                "min_ms": round(min(s.minMicros for s in scored) / 1000, 6) if scored else None,
                "max_ms": round(max(s.maxMicros for s in scored) / 1000, 6) if scored else None,
                "total_ms": round(total_micros / 1000, 6),
                "no_model": sum(s.noModel for s in stats),
                "dead_letters": sum(s.deadLetters for s in stats),
            },
            "published_ms": max((s.publishedMs for s in stats), default=0),
        }
        if current is not None:
            since_ms = min((s.sinceMs for s in serving if s.sinceMs), default=current.sinceMs)
            answer["model"] = {"name": current.modelName, "description": current.modelDescription,
                               "type": _type_name(current.modelType), "version": current.modelVersion,
                               "id": current.modelId, "since_ms": since_ms, "since": _iso(since_ms)}
        serving_what = {(s.modelId if s.hasModel else "") for s in stats}
        answer["jitter"] = len(serving_what) > 1
        answer["instances"] = [
            {"part": s.part, "subtask": s.subtask,
             "model": model_label(s.modelName, s.modelVersion) if s.hasModel else None,
             "model_id": s.modelId if s.hasModel else None, "usage": s.usage,
             "since_ms": s.sinceMs or None, "published_ms": s.publishedMs or None}
            for s in stats]
        return answer


# -- the Kafka feed -----------------------------------------------------------------------------

class KafkaStateFeed(threading.Thread):
    """Reads the state topic from the beginning into a view, in the background.

    No consumer group (every service instance reads everything), ``read_committed`` (a job
    publishing transactionally shows only committed statistics). ``ready`` is set once every
    partition has been read up to the end offset it had when reading started; ``status`` is
    ``connecting`` (no broker yet), ``waiting_for_topic`` (the topic does not exist; it is not
    auto-created), ``catching_up``, then ``ok``. Failures are retried every second and shown
    in ``error``; the view keeps serving what it has. Partitions added to the topic later are
    picked up within ``PARTITION_CHECK_S``.
    """

    def __init__(self, view: ModelStateView, bootstrap_servers: str, topic: str = DEFAULT_TOPIC,
                 poll_ms: int = 200, **consumer_config):
        super().__init__(name=f"state-feed-{topic}", daemon=True)
        self.view = view
        self.bootstrap_servers = bootstrap_servers
        self.topic = topic
        self.poll_ms = poll_ms
        self.consumer_config = consumer_config
        self.ready = threading.Event()
        self.stopped = threading.Event()
        self.status = "starting"
        self.error: str | None = None
        self.lag: int | None = None
        self._targets: dict = {}
        self._next_partition_check = 0.0

    def _consumer(self):
        from kafka import KafkaConsumer

        from modelserving.kafka.admin import MAX_MESSAGE_BYTES

        config = dict(bootstrap_servers=self.bootstrap_servers, group_id=None,
                      auto_offset_reset="earliest", enable_auto_commit=False,
                      isolation_level="read_committed", allow_auto_create_topics=False,
                      client_id="modelserving-state-service",
                      fetch_max_bytes=MAX_MESSAGE_BYTES, max_partition_fetch_bytes=MAX_MESSAGE_BYTES)
        config.update(self.consumer_config)
        return KafkaConsumer(**config)

    def run(self) -> None:
        consumer = None
        try:
            while not self.stopped.is_set():
                try:
                    if consumer is None:
                        if not self.ready.is_set():
                            self.status = "connecting"
                        consumer = self._consumer()
                    self._step(consumer)
                    self.error = None
                except Exception as exc:  # noqa: BLE001 - keep serving what we have; say why in health
                    if self.stopped.is_set():
                        break
                    text = str(exc)
                    self.error = text if text.startswith(type(exc).__name__) else f"{type(exc).__name__}: {text}"
                    log.warning("reading %s from %s failed (retrying): %s", self.topic,
                                self.bootstrap_servers, self.error)
                    self.stopped.wait(RETRY_S)
        finally:
            if consumer is not None:
                consumer.close()

    def _step(self, consumer) -> None:
        from kafka import TopicPartition

        assigned = set(consumer.assignment())
        if not assigned or time.monotonic() >= self._next_partition_check:
            self._next_partition_check = time.monotonic() + PARTITION_CHECK_S
            partitions = consumer.partitions_for_topic(self.topic)
            if not partitions:
                self.status = "waiting_for_topic"
                self._next_partition_check = 0.0
                self.stopped.wait(RETRY_S)
                return
            wanted = {TopicPartition(self.topic, p) for p in partitions}
            new = wanted - assigned
            if new:  # the first time, or partitions added to the topic: read them from the beginning
                consumer.assign(sorted(wanted | assigned))
                consumer.seek_to_beginning(*new)
                if not self.ready.is_set():
                    self._targets.update(consumer.end_offsets(sorted(new)))
                    self.status = "catching_up"
                log.info("reading %s from the beginning: %s new partition(s) of %s", self.topic,
                         len(new), len(wanted))
        for records in consumer.poll(timeout_ms=self.poll_ms).values():
            for record in records:
                self.view.ingest(record.key, record.value)
        if not self.ready.is_set():
            remaining = self._remaining(consumer)
            self.lag = remaining
            if remaining == 0:
                self.status = "ok"
                self.ready.set()
                log.info("caught up with %s: %s", self.topic, self.view.health())

    def _remaining(self, consumer) -> int:
        remaining = 0
        for tp, end in self._targets.items():
            position = consumer.position(tp, timeout_ms=5000)
            if position is None:
                remaining += max(end, 1)
            else:
                remaining += max(end - position, 0)
        return remaining

    def stop(self, timeout_s: float = 5.0) -> None:
        self.stopped.set()
        if self.is_alive():
            self.join(timeout_s)

    def health(self) -> dict:
        return {"status": self.status, "ready": self.ready.is_set(), "topic": self.topic,
                "bootstrap_servers": self.bootstrap_servers, "lag_at_start": self.lag,
                "error": self.error, "alive": self.is_alive()}


# -- HTTP -----------------------------------------------------------------------------------------

def _json(body: Any, status: int = 200) -> Response:
    return Response(json.dumps(body, indent=2, sort_keys=False) + "\n", status=status,
                    content_type="application/json")


class StateApp:
    """The WSGI application over a view (and the feed's health, if there is a feed)."""

    def __init__(self, view: ModelStateView, feed: KafkaStateFeed | None = None,
                 refresh_s: float = 2.0):
        self.view = view
        self.feed = feed
        self.refresh_s = refresh_s
        self.urls = Map([
            Rule("/", endpoint="page", methods=["GET"]),
            Rule("/models", endpoint="models", methods=["GET"]),
            Rule("/state/<data_type>", endpoint="state", methods=["GET"]),
            Rule("/history/<data_type>", endpoint="history", methods=["GET"]),
            Rule("/health", endpoint="health", methods=["GET"]),
        ], strict_slashes=False)

    def __call__(self, environ, start_response):
        request = Request(environ)
        try:
            endpoint, args = self.urls.bind_to_environ(environ).match()
            response = getattr(self, "on_" + endpoint)(request, **args)
        except HTTPException as exc:
            response = _json({"error": exc.name, "message": exc.description, "path": request.path},
                             exc.code or 500)
        except Exception:  # noqa: BLE001 - one broken answer must not stop the server
            log.exception("answering %s failed", request.path)
            response = _json({"error": "Internal Server Error", "path": request.path}, 500)
        return response(environ, start_response)

    # -- endpoints ------------------------------------------------------------------------

    def _unknown(self, data_type: str) -> Response:
        known = self.view.data_types()
        listing = ", ".join(known) if known else "none yet"
        return _json({"error": "Not Found", "data_type": data_type, "known_data_types": known,
                      "message": f"no serving statistics for data type '{data_type}'; "
                                 f"known data types: {listing}"}, 404)

    def on_models(self, request: Request) -> Response:
        return _json(self.view.models())

    def on_state(self, request: Request, data_type: str) -> Response:
        state = self.view.state(data_type)
        return self._unknown(data_type) if state is None else _json(state)

    def on_history(self, request: Request, data_type: str) -> Response:
        try:
            limit = int(request.args.get("limit", DEFAULT_HISTORY_LIMIT))
        except ValueError:
            return _json({"error": "Bad Request", "message": "limit must be an integer"}, 400)
        history = self.view.history(data_type, limit)
        return self._unknown(data_type) if history is None else _json(history)

    def health(self) -> dict:
        view = self.view.health()
        if self.feed is None:
            return {"status": "ok", "ready": True, "feed": None, "view": view}
        feed = self.feed.health()
        status = feed["status"] if feed["alive"] or feed["status"] == "error" else "error"
        return {"status": status, "ready": feed["ready"], "feed": feed, "view": view}

    def on_health(self, request: Request) -> Response:
        health = self.health()
        return _json(health, 200 if health["ready"] and health["status"] == "ok" else 503)

    def on_page(self, request: Request) -> Response:
        if request.args.get("fragment"):
            return Response(self.render_tables(), content_type="text/html; charset=utf-8")
        return Response(self.render_page(), content_type="text/html; charset=utf-8")

    # -- the page -------------------------------------------------------------------------

    def render_page(self) -> str:
        refresh_ms = int(self.refresh_s * 1000)
        return _PAGE.format(refresh_s=max(int(round(self.refresh_s)), 1), refresh_ms=refresh_ms,
                            tables=self.render_tables())

    def render_tables(self) -> str:
        e = html.escape
        models = self.view.models()
        health = self.health()
        out = [f'<p id="status" data-status="{e(health["status"])}">service: '
               f'<span class="service-status">{e(health["status"])}</span> · '
               f'<span id="count">{models["count"]}</span> data type(s) · updated '
               f'<span id="as-of">{e(_iso(models["as_of_ms"]) or "")}</span></p>']
        if not models["data_types"]:
            out.append('<p id="empty">No serving statistics yet.</p>')
        for data_type, entry in models["data_types"].items():
            out.append(f'<section class="data-type" data-type="{e(data_type)}">'
                       f'<h2>{e(data_type)}</h2><table data-type="{e(data_type)}"><thead><tr>'
                       + "".join(f"<th>{c}</th>" for c in _COLUMNS) + "</tr></thead><tbody>")
            for job, view in entry["jobs"].items():
                model = view["model"] or {}
                stats = view["stats"]
                cells = [
                    ("job", job),
                    ("model-name", model.get("name", "(no model)")),
                    ("version", model.get("version", "")),
                    ("model-type", model.get("type", "")),
                    ("since", model.get("since") or ""),
                    ("usage", stats["usage"]),
                    ("mean-ms", _ms(stats["mean_ms"])),
                    ("min-ms", _ms(stats["min_ms"])),
                    ("max-ms", _ms(stats["max_ms"])),
                    ("no-model", stats["no_model"]),
                    ("dead-letters", stats["dead_letters"]),
                ]
                row = "".join(f'<td class="{cls}">{e(str(value))}</td>' for cls, value in cells)
                if view["jitter"]:
                    jitter = "; ".join(f"subtask {i['subtask']} (part {i['part']}): {i['model'] or 'no model'}"
                                       for i in view["instances"])
                    row += f'<td class="jitter" data-jitter="true">yes: {e(jitter)}</td>'
                else:
                    row += '<td class="jitter" data-jitter="false">no</td>'
                out.append(f'<tr data-type="{e(data_type)}" data-job="{e(job)}" '
                           f'data-model-id="{e(model.get("id", ""))}">{row}</tr>')
            out.append("</tbody></table>")
            history = self.view.history(data_type, 5) or {"models": []}
            if history["models"]:
                items = "".join(f'<li class="history-entry">{e(h["job"])}: {e(h["model"])} '
                                f'({e(h["type"])}) since {e(h["since"] or "?")}, usage {h["usage"]}</li>'
                                for h in history["models"])
                out.append(f'<details class="history" data-type="{e(data_type)}"><summary>recent models'
                           f'</summary><ol>{items}</ol></details>')
            out.append("</section>")
        return "\n".join(out)


def _ms(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"


_COLUMNS = ("job", "model", "version", "type", "since", "usage", "mean ms", "min ms", "max ms",
            "no model", "dead letters", "jitter")

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>Model serving state</title>
<noscript><meta http-equiv="refresh" content="{refresh_s}"></noscript>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }}
table {{ border-collapse: collapse; margin-bottom: .5em; }}
th, td {{ border: 1px solid #ccc; padding: .3em .6em; text-align: left; }}
th {{ background: #f0f0f0; }}
td.usage, td.mean-ms, td.min-ms, td.max-ms, td.no-model, td.dead-letters {{ text-align: right; }}
td[data-jitter="true"] {{ background: #fff3cd; }}
#status {{ color: #555; }}
</style></head>
<body>
<h1>Model serving state</h1>
<p>JSON: <a href="models">/models</a> · <a href="health">/health</a> ·
<code>/state/&lt;data type&gt;</code> · <code>/history/&lt;data type&gt;</code></p>
<div id="tables">
{tables}
</div>
<script>
(function () {{
  var target = document.getElementById("tables");
  function refresh() {{
    fetch("?fragment=1", {{cache: "no-store"}})
      .then(function (r) {{ if (!r.ok) throw new Error(r.status); return r.text(); }})
      .then(function (text) {{
        var open = Array.prototype.map.call(target.querySelectorAll("details[open]"),
                                            function (d) {{ return d.getAttribute("data-type"); }});
        target.innerHTML = text;
        target.querySelectorAll("details").forEach(function (d) {{
          if (open.indexOf(d.getAttribute("data-type")) >= 0) d.open = true;
        }});
      }})
      .catch(function (err) {{
        var s = document.getElementById("status");
        if (s) s.textContent = "service unreachable (" + err + "), retrying";
      }});
  }}
  setInterval(refresh, {refresh_ms});
}})();
</script>
</body></html>
"""


class StateService:
    """The HTTP service over a view, fed from Kafka when ``bootstrap_servers`` is given.

    ``start()`` serves in a background thread (``port=0`` picks a free port; ``url`` tells
    which), ``stop()`` ends the server and the feed. Without ``bootstrap_servers`` the view is
    fed by the caller (``service.view.ingest(...)``), as in unit tests.
    """

    def __init__(self, bootstrap_servers: str | None = None, topic: str = DEFAULT_TOPIC,
                 host: str = DEFAULT_HOST, port: int = 0, view: ModelStateView | None = None,
                 refresh_s: float = 2.0, consumer_config: dict | None = None):
        self.view = view or ModelStateView()
        self.feed = (KafkaStateFeed(self.view, bootstrap_servers, topic, **(consumer_config or {}))
                     if bootstrap_servers else None)
        self.app = StateApp(self.view, self.feed, refresh_s=refresh_s)
        self.host = host
        self.port = port
        self._server = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("the state service is not started")
        host = self.host if self.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self._server.server_port}"

    @property
    def ready(self) -> bool:
        return self.feed is None or self.feed.ready.is_set()

    def wait_ready(self, timeout_s: float = 30.0) -> bool:
        return self.feed is None or self.feed.ready.wait(timeout_s)

    def _bind(self) -> None:
        self._server = make_server(self.host, self.port, self.app, threaded=True)
        self._server.daemon_threads = True
        self.port = self._server.server_port

    def start(self) -> "StateService":
        if self._server is not None:
            raise RuntimeError("the state service is already started")
        self._bind()
        if self.feed is not None:
            self.feed.start()
        self._thread = threading.Thread(target=self._server.serve_forever, name="state-http",
                                        kwargs={"poll_interval": 0.2}, daemon=True)
        self._thread.start()
        log.info("state service on %s", self.url)
        return self

    def serve_forever(self) -> None:
        """Serve in the calling thread until interrupted (Ctrl-C) or ``stop()``."""
        self._bind()
        if self.feed is not None:
            self.feed.start()
        log.info("state service on %s (topic %s)", self.url, self.feed.topic if self.feed else "-")
        try:
            self._server.serve_forever(poll_interval=0.5)
        except KeyboardInterrupt:
            pass
        finally:
            self.stop()

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            if self._thread is not None:
                server.shutdown()
                self._thread.join(5)
                self._thread = None
            server.server_close()
        if self.feed is not None:
            self.feed.stop()

    def __enter__(self) -> "StateService":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def serve(bootstrap_servers: str, topic: str = DEFAULT_TOPIC, host: str = DEFAULT_HOST,
          port: int = DEFAULT_PORT, refresh_s: float = 2.0, consumer_config: dict | None = None) -> None:
    """Run the state service in the foreground until Ctrl-C."""
    StateService(bootstrap_servers, topic, host, port, refresh_s=refresh_s,
                 consumer_config=consumer_config).serve_forever()


# -- CLI ----------------------------------------------------------------------------------------

def _cmd_serve(args) -> int:
    if not getattr(args, "verbose", False):  # one line per HTTP request (every 2 s per open page) is noise
        logging.getLogger("werkzeug").setLevel(logging.WARNING)
    bootstrap = args.bootstrap or os.environ.get("MODELSERVING_BOOTSTRAP_SERVERS", "127.0.0.1:9092")
    print(f"state service on http://{args.host}:{args.port}/ (topic {args.topic} on {bootstrap}); "
          f"Ctrl-C stops it", flush=True)
    serve(bootstrap, topic=args.topic, host=args.host, port=args.port)
    return 0


def register(subparsers) -> None:
    """Add ``state serve`` to the ``modelserving`` parser."""
    state = subparsers.add_parser("state", help="the state service: serving statistics over HTTP")
    actions = state.add_subparsers(dest="state_action", required=True)
    serve_p = actions.add_parser("serve", help="serve the model-state topic over HTTP (JSON and a page)",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    serve_p.add_argument("--bootstrap", help="Kafka bootstrap servers (else MODELSERVING_BOOTSTRAP_SERVERS, "
                                             "else 127.0.0.1:9092)")
    serve_p.add_argument("--topic", default=os.environ.get("MODELSERVING_STATE_TOPIC", DEFAULT_TOPIC),
                         help="compacted topic of ModelStats messages")
    serve_p.add_argument("--host", default=DEFAULT_HOST, help="address to bind (0.0.0.0 for every interface)")
    serve_p.add_argument("--port", type=int, default=DEFAULT_PORT)
    serve_p.set_defaults(func=_cmd_serve)


__all__ = ["DEFAULT_PORT", "DEFAULT_TOPIC", "KafkaStateFeed", "ModelStateView", "StateApp", "StateService",
           "model_label", "register", "serve"]

