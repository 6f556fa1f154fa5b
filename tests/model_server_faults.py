"""A real HTTP server on a free loopback port, in a thread, that answers model-server calls
the way a test wants: through a backend (a function, or a real model server it forwards to)
or with a fault (slow, an error status, garbage, not HTTP at all, a dropped connection)."""
from __future__ import annotations

import http.client
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

import numpy as np

#: backend(path, body) -> (status, answer body)
Backend = Callable[[str, bytes], tuple[int, bytes]]

OK, SLOW, STATUS, GARBAGE, NOT_HTTP, DROP, DRIP = ("ok", "slow", "status", "garbage", "not-http",
                                                   "drop", "drip")


def sklearn_v2_backend(estimator):
    """Answers V2 calls as MLServer's scikit-learn runtime does: predict (INT64) and
    predict_proba (FP64), the outputs the request names."""
    def answer(path: str, body: bytes):
        request = json.loads(body)
        tensor = request["inputs"][0]
        X = np.asarray(tensor["data"], dtype=np.float64).reshape(tensor["shape"])
        wanted = [o["name"] for o in request.get("outputs", [])] or ["predict"]
        produced = {"predict": ("INT64", estimator.predict(X)),
                    "predict_proba": ("FP64", estimator.predict_proba(X))}
        outputs = [{"name": n, "shape": list(produced[n][1].shape), "datatype": produced[n][0],
                    "data": produced[n][1].reshape(-1).tolist()} for n in wanted]
        return 200, json.dumps({"model_name": path.split("/")[3], "outputs": outputs}).encode()
    return answer


def forward_to(base_url: str) -> Backend:
    """A backend that passes each call on to a real server (MLServer) and returns its answer."""
    host, port = base_url.split("://", 1)[1].rstrip("/").split(":")

    def call(path: str, body: bytes) -> tuple[int, bytes]:
        connection = http.client.HTTPConnection(host, int(port), timeout=30)
        try:
            connection.request("POST", path, body=body, headers={"Content-Type": "application/json"})
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()
    return call


class FaultyModelServer:
    """``mode`` decides every answer from now on; ``drop_next`` drops that many connections
    first (each before any answer). Records each call's path and headers, and the most
    calls it had in progress at once."""

    def __init__(self, backend: Backend, mode: str = OK, delay_s: float = 0.0):
        self.backend, self.mode, self.delay_s = backend, mode, delay_s
        self.status = 500
        self.drop_next = 0
        self.calls: list[tuple[str, dict]] = []
        self.in_progress = self.most_in_progress = 0
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def __enter__(self) -> "FaultyModelServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def _handler_class(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with fake._lock:
                    fake.calls.append((self.path, dict(self.headers)))
                    fake.in_progress += 1
                    fake.most_in_progress = max(fake.most_in_progress, fake.in_progress)
                    drop = fake.drop_next > 0
                    fake.drop_next -= drop
                try:
                    self._answer(body, DROP if drop else fake.mode)
                finally:
                    with fake._lock:
                        fake.in_progress -= 1

            def _answer(self, body: bytes, mode: str) -> None:
                if mode == DROP:
                    self.close_connection = True
                    return
                if mode == NOT_HTTP:
                    self.wfile.write(b"this is not HTTP\r\n\r\n")
                    self.close_connection = True
                    return
                if mode == SLOW:
                    time.sleep(fake.delay_s)
                if mode == STATUS:
                    self._send(fake.status, json.dumps({"error": "injected failure"}).encode())
                elif mode == GARBAGE:
                    self._send(200, b"<html>\x00\xff surely not an inference answer")
                elif mode == DRIP:
                    status, answer = fake.backend(self.path, body)
                    self._send(status, answer, drip_s=fake.delay_s)
                else:
                    self._send(*fake.backend(self.path, body))

            def _send(self, status: int, answer: bytes, drip_s: float = 0.0) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                if not drip_s:
                    self.wfile.write(answer)
                    return
                for i in range(len(answer)):   # one byte at a time, each well within a timeout
                    self.wfile.write(answer[i:i + 1])
                    self.wfile.flush()
                    time.sleep(drip_s)

        return Handler
