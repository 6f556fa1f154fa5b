"""HTTP to services on this machine (Flink's REST API, the state service, Prometheus
endpoints), never through a proxy from the environment."""
from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

_LOCAL = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class HttpError(OSError):
    """The service answered with an error status; ``status`` and ``body`` say which."""

    def __init__(self, url: str, status: int, body: str):
        super().__init__(f"{url}: HTTP {status}: {body[:300]}")
        self.status, self.body = status, body


def request(url: str, method: str = "GET", body: Any = None, timeout_s: float = 10.0) -> bytes:
    """The response body; ``HttpError`` for an error status, ``OSError`` when nobody answers."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json"} if data else {})
    try:
        with _LOCAL.open(req, timeout=timeout_s) as response:
            return response.read()
    except urllib.error.HTTPError as exc:
        raise HttpError(url, exc.code, exc.read().decode(errors="replace")) from None


def get_json(url: str, method: str = "GET", body: Any = None, timeout_s: float = 10.0) -> Any:
    raw = request(url, method, body, timeout_s)
    return json.loads(raw) if raw else None


def try_json(url: str, timeout_s: float = 3.0) -> Any:
    """The JSON at ``url``, or None while the service is not (yet) answering."""
    try:
        return get_json(url, timeout_s=timeout_s)
    except (OSError, ValueError):
        return None


def get_text(url: str, timeout_s: float = 10.0) -> str:
    return request(url, timeout_s=timeout_s).decode(errors="replace")
