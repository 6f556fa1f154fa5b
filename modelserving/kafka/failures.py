"""Kafka failures as one-line ``KafkaToolError``s: the one place that knows how kafka-python
reports them.

A refused SASL login is the case that needs care. The broker answers the failed
``SaslAuthenticate`` with an error and closes the connection (after
``connection.failed.authentication.delay.ms``); kafka-python 3.0 reads the answer and the
close in one go and drops the bytes read with the close, so it sees only "socket
disconnected", retries until ``bootstrap_timeout_ms`` (30 s by default) and raises
``KafkaTimeoutError: Unable to bootstrap``, the same as for a broker that is not there.
Even when the answer does arrive, the bootstrap loop retries a failed login until its
deadline instead of recording it as the sticky authentication failure its connection
manager keeps per broker.

``_correct_kafka_python`` makes two small corrections, for the versions they were checked
against only: bytes received together with a disconnect are delivered before it, and a
connection whose SASL login failed raises from its initialization, where the connection
manager records the failure, so the next attempt raises ``SaslAuthenticationFailedError``
at once. With any other kafka-python the translation below still works, only later (at
the bootstrap deadline) and less precisely.
"""
from __future__ import annotations

import contextlib
import logging
import re
from typing import Iterator, Mapping

import kafka
import kafka.errors as errors

from modelserving.errors import KafkaToolError

log = logging.getLogger(__name__)

#: How long a tool's client waits for its first broker connection (kafka-python's
#: ``bootstrap_timeout_ms``): long enough for a busy broker, short enough that an
#: unreachable or refusing one is reported while someone still waits for the answer.
CONNECT_TIMEOUT_MS = 20_000

_CHECKED_VERSIONS = re.compile(r"3\.0\.\d+$")


@contextlib.contextmanager
def translated(doing: str, config: Mapping) -> Iterator[None]:
    """Run the block; a kafka-python error leaves it as ``KafkaToolError`` saying what was
    being done (``doing``: "creating topics", say) and, from the client ``config``
    (kafka-python keyword arguments), where and as whom."""
    try:
        yield
    except errors.KafkaError as exc:
        raise KafkaToolError(describe(exc, doing, config)) from exc


def describe(exc: BaseException, doing: str, config: Mapping) -> str:
    """One line for a kafka-python error: what failed, where, as whom, what to check."""
    servers = config.get("bootstrap_servers") or "?"
    if isinstance(servers, (list, tuple)):
        servers = ",".join(servers)
    protocol = config.get("security_protocol") or "PLAINTEXT"
    user = config.get("sasl_plain_username") or ""
    mechanism = config.get("sasl_mechanism") or ""
    detail = _one_line(exc)
    if isinstance(exc, errors.SaslAuthenticationFailedError):
        text = (f"authentication failed for user {user!r} ({mechanism}) at {servers}: check "
                f"sasl_username and sasl_password ({detail})")
    elif isinstance(exc, errors.UnsupportedSaslMechanismError):
        text = f"authentication impossible at {servers}: {detail}; choose another sasl_mechanism"
    elif isinstance(exc, errors.AuthorizationError):
        who = f"user {user!r}" if user else "this client"
        text = f"{who} is not authorized at {servers} ({type(exc).__name__}: {detail})"
    elif isinstance(exc, errors.KafkaTimeoutError) and "bootstrap" in str(exc).lower():
        timeout = config.get("bootstrap_timeout_ms", 30_000) / 1000
        who = f" as user {user!r} ({mechanism})" if user else ""
        text = (f"no Kafka broker answered at {servers} within {timeout:g} s (security_protocol "
                f"{protocol}{who}): is the broker running, is that address its {protocol} "
                "listener, and are the credentials right?")
    elif isinstance(exc, errors.KafkaTimeoutError):
        text = f"Kafka at {servers} did not answer in time ({detail})"
    else:
        text = f"{type(exc).__name__} from Kafka at {servers}: {detail}"
    return f"{doing}: {text}"


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    # kafka-python repeats the class name inside the message ("[Error 58] X: X: ...")
    return re.sub(r"^(\[Error \d+\] )?(\w+Error: )+", "", text)


# -- corrections to kafka-python ---------------------------------------------------------------

def _correct_kafka_python() -> bool:
    """Apply the corrections described above; False (and nothing changed) for a
    kafka-python they were not checked against."""
    if not _CHECKED_VERSIONS.match(getattr(kafka, "__version__", "")):
        return False
    try:
        from kafka.net import transport
        from kafka.net.connection import KafkaConnection
        from kafka.net.manager import KafkaConnectionManager
    except ImportError:
        return False
    if getattr(KafkaConnection, "_modelserving_corrected", False):
        return True
    if not (hasattr(KafkaConnection, "initialize") and hasattr(KafkaConnection, "init_future")
            and hasattr(KafkaConnectionManager, "maybe_raise_auth_failure")):
        return False
    for cls in (transport.KafkaTCPTransport, getattr(transport, "KafkaSSLTransport", None)):
        if cls is not None and "_sock_recv" in cls.__dict__:
            cls._sock_recv = _data_before_disconnect(cls.__dict__["_sock_recv"])
    KafkaConnection.initialize = _raise_failed_login(KafkaConnection.initialize)
    KafkaConnection._modelserving_corrected = True
    return True


def _data_before_disconnect(receive):
    """``_sock_recv`` returns (bytes, error); with both, hand over the bytes now and the
    error on the next call (the socket stays readable at its end)."""
    def _sock_recv(self):
        pending = self.__dict__.pop("_modelserving_pending_error", None)
        if pending is not None:
            return b"", pending
        data, error = receive(self)
        if data and error is not None:
            self._modelserving_pending_error = error
            return data, None
        return data, error
    return _sock_recv


def _raise_failed_login(initialize):
    """``initialize`` records a failure in the connection's init future and returns; the
    connection manager records only raised authentication failures."""
    async def corrected(self, *args, **kwargs):
        await initialize(self, *args, **kwargs)
        future = self.init_future
        if future.is_done and future.failed() and isinstance(
                future.exception, errors.SaslAuthenticationFailedError):
            raise future.exception
    return corrected


CORRECTED = _correct_kafka_python()
