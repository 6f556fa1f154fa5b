"""The state service's WSGI application (werkzeug): JSON endpoints over a view, and the page.

    GET /models               every data type, per job: current model and statistics
    GET /state/<data_type>    one data type (404 naming the known ones if unknown)
    GET /history/<data_type>  the last models seen for a data type, newest first (?limit=N)
    GET /health               200 once caught up with the topic, 503 before (status catching_up)
    GET /repository           the model repository: per data type its latest version and who
                              serves what (404 when the service reads no repository topic)
    GET /repository/<data_type>   every version of a data type with each job's decisions,
                              oldest first (?version=V: that version alone)
    GET /timeline             per data type of the repository, its lifecycle timeline: every
                              deployment (primary or candidate) in time order with its usage,
                              the current candidate's figures and the current model's drift
                              (404 when the service reads no repository topic)
    GET /timeline/<data_type> one data type's timeline
    GET /                     page.html: a static page whose script reads the endpoints above

The server never writes data into HTML: the page is a fixed file, and its script puts every
value into the DOM as text. Data types and model names come from Kafka messages anyone with
write access to the topic can send, so they must never be interpreted as markup. The page
is served with a Content-Security-Policy allowing only its own inline script and style (by
hash), so even a mistake in the script could not run injected code.
"""
from __future__ import annotations

import base64
import hashlib
import json
import logging
import re
from importlib import resources
from typing import Any

from werkzeug.exceptions import HTTPException
from werkzeug.routing import Map, Rule
from werkzeug.wrappers import Request, Response

from modelserving.state.feed import KafkaStateFeed
from modelserving.state.repository import RepositoryView
from modelserving.state.timeline import timeline, timelines
from modelserving.state.view import DEFAULT_HISTORY_LIMIT, ModelStateView

log = logging.getLogger(__name__)

PAGE_FILE = "page.html"
_COMMON_HEADERS = {"X-Content-Type-Options": "nosniff", "Cache-Control": "no-store"}


def _json(body: Any, status: int = 200) -> Response:
    """A JSON answer. ``<``, ``>`` and ``&`` are written as ``\\u`` escapes (the same JSON
    value), so no byte of a data type or model name can read as markup to anything that
    ignores the content type."""
    text = (json.dumps(body, indent=2, sort_keys=False)
            .replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026"))
    return Response(text + "\n", status=status, content_type="application/json",
                    headers=_COMMON_HEADERS)


def load_page() -> str:
    """The page as shipped in the package (setup.py installs ``modelserving/state/*.html``)."""
    return resources.files("modelserving.state").joinpath(PAGE_FILE).read_text(encoding="utf-8")


def content_security_policy(page: str) -> str:
    """A policy admitting exactly the page's inline ``<script>`` and ``<style>`` blocks and
    requests to this service: nothing else can run, load or be submitted."""
    def hashes(tag: str) -> str:
        blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", page, flags=re.DOTALL)
        return " ".join("'sha256-" + base64.b64encode(hashlib.sha256(b.encode()).digest()).decode() + "'"
                        for b in blocks) or "'none'"
    return (f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; "
            "connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; "
            "frame-ancestors 'none'")


class StateApp:
    """The WSGI application over a view (and the feed's health, if there is a feed)."""

    def __init__(self, view: ModelStateView, feed: KafkaStateFeed | None = None,
                 repository: RepositoryView | None = None,
                 repository_feed: KafkaStateFeed | None = None):
        self.view = view
        self.feed = feed
        self.repository = repository
        self.repository_feed = repository_feed
        self.page = load_page()
        self.page_headers = {**_COMMON_HEADERS,
                             "Content-Security-Policy": content_security_policy(self.page)}
        self.urls = Map([
            Rule("/", endpoint="page", methods=["GET"]),
            Rule("/models", endpoint="models", methods=["GET"]),
            # path: a data type may contain "/" (the page asks for whatever the topic holds)
            Rule("/state/<path:data_type>", endpoint="state", methods=["GET"]),
            Rule("/history/<path:data_type>", endpoint="history", methods=["GET"]),
            Rule("/health", endpoint="health", methods=["GET"]),
            Rule("/repository", endpoint="repository", methods=["GET"]),
            Rule("/repository/<path:data_type>", endpoint="repository_history", methods=["GET"]),
            Rule("/timeline", endpoint="timelines", methods=["GET"]),
            Rule("/timeline/<path:data_type>", endpoint="timeline", methods=["GET"]),
            Rule("/favicon.ico", endpoint="favicon", methods=["GET"]),
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

    def on_repository(self, request: Request) -> Response:
        if self.repository is None:
            return self._no_repository()
        return _json(self.repository.listing())

    def on_repository_history(self, request: Request, data_type: str) -> Response:
        if self.repository is None:
            return self._no_repository()
        version = request.args.get("version")
        answer = (self.repository.history(data_type) if version is None
                  else self.repository.show(data_type, version))
        if answer is not None:
            return _json(answer)
        return self._not_in_repository(data_type, version)

    def on_timelines(self, request: Request) -> Response:
        if self.repository is None:
            return self._no_repository()
        return _json(timelines(self.repository, self.view))

    def on_timeline(self, request: Request, data_type: str) -> Response:
        if self.repository is None:
            return self._no_repository()
        answer = timeline(self.repository, self.view, data_type)
        return self._not_in_repository(data_type) if answer is None else _json(answer)

    def _not_in_repository(self, data_type: str, version: str | None = None) -> Response:
        known = self.repository.data_types()
        what = f"version '{version}' of " if version is not None else "model of "
        return _json({"error": "Not Found", "data_type": data_type, "known_data_types": known,
                      "message": f"the repository has no {what}data type '{data_type}'; known "
                                 f"data types: {', '.join(known) if known else 'none yet'}"}, 404)

    def _no_repository(self) -> Response:
        return _json({"error": "Not Found", "message": "this state service reads no repository "
                      "topic (repository_topic is empty)"}, 404)

    def health(self) -> dict:
        """The state topic's feed decides readiness; the repository's feed is reported beside
        it (a deployment without the repository topic still has its live state)."""
        view = self.view.health()
        repository = None
        if self.repository is not None:
            repository = {"view": self.repository.health(),
                          "feed": self.repository_feed.health() if self.repository_feed else None}
        if self.feed is None:
            return {"status": "ok", "ready": True, "feed": None, "view": view,
                    "repository": repository}
        feed = self.feed.health()
        status = feed["status"] if feed["alive"] or feed["status"] == "error" else "error"
        return {"status": status, "ready": feed["ready"], "feed": feed, "view": view,
                "repository": repository}

    def on_health(self, request: Request) -> Response:
        health = self.health()
        return _json(health, 200 if health["ready"] and health["status"] == "ok" else 503)

    def on_favicon(self, request: Request) -> Response:
        """No icon, said without an error (browsers ask for one on every page load)."""
        return Response(status=204, headers=_COMMON_HEADERS)

    def on_page(self, request: Request) -> Response:
        return Response(self.page, content_type="text/html; charset=utf-8", headers=self.page_headers)


__all__ = ["StateApp", "content_security_policy", "load_page"]
