"""The serving-patterns bench's pure parts: the speculative figures, the targets, result
collection, and the delaying proxy forwarding to a tiny local backend (no JVM, no broker)."""
from __future__ import annotations

import http.client
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from modelserving.bench import serving_patterns as sp
from modelserving.bench.delay_proxy import DelayProxy
from modelserving.bench.workload import Sent
from protos import DataRecord, DeadLetter, ServingResult, SpeculativeOutcome


def result(model_id: str, waited_us: int, answered=(), timed_out=(), failed=(),
           budget_ms: int = 50) -> ServingResult:
    return ServingResult(modelId=model_id, speculative=SpeculativeOutcome(
        budgetMs=budget_ms, answered=list(answered), timedOut=list(timed_out),
        failed=list(failed), waitedMicros=waited_us))


def test_nearest_rank_matches_the_workload_percentiles():
    values = [float(v) for v in range(1, 101)]        # 1..100
    assert sp.nearest_rank(values, 50) == 51.0        # round(0.5 * 99) = 50 -> the 51st
    assert sp.nearest_rank(values, 99) == 99.0
    assert sp.nearest_rank(list(reversed(values)), 0) == 1.0
    assert sp.nearest_rank([], 50) is None


def test_distribution_rounds_and_handles_empty():
    figures = sp.distribution([3.14159, 1.0, 2.0, 10.0])
    # nearest rank: round(0.5 * 3) = 2 (half to even) -> the third smallest, 3.14159
    assert figures == {"n": 4, "p50": 3.1, "p90": 10.0, "p99": 10.0, "max": 10.0, "mean": 4.0}
    assert sp.distribution([]) == {"n": 0, "p50": None, "p90": None, "p99": None, "max": None,
                                   "mean": None}


def test_after_warm_up_leaves_out_the_first_quarter():
    assert sp.after_warm_up(list(range(8))) == [2, 3, 4, 5, 6, 7]
    assert sp.after_warm_up([1, 2, 3]) == [1, 2, 3]


def test_speculative_summary_counts_waits_wins_and_timeouts():
    results = [
        result("fast", 51_000, answered=["fast"], timed_out=["slow"]),
        result("fast", 49_500, answered=["fast"], timed_out=["slow"]),
        result("fast", 3_000, answered=["fast"], timed_out=["slow"]),   # slow still busy
        result("fast", 75_000, answered=["fast"], timed_out=["slow"]),  # past budget + slack
        result("slow", 40_000, answered=["slow", "fast"]),
        result("fast", 50_000, answered=["fast"], failed=["slow: ModelUnavailable: 500"]),
        ServingResult(modelId="fast"),                                  # not speculative
    ]
    summary = sp.speculative_summary(results, budget_ms=50)
    assert summary["results"] == 7 and summary["decided_speculatively"] == 6
    assert summary["budgets_seen"] == [50]
    assert summary["waited_ms"]["max"] == 75.0 and summary["waited_ms"]["n"] == 6
    assert summary["waited_ms"]["p50"] == 49.5            # 3, 40, [49.5], 50, 51, 75
    assert summary["waited_at_least_budget"] == 3          # 51, 75, 50
    assert summary["waited_over_budget_plus_slack"] == 1   # 75 > 70
    assert summary["wins"] == {"fast": {"results": 5, "share": 0.8333},
                               "slow": {"results": 1, "share": 0.1667}}
    assert summary["answered"] == {"fast": 6, "slow": 1}
    assert summary["timed_out"] == {"slow": 4}
    assert summary["failed"] == {"slow": 1}


def job_report(embedded=4000, external=1500, waited_p99=52.0, e2e_p99=180.0, base_p99=120.0):
    return {"paths": {sp.EMBEDDED: {"output_rate_median": embedded},
                      sp.EXTERNAL: {"output_rate_median": external}},
            "speculative": {"summary": {"waited_ms": {"p99": waited_p99}},
                            "latency": {"p99_ms": e2e_p99}, "baseline": {"p99_ms": base_p99}}}


def test_targets_judge_each_figure():
    targets = {t["target"]: t for t in sp.against_targets(job_report())}
    share = targets["external output rate >= 1/2 of embedded"]
    assert share["figure"] == 0.375 and share["met"] is False
    assert targets["speculative: the join's wait p99 <= 70 ms"]["met"] is True
    assert targets["speculative: end-to-end p99 <= 70 ms"]["met"] is False
    added = targets["speculative: end-to-end p99 minus the fast model alone's <= 70 ms"]
    assert added["figure"] == 60.0 and added["met"] is True


def test_targets_without_figures_are_not_judged():
    targets = sp.against_targets({"failed": "boom"})
    assert [t["met"] for t in targets] == [None, None, None, None]
    targets = sp.against_targets(job_report(embedded=2000, external=1000, waited_p99=71.0))
    assert targets[0]["figure"] == 0.5 and targets[0]["met"] is True
    assert targets[1]["met"] is False


class FakeCollector:
    def __init__(self, batches):
        self.batches = list(batches)

    def take(self):
        return self.batches.pop(0) if self.batches else []


def test_collect_keeps_results_in_creation_order_and_counts_dead_letters():
    sent = Sent("p3spe", 4, started=0.0, finished=0.0, rate=0.0)   # deadline long passed
    def scored(i, ts, model_id):
        return ServingResult(recordId=f"p3spe-{i}", recordTs=ts, modelName="m",
                             modelVersion="1", modelId=model_id).SerializeToString()
    results = FakeCollector([[(1_100, scored(2, 1_000, "fast")), (1_050, scored(0, 1_000, "fast")),
                              (1_200, scored(0, 1_000, "slow")),          # a duplicate: first kept
                              (9_999, ServingResult(recordId="p30spe-1").SerializeToString())]])
    letter = DeadLetter(kind=DeadLetter.MODEL_UNAVAILABLE, reason="no model answered",
                        raw=DataRecord(id="p3spe-1").SerializeToString())
    dead = FakeCollector([[(0, letter.SerializeToString()),
                           (0, DeadLetter(raw=b"\xff\xff").SerializeToString())]])
    got = sp.collect(results, dead, sent, timeout_s=0)
    assert [r.recordId for r in got.results] == ["p3spe-0", "p3spe-2"]
    assert [r.modelId for r in got.results] == ["fast", "fast"]
    assert got.trial.latencies_ms == [50.0, 100.0]
    assert got.trial.received == 2 and got.trial.model_versions == {"m:1": 2}
    assert got.dead_letters == 1
    assert got.dead_reasons == {"MODEL_UNAVAILABLE: no model answered": 1}


def test_speculative_set_descriptor():
    descriptor = sp.speculative_set("sp-speculative", ["slow", "fast"], 50)
    assert descriptor.WhichOneof("MessageContent") == "speculative"
    assert list(descriptor.speculative.models) == ["slow", "fast"]
    assert descriptor.speculative.budgetMs == 50
    assert descriptor.speculative.decider == 0   # PREFERRED
    assert descriptor.dataType == "sp-speculative"


def test_summary_lines_name_the_figures_and_verdicts():
    report = {"plan": {"rate": 1000.0}, "jobs": {"keyed": {
        "targets": sp.against_targets(job_report()),
        "paths": {sp.EMBEDDED: {"output_rate_median": 4000, "p50_ms_median": 100,
                                "p99_ms_median": 200}}}, "broadcast": {"failed": "boom"}}}
    lines = sp.summary_lines(report)
    assert lines[0] == ("keyed embedded ONNX: burst 4000 results/s; at 1000/s p50 100 ms, "
                        "p99 200 ms")
    assert any("end-to-end p99 <= 70 ms: 180.0 (MISSED)" in line for line in lines)
    assert lines[-1] == "broadcast: failed: boom"


# -- the delaying proxy ------------------------------------------------------------------------

class Backend:
    """A tiny model server: answers every POST with what it got, and 404 for GET /missing."""

    def __init__(self):
        backend = self
        self.seen = []

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _answer(self, status, body):
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                backend.seen.append((self.command, self.path, body, self.headers.get("Authorization")))
                self._answer(200, json.dumps({"path": self.path, "got": body.decode()}).encode())

            def do_GET(self):
                backend.seen.append((self.command, self.path, b"", None))
                self._answer(404 if self.path == "/missing" else 200, b'{"ready": true}')

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self):
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def call(url, method, path, body=None, headers=None):
    host, port = url.split("://")[1].split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def test_the_proxy_waits_its_delay_then_forwards_the_call_unchanged():
    slept = []
    with Backend() as backend, DelayProxy(backend.url, 0.2, sleep=slept.append) as proxy:
        status, body = call(proxy.url, "POST", "/v2/models/m/infer", b'{"inputs": [1]}',
                            {"Content-Type": "application/json", "Authorization": "Bearer t"})
        assert status == 200
        assert json.loads(body) == {"path": "/v2/models/m/infer", "got": '{"inputs": [1]}'}
        assert backend.seen == [("POST", "/v2/models/m/infer", b'{"inputs": [1]}', "Bearer t")]
        assert call(proxy.url, "GET", "/missing")[0] == 404        # the backend's status
        assert call(proxy.url, "GET", "/v2/models/m/ready") == (200, b'{"ready": true}')
        assert slept == [0.2, 0.2, 0.2] and proxy.calls == 3


def test_the_proxy_keeps_a_connection_alive_across_calls():
    with Backend() as backend, DelayProxy(backend.url, 0, sleep=lambda s: None) as proxy:
        host, port = proxy.url.split("://")[1].split(":")
        connection = http.client.HTTPConnection(host, int(port), timeout=10)
        try:
            for i in range(3):
                connection.request("POST", f"/call/{i}", body=b"x")
                assert connection.getresponse().read() == json.dumps(
                    {"path": f"/call/{i}", "got": "x"}).encode()
        finally:
            connection.close()
        assert [path for _, path, _, _ in backend.seen] == ["/call/0", "/call/1", "/call/2"]


def test_the_proxy_answers_502_when_its_target_is_down():
    with Backend() as backend:
        dead_url = backend.url
    with DelayProxy(dead_url, 0, sleep=lambda s: None) as proxy:
        status, body = call(proxy.url, "POST", "/v2/models/m/infer", b"{}")
    assert status == 502 and b"target unreachable" in body


def test_the_proxy_refuses_a_target_it_cannot_use():
    with pytest.raises(ValueError):
        DelayProxy("https://127.0.0.1:8085", 0.2)
    with pytest.raises(ValueError):
        DelayProxy("http://127.0.0.1:8085", -1)


def test_summary_lines_describe_the_speculative_run():
    spec = {"rate_rps": 200.0,
            "summary": sp.speculative_summary([result("fast", 50_000, ["fast"], ["slow"])] * 3
                                              + [result("slow", 40_000, ["slow", "fast"])], 50),
            "latency": {"p50_ms": 110.0, "p99_ms": 190.0, "received": 4, "sent": 5,
                        "dead_letters": 1},
            "baseline": {"p50_ms": 90.0, "p99_ms": 150.0}}
    lines = sp.summary_lines({"plan": {"rate": 1000.0}, "jobs": {"keyed": {"speculative": spec}}})
    assert lines == ["keyed speculative [slow 200 ms, fast], 50 ms, 200/s: p50 110.0 / p99 190.0 "
                     "ms (fast alone 90.0 / 150.0); join waited p50 50.0 / p99 50.0 / max 50.0 "
                     "ms; wins fast 75.0%, slow 25.0%; 4/5 results, 1 dead letters"]


def test_batch_count_groups_results_served_together():
    def served(subtask, ms, micros, status=ServingResult.SCORED):
        return ServingResult(subtask=subtask, servedMs=ms, scoringMicros=micros, status=status)
    results = [served(0, 100, 5.0), served(0, 100, 5.0), served(0, 100, 7.0),   # two batches
               served(1, 100, 5.0), served(0, 101, 5.0),
               served(0, 0, 0.0, ServingResult.NO_MODEL)]                     # not scored
    assert sp.batch_count(results) == 4
    assert sp.batch_count([]) == 0


def test_latency_figures_of_a_trial():
    sent = Sent("p1emb", 8, started=0.0, finished=0.0, rate=100.0)
    raw = [ServingResult(recordId=f"p1emb-{i}", recordTs=1000, subtask=0, servedMs=5000 + i // 4,
                         scoringMicros=3.0, modelName="m", modelVersion="1").SerializeToString()
           for i in range(8)]
    got = sp.collect(FakeCollector([[(1000 + 10 * (i + 1), r) for i, r in enumerate(raw)]]),
                     FakeCollector([]), sent, timeout_s=0)
    figures = got.latency()
    assert figures["batches"] == 2 and figures["records_per_batch"] == 4.0
    assert figures["quarter_p50_ms"] == [10.0, 30.0, 50.0, 70.0]   # the lower of each pair
    assert figures["p50_ms"] == 50.0 and figures["received"] == 8 and figures["sent"] == 8
