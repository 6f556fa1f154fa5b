"""A delaying HTTP proxy: makes a real model server answer ``delay_s`` later, for the
benchmark's speculative run (a model that takes 200 ms).

Every request (any method, path and body) waits ``delay_s`` in its own thread, then goes to
the target server unchanged; the target's status, content type and body come back. A target
that cannot be reached gives 502 with the reason. Loopback only; stdlib only.
"""
from __future__ import annotations

import http.client
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable
from urllib.parse import urlsplit

#: Headers passed on to the target (the rest are hop-by-hop or the proxy's own business).
FORWARDED_HEADERS = ("Content-Type", "Accept", "Authorization")


class DelayProxy:
    """``with DelayProxy("http://127.0.0.1:8085", 0.2) as proxy: proxy.url`` ..."""

    def __init__(self, target_url: str, delay_s: float, *, host: str = "127.0.0.1",
                 port: int = 0, timeout_s: float = 30.0,
                 sleep: Callable[[float], None] = time.sleep):
        target = urlsplit(target_url)
        if target.scheme != "http" or not target.hostname or not target.port:
            raise ValueError(f"target must be http://host:port, not {target_url!r}")
        if delay_s < 0:
            raise ValueError(f"delay must not be negative ({delay_s})")
        self.target_host, self.target_port = target.hostname, target.port
        self.target_prefix = target.path.rstrip("/")
        self.delay_s, self.timeout_s, self._sleep = delay_s, timeout_s, sleep
        self.calls = 0
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer((host, port), self._handler_class())
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "DelayProxy":
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True,
                                        name=f"delay-proxy-{self._httpd.server_address[1]}")
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join(5)
            self._thread = None
        self._httpd.server_close()

    def __enter__(self) -> "DelayProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def forward(self, method: str, path: str, body: bytes,
                headers: dict[str, str]) -> tuple[int, str, bytes]:
        """Wait the delay, then make the call on the target: (status, content type, body)."""
        with self._lock:
            self.calls += 1
        self._sleep(self.delay_s)
        connection = http.client.HTTPConnection(self.target_host, self.target_port,
                                                timeout=self.timeout_s)
        try:
            connection.request(method, self.target_prefix + path, body=body or None,
                               headers=headers)
            response = connection.getresponse()
            return (response.status, response.getheader("Content-Type", "application/json"),
                    response.read())
        except OSError as exc:
            return 502, "text/plain", f"delay proxy: target unreachable: {exc}".encode()
        finally:
            connection.close()

    def _handler_class(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"   # keep-alive, as the job's client expects

            def log_message(self, *args) -> None:
                pass

            def _relay(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                headers = {name: self.headers[name] for name in FORWARDED_HEADERS
                           if self.headers.get(name) is not None}
                status, content_type, answer = proxy.forward(self.command, self.path, body,
                                                             headers)
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            do_GET = do_POST = do_PUT = _relay

        return Handler
