"""EXTERNAL models: scored by a model server over HTTP, one call per batch of records.

The jobs hand a runtime a whole micro-batch at once, so a batch becomes one request (split
at ``max_rows_per_call``), and the call is synchronous but bounded:

* a deadline for the whole call (``Endpoint.timeout_s``, at most the job's
  ``model_server_timeout_ms``): the socket's timeout is set to the time left before every
  read, and new attempts after a connection error (refused, reset) wait 50, 100 ... ms only
  while the deadline allows;
* at most ``max_in_flight`` calls at once per server origin in one Python worker
  (``ServerConnections``: keep-alive connections, safe to share between threads);
* a circuit breaker per model (``CircuitBreaker``): after ``breaker_failures`` failed calls in
  a row every call is refused at once, and a background thread probes the server every
  ``breaker_reset_s`` with one row until it answers, so a server that is down or hung costs
  the stream a few timeouts, then nothing until it is back.

Every failure is a ``ModelUnavailable`` whose reason names the server, the model and what
went wrong; the serving core dead-letters the batch's records with it (kind
MODEL_UNAVAILABLE). Nothing here blocks longer than the timeout, and ``score_within`` is safe
to call from several threads at once (speculative execution scores models concurrently).
No call is made while loading: a server that is down when a model arrives or is restored
from a checkpoint must not make the model unloadable.
"""
from __future__ import annotations

import http.client
import logging
import ssl
import threading
import time
from collections import deque
from typing import Callable, Sequence
from urllib.parse import urlsplit

import numpy as np

from udfs.errors import ModelLoadError, ModelUnavailable, OutputError
from udfs.runtimes.base import FeatureBatch, LoadRequest, ModelRuntime, Prediction
from udfs.runtimes.endpoints import TENSORFLOW_SERVING, Endpoint, ModelServers
from udfs.runtimes.inference_protocols import (ProtocolError, tf_serving_outputs,
                                               tf_serving_request, v2_outputs, v2_request)
from udfs.runtimes.outputs import OutputReader, check_batch, vector_input_names, who

log = logging.getLogger("modelserving")

#: Largest answer read from a server; a bigger one is refused as unreadable.
MAX_ANSWER_BYTES = 16 * 1024 * 1024
_READ_CHUNK = 64 * 1024


class CallTimeout(Exception):
    """The call's deadline passed (connecting, waiting for a slot, or reading)."""


class ConnectionProblem(Exception):
    """No answer could be had on the connection (refused, reset, closed): worth a new attempt."""


# -- connections ------------------------------------------------------------------------------

class ServerConnections:
    """Keep-alive connections to one server origin, shared by every model on it in this
    process; ``max_in_flight`` bounds the calls at once. Thread-safe."""

    def __init__(self, origin: str, max_in_flight: int):
        parts = urlsplit(origin)
        self.origin = origin
        self._https = parts.scheme == "https"
        self._host = parts.hostname or ""
        self._port = parts.port or (443 if self._https else 80)
        self.max_in_flight = max_in_flight
        self._slots = threading.BoundedSemaphore(max_in_flight)
        self._idle: deque[http.client.HTTPConnection] = deque()
        self._lock = threading.Lock()
        self._tls = ssl.create_default_context() if self._https else None

    def post(self, path: str, body: bytes, headers: dict, deadline: float) -> tuple[int, bytes]:
        """(status, answer body) of one POST; ``CallTimeout`` at the deadline,
        ``ConnectionProblem`` when the connection failed before an answer."""
        if not self._slots.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise CallTimeout(f"all {self.max_in_flight} connections to the server were busy")
        try:
            connection = self._idle_connection()
            if connection is not None:
                try:
                    return self._exchange(connection, path, body, headers, deadline)
                except ConnectionProblem:   # the server closed it while idle: a fresh one
                    connection.close()
                except BaseException:
                    connection.close()
                    raise
            connection = self._new_connection()
            try:
                return self._exchange(connection, path, body, headers, deadline)
            except BaseException:
                connection.close()
                raise
        finally:
            self._slots.release()

    def _exchange(self, connection, path, body, headers, deadline) -> tuple[int, bytes]:
        try:
            connection.timeout = _left(deadline)
            if connection.sock is None:
                connection.connect()
            sock = connection.sock
            sock.settimeout(_left(deadline))
            connection.request("POST", path, body=body, headers=headers)
            sock.settimeout(_left(deadline))
            response = connection.getresponse()
            answer = _read_bounded(response, sock, deadline)
        except (TimeoutError, CallTimeout) as exc:
            raise CallTimeout(str(exc) or "timed out") from None
        except (ConnectionError, http.client.RemoteDisconnected, http.client.CannotSendRequest,
                http.client.ResponseNotReady) as exc:
            raise ConnectionProblem(f"{type(exc).__name__}: {exc}") from None
        except OSError as exc:   # unreachable network, unknown host
            raise ConnectionProblem(f"{type(exc).__name__}: {exc}") from None
        except http.client.HTTPException as exc:   # a status line or headers that are not HTTP
            raise ProtocolError(f"not an HTTP answer ({type(exc).__name__}: {exc})") from None
        if response.will_close:
            connection.close()
        else:
            self._give(connection)
        return response.status, answer

    def _idle_connection(self) -> http.client.HTTPConnection | None:
        with self._lock:
            return self._idle.pop() if self._idle else None

    def _new_connection(self) -> http.client.HTTPConnection:
        if self._https:
            return http.client.HTTPSConnection(self._host, self._port, context=self._tls)
        return http.client.HTTPConnection(self._host, self._port)

    def _give(self, connection: http.client.HTTPConnection) -> None:
        with self._lock:
            self._idle.append(connection)

    def close(self) -> None:
        with self._lock:
            while self._idle:
                self._idle.pop().close()


def _left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise CallTimeout("timed out")
    return left


def _read_bounded(response: http.client.HTTPResponse, sock, deadline: float) -> bytes:
    """The whole answer, each read bounded by the time left; at most MAX_ANSWER_BYTES."""
    chunks, size = [], 0
    while True:
        sock.settimeout(_left(deadline))
        chunk = response.read1(_READ_CHUNK)   # one receive: read() would wait for all of it
        if not chunk:
            response.close()   # read to the end: the connection may carry the next call
            return b"".join(chunks)
        size += len(chunk)
        if size > MAX_ANSWER_BYTES:
            raise ProtocolError(f"the answer is over {MAX_ANSWER_BYTES} bytes")
        chunks.append(chunk)


_POOLS: dict[str, ServerConnections] = {}
_POOLS_LOCK = threading.Lock()


def connections_to(url: str, max_in_flight: int) -> ServerConnections:
    """The process's shared connections to the origin (scheme://host:port) of ``url``."""
    parts = urlsplit(url)
    origin = f"{parts.scheme}://{parts.netloc}"
    with _POOLS_LOCK:
        pool = _POOLS.get(origin)
        if pool is None:
            pool = _POOLS[origin] = ServerConnections(origin, max_in_flight)
        return pool


# -- circuit breaker --------------------------------------------------------------------------

class CircuitBreaker:
    """Closed until ``failures`` calls in a row fail; then open: every call is refused at
    once until ``close()`` (a successful probe). Thread-safe."""

    def __init__(self, failures: int, what: str, clock: Callable[[], float] = time.monotonic):
        self.failures = failures
        self.what = what
        self._clock = clock
        self._lock = threading.Lock()
        self._in_a_row = 0
        self._opened_at: float | None = None
        self._last_reason = ""

    @property
    def is_open(self) -> bool:
        return self._opened_at is not None

    def check(self) -> None:
        """Raise ``ModelUnavailable`` at once while the circuit is open."""
        with self._lock:
            if self._opened_at is None:
                return
            since = self._clock() - self._opened_at
            reason = self._last_reason
        raise ModelUnavailable(f"circuit open for {self.what}: {self.failures} calls in a row "
                               f"failed, the last one {reason}; open for {since:.1f} s, "
                               f"the server is probed in the background")

    def failed(self, reason: str) -> bool:
        """Count a failed call; True when it is the one that opened the circuit."""
        with self._lock:
            self._in_a_row += 1
            self._last_reason = reason
            if self._opened_at is None and self._in_a_row >= self.failures:
                self._opened_at = self._clock()
                return True
            return False

    def succeeded(self) -> None:
        with self._lock:
            self._in_a_row = 0
            self._opened_at = None


# -- the runtime ------------------------------------------------------------------------------

class ExternalRuntime(ModelRuntime):
    """One model on one server. ``request.extra`` carries ``endpoint`` (``Endpoint``) and
    ``servers`` (``ModelServers``), put there by ``udfs.models.load_request``."""

    def __init__(self, endpoint: Endpoint, servers: ModelServers, input_names: tuple[str, ...],
                 class_labels: tuple[str, ...], clock: Callable[[], float] = time.monotonic):
        self.endpoint = endpoint
        self.servers = servers
        self.input_names = input_names
        self._class_labels = class_labels
        self._connections = connections_to(endpoint.url, servers.max_in_flight)
        self._path_prefix = urlsplit(endpoint.url).path.rstrip("/")
        self._headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if servers.token:
            self._headers["Authorization"] = f"Bearer {servers.token}"
        self.breaker = CircuitBreaker(servers.breaker_failures, str(endpoint), clock)
        self._closed = threading.Event()
        self._prober: threading.Thread | None = None
        self._prober_lock = threading.Lock()

    @classmethod
    def load(cls, request: LoadRequest) -> "ExternalRuntime":
        endpoint, servers = request.extra.get("endpoint"), request.extra.get("servers")
        if not isinstance(endpoint, Endpoint) or not isinstance(servers, ModelServers):
            raise ModelLoadError("an EXTERNAL model needs a validated server (descriptor field "
                                 "'server')", **who(request))
        return cls(endpoint, servers, vector_input_names(request, None), request.class_labels)

    def score(self, batch: FeatureBatch) -> Sequence[Prediction]:
        return self.score_within(batch, self.endpoint.timeout_s)

    def score_within(self, batch: FeatureBatch, timeout_s: float) -> list[Prediction]:
        """Score ``batch`` in calls of at most ``max_rows_per_call`` rows, each with
        ``timeout_s``; raises ``ModelUnavailable``."""
        check_batch(batch, self.input_names)
        step = self.servers.max_rows_per_call
        predictions: list[Prediction] = []
        for start in range(0, len(batch), step):
            values = batch.values[start:start + step]
            self.breaker.check()
            try:
                predictions.extend(self._call(values, timeout_s))
            except ModelUnavailable as exc:
                if self.breaker.failed(str(exc)):
                    log.warning("circuit opened for %s: %s", self.endpoint, exc)
                    self._start_probing()
                raise
            self.breaker.succeeded()
        return predictions

    def close(self) -> None:
        self._closed.set()

    # -- one call ---------------------------------------------------------------------------

    def _call(self, values: np.ndarray, timeout_s: float) -> list[Prediction]:
        rows = values.shape[0]
        path, body = self._request(values)
        try:
            status, answer = self._post(self._path_prefix + path, body, timeout_s)
        except ProtocolError as exc:
            raise ModelUnavailable(f"{self.endpoint} gave an unreadable answer: {exc}") from None
        if status != 200:
            text = " ".join(answer[:300].decode("utf-8", "replace").split())
            raise ModelUnavailable(f"{self.endpoint} answered HTTP {status}: {text}")
        try:
            outputs = self._outputs(answer, rows)
            reader = OutputReader.for_outputs(outputs, class_labels=self._class_labels)
            return reader.read(outputs, rows)
        except (ProtocolError, OutputError) as exc:
            raise ModelUnavailable(f"{self.endpoint} gave an unreadable answer: {exc}") from None

    def _request(self, values: np.ndarray) -> tuple[str, bytes]:
        e = self.endpoint
        if e.protocol == TENSORFLOW_SERVING:
            return tf_serving_request(values, e.model, e.model_version, input_name=e.input_name,
                                      signature=e.signature)
        return v2_request(values, e.model, e.model_version, input_name=e.input_name,
                          datatype=e.input_datatype, outputs=e.outputs)

    def _outputs(self, answer: bytes, rows: int):
        if self.endpoint.protocol == TENSORFLOW_SERVING:
            return tf_serving_outputs(answer, rows, keep=self.endpoint.outputs)
        return v2_outputs(answer, rows)

    def _post(self, path: str, body: bytes, timeout_s: float) -> tuple[int, bytes]:
        """POST with new attempts after connection errors while the deadline allows."""
        started = time.monotonic()
        deadline = started + timeout_s
        backoff = self.servers.retry_backoff_s
        attempt = 0
        while True:
            try:
                return self._connections.post(path, body, self._headers, deadline)
            except CallTimeout as exc:
                raise ModelUnavailable(f"{self.endpoint} did not answer within "
                                       f"{timeout_s * 1000:.0f} ms ({exc})") from None
            except ConnectionProblem as exc:
                attempt += 1
                wait = backoff * 2 ** (attempt - 1)
                if attempt > self.servers.retries or time.monotonic() + wait >= deadline:
                    raise ModelUnavailable(
                        f"{self.endpoint} could not be reached ({attempt} attempt"
                        f"{'s' if attempt > 1 else ''} in {time.monotonic() - started:.2f} s; "
                        f"last: {exc})") from None
                time.sleep(wait)

    # -- probing an open circuit ------------------------------------------------------------

    def _start_probing(self) -> None:
        with self._prober_lock:
            if self._prober is not None and self._prober.is_alive():
                return
            self._prober = threading.Thread(target=self._probe_until_answered, daemon=True,
                                            name=f"probe {self.endpoint}")
            self._prober.start()

    def _probe_until_answered(self) -> None:
        """Every ``breaker_reset_s``, one row of zeros (the half-open call) until the server
        answers it usably; then the circuit closes. Ends when the runtime is closed."""
        probe = np.zeros((1, len(self.input_names)))
        while not self._closed.wait(self.servers.breaker_reset_s):
            try:
                self._call(probe, self.endpoint.timeout_s)
            except ModelUnavailable as exc:
                log.debug("probe of %s failed: %s", self.endpoint, exc)
                continue
            except Exception as exc:  # a bug here must not kill the probing silently
                log.warning("probe of %s failed unexpectedly: %s", self.endpoint, exc)
                continue
            self.breaker.succeeded()
            log.warning("circuit closed for %s: the server answers again", self.endpoint)
            return

