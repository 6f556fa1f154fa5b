"""The state service: the jobs' serving statistics, queryable over HTTP.

PyFlink state cannot be made queryable, so both jobs publish their serving statistics as
``ModelStats`` messages to a compacted Kafka topic (``Settings.state_topic``). The service
is three parts, each usable on its own:

* ``view.ModelStateView``: pure; the topic's records in, JSON-able answers out;
* ``feed.KafkaStateFeed``: a thread reading the topic from the beginning into the view,
  with the Kafka client configuration (bootstrap, SASL, TLS) of the settings;
* ``app.StateApp``: the werkzeug application (JSON endpoints and a static page);
* ``repository.RepositoryView``: the model repository (``Settings.repository_topic``), fed
  by a second feed of its own when that topic is set.
* ``timeline.timeline``: per data type, the repository's deployments (the models and their
  canary or shadow candidates) joined with the statistics' usage, candidate and drift.

:class:`StateService` here puts them together and runs the HTTP server:

    with StateService(settings, port=0) as service:   # port 0: any free port
        service.wait_ready(30)
        print(service.url + "/models")
"""
from __future__ import annotations

import logging
import socket
import threading

from werkzeug.serving import get_sockaddr, make_server, select_address_family

from jobs.settings import Settings, SettingsError
from modelserving.errors import ToolError, UsageError
from modelserving.state.app import StateApp
from modelserving.state.feed import KafkaStateFeed
from modelserving.state.repository import RepositoryView
from modelserving.state.view import ModelStateView

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 5500


class StateServiceError(ToolError):
    """The state service cannot run as asked (its address cannot be bound)."""


class StateService:
    """The HTTP service over a view, fed from ``settings.state_topic`` when settings are given.

    ``start()`` serves in a background thread, ``serve_forever()`` in the calling one;
    ``stop()`` ends the server and the feed. ``port=0`` picks a free port; ``url`` says which
    once bound (``bind()`` binds without serving yet). Without settings the view is fed by
    the caller (``service.view.ingest(...)``, ``service.repository.ingest(...)`` of a
    ``repository`` given), as in unit tests. ``consumer_overrides`` are extra kafka-python
    consumer arguments. The repository topic is read beside the state topic when
    ``repository_topic`` is set; readiness waits for the state topic only.

    Raises ``UsageError`` for settings that cannot reach Kafka (no state topic, SASL without
    credentials) and ``StateServiceError`` when the address cannot be bound.
    """

    def __init__(self, settings: Settings | None = None, host: str = DEFAULT_HOST,
                 port: int = DEFAULT_PORT, *, view: ModelStateView | None = None,
                 repository: RepositoryView | None = None,
                 consumer_overrides: dict | None = None):
        self.settings = settings
        self.view = view or ModelStateView()
        self.feed = None
        self.repository = repository
        self.repository_feed = None
        if settings is not None:
            if not settings.state_topic:
                raise UsageError("the state topic is empty (state_topic / MODELSERVING_STATE_TOPIC): "
                                 "there is nothing for the state service to read")
            try:
                self.feed = KafkaStateFeed(self.view, settings, consumer_overrides=consumer_overrides)
                if settings.repository_topic:
                    self.repository = self.repository or RepositoryView()
                    self.repository_feed = KafkaStateFeed(
                        self.repository, settings, consumer_overrides=consumer_overrides,
                        topic=settings.repository_topic)
            except SettingsError as exc:
                raise UsageError(f"state service: {exc}") from None
        self.app = StateApp(self.view, self.feed, self.repository, self.repository_feed)
        self.host = host
        self.port = port
        self._server = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("the state service is not bound (bind() or start() first)")
        host = self.host if self.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    @property
    def ready(self) -> bool:
        return self.feed is None or self.feed.ready.is_set()

    def wait_ready(self, timeout_s: float = 30.0) -> bool:
        """True once the feed has read the topic up to where it ended at start."""
        return self.feed is None or self.feed.ready.wait(timeout_s)

    def bind(self) -> "StateService":
        """Take the address now, so that a taken port fails here with a one-line error.

        The socket is bound here rather than by werkzeug, which reports a taken port by
        printing and exiting the process."""
        if self._server is not None:
            return self
        family = select_address_family(self.host, self.port)
        listener = socket.socket(family, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(get_sockaddr(self.host, self.port, family))
            listener.listen(128)
        except OSError as exc:
            listener.close()
            raise StateServiceError(f"the state service cannot listen on {self.host}:{self.port}: "
                                    f"{exc.strerror or exc} (choose another host or port)") from None
        try:
            self._server = make_server(self.host, self.port, self.app, threaded=True,
                                       fd=listener.fileno())
        finally:
            listener.close()  # werkzeug works on its own duplicate of the socket
        self._server.daemon_threads = True
        self.port = self._server.port
        return self

    def _start_feed(self) -> None:
        for feed in (self.feed, self.repository_feed):
            if feed is not None and not feed.is_alive() and not feed.stopped.is_set():
                feed.start()

    def start(self) -> "StateService":
        """Serve in a background thread; returns at once."""
        if self._thread is not None:
            raise RuntimeError("the state service is already started")
        self.bind()
        self._start_feed()
        self._thread = threading.Thread(target=self._server.serve_forever, name="state-http",
                                        kwargs={"poll_interval": 0.2}, daemon=True)
        self._thread.start()
        log.debug("state service on %s", self.url)
        return self

    def serve_forever(self) -> None:
        """Serve in the calling thread until interrupted (Ctrl-C)."""
        self.bind()
        self._start_feed()
        log.debug("state service on %s (topic %s)", self.url, self.feed.topic if self.feed else "-")
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
        for feed in (self.feed, self.repository_feed):
            if feed is not None:
                feed.stop()

    def __enter__(self) -> "StateService":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


__all__ = ["DEFAULT_HOST", "DEFAULT_PORT", "StateService", "StateServiceError"]
