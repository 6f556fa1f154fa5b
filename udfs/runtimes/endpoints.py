"""What an EXTERNAL model runtime needs to call its server, as plain values.

``ModelServers`` comes from the job's settings (which servers a descriptor may name, the
credentials, the limits of every call); ``Endpoint`` from one validated descriptor
(``udfs.models.load_request`` builds it). Neither touches the network.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import urlsplit

OPEN_INFERENCE_V2 = 0      # ExternalModel.Protocol values
TENSORFLOW_SERVING = 1
PROTOCOL_NAMES = {OPEN_INFERENCE_V2: "Open Inference V2", TENSORFLOW_SERVING: "TensorFlow Serving"}


@dataclass(frozen=True)
class ModelServers:
    """The job's model-server settings. ``allowed``: URL prefixes a descriptor's server must
    lie under (normalized by ``udfs.models``); empty refuses every EXTERNAL model."""

    allowed: tuple[str, ...] = ()
    token: str = field(default="", repr=False)   # sent as "Authorization: Bearer <token>"
    timeout_s: float = 1.0          # longest one call may take; a descriptor may only lower it
    retries: int = 2                # new attempts after a connection error, within the timeout
    retry_backoff_s: float = 0.05   # first wait before a new attempt; doubles each time
    max_in_flight: int = 4          # calls at once to one server from one Python worker
    breaker_failures: int = 3       # failed calls in a row that open a model's circuit
    breaker_reset_s: float = 2.0    # how often an open circuit probes the server
    max_rows_per_call: int = 256    # a bigger batch is sent as several calls

    @classmethod
    def from_settings(cls, settings) -> "ModelServers":
        """From ``jobs.settings.Settings`` (read by attribute: udfs does not import jobs)."""
        return cls(allowed=tuple(normalize_server_url(u) for u in settings.model_servers),
                   token=settings.model_server_token,
                   timeout_s=settings.model_server_timeout_ms / 1000,
                   retries=settings.model_server_retries,
                   max_in_flight=settings.model_server_max_in_flight,
                   breaker_failures=settings.model_server_breaker_failures,
                   breaker_reset_s=settings.model_server_breaker_reset_ms / 1000,
                   max_rows_per_call=settings.model_server_max_rows_per_call)


@dataclass(frozen=True)
class Endpoint:
    """One model on one server, as a validated descriptor names it."""

    url: str                        # normalized base URL, no trailing slash
    protocol: int                   # OPEN_INFERENCE_V2 or TENSORFLOW_SERVING
    model: str
    model_version: str = ""
    timeout_s: float = 1.0
    input_name: str = ""
    input_datatype: str = "FP64"
    outputs: tuple[str, ...] = ()
    signature: str = ""             # TensorFlow Serving signature_name

    @property
    def protocol_name(self) -> str:
        return PROTOCOL_NAMES.get(self.protocol, str(self.protocol))

    def __str__(self) -> str:
        version = f" version '{self.model_version}'" if self.model_version else ""
        return f"{self.protocol_name} model '{self.model}'{version} at {self.url}"


def normalize_server_url(url: str) -> str:
    """``scheme://host:port[/path]`` with the port spelled out and no trailing slash, so
    that prefixes compare as text; ``ValueError`` for anything that is not a plain http(s)
    base URL (credentials, a query, a fragment, dot segments, escapes)."""
    text = url.strip()
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"not a URL ({exc})") from None
    if parts.scheme not in ("http", "https"):
        raise ValueError("only http and https servers are served")
    if not parts.hostname:
        raise ValueError("the URL names no host")
    if "@" in parts.netloc:
        raise ValueError("credentials in a server URL are refused (they come from the job's "
                         "model_server_token setting)")
    if parts.query or parts.fragment or text.endswith(("?", "#")):
        raise ValueError("a server URL takes no query or fragment")
    segments = parts.path.split("/")
    if any(s in (".", "..") for s in segments) or "%" in parts.path or "\\" in parts.path:
        raise ValueError("a server URL path takes no '.', '..', escapes or backslashes")
    port = port or (443 if parts.scheme == "https" else 80)
    host = parts.hostname.lower()
    host = f"[{host}]" if ":" in host else host
    return f"{parts.scheme}://{host}:{port}{parts.path.rstrip('/')}"


def under_prefix(url: str, prefixes: tuple[str, ...]) -> bool:
    """True when the normalized ``url`` is one of ``prefixes`` or lies below one of them
    (at a path-segment boundary: http://h:80/a does not cover http://h:80/ab)."""
    return any(url == p or url.startswith(p + "/") for p in prefixes)
