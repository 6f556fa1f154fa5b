"""The helpers every local service relies on: waiting, processes, and no-proxy HTTP."""
from __future__ import annotations

import http.server
import json
import socket
import subprocess
import sys
import threading
import time
import zipfile

import pytest

from modelserving.errors import DeadlineExceeded, ToolError
from modelserving.local import http as local_http
from modelserving.local import processes
from modelserving.local.flink_config import port_range
from modelserving.local.job_files import build_zip
from modelserving.local.waiting import wait_until
from modelserving.paths import PROJECT_ROOT


# -- wait_until ------------------------------------------------------------------------------

def test_wait_until_returns_the_first_truthy_value():
    answers = iter([None, 0, "", {"state": "RUNNING"}])
    assert wait_until(lambda: next(answers), 5, "a job", interval_s=0.01) == {"state": "RUNNING"}


def test_wait_until_raises_deadline_exceeded_naming_what_and_details():
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded) as raised:
        wait_until(lambda: False, 0.2, "the broker", interval_s=0.05,
                   details=lambda: "last log line: boom")
    assert time.monotonic() - started >= 0.2
    message = str(raised.value)
    assert "the broker" in message and "0.2 s" in message and "last log line: boom" in message
    assert isinstance(raised.value, ToolError)


def test_wait_until_lets_the_condition_give_up_early():
    def exited():
        raise RuntimeError("process exited")
    with pytest.raises(RuntimeError, match="process exited"):
        wait_until(exited, 30, "never")


# -- processes -------------------------------------------------------------------------------

@pytest.fixture
def sleeper():
    child = subprocess.Popen(["sleep", "60"])
    yield child
    if child.poll() is None:
        child.kill()
    child.wait(5)


def test_terminate_ends_a_child_process(sleeper):
    assert processes.is_alive(sleeper.pid)
    assert processes.started_at(sleeper.pid) > 0
    assert processes.terminate([sleeper.pid], grace_s=5) == []
    assert not processes.is_alive(sleeper.pid)


def test_wait_gone_reports_who_is_still_alive(sleeper):
    assert processes.wait_gone([sleeper.pid], 0.2) == [sleeper.pid]
    sleeper.kill()
    assert processes.wait_gone([sleeper.pid], 5) == []


def test_terminate_group_ends_a_session_with_its_children():
    parent = subprocess.Popen(["bash", "-c", "sleep 60 & sleep 60 & wait"], start_new_session=True)
    try:
        children = wait_until(lambda: len(processes.descendants(parent.pid)) == 2
                              and processes.descendants(parent.pid), 10, "two children")
        processes.terminate_group(parent.pid, grace_s=5)
        assert processes.wait_gone([parent.pid, *children], 5) == []
    finally:
        if parent.poll() is None:
            parent.kill()
        parent.wait(5)


def test_find_matches_by_command_line(sleeper):
    marker = str(sleeper.pid)
    found = processes.find(lambda p: processes.cmdline(p) == ["sleep", "60"] and str(p.pid) == marker)
    assert found == [sleeper.pid]


def test_free_ports_are_distinct_and_free():
    ports = processes.free_ports(5)
    assert len(set(ports)) == 5
    assert all(processes.port_is_free(port) for port in ports)


def test_free_port_range_is_consecutive_and_free():
    ports = processes.free_port_range(4)
    assert ports == list(range(ports[0], ports[0] + 4))
    assert all(processes.port_is_free(port) for port in ports)
    assert port_range(f"{ports[0]}-{ports[-1]}") == ports


def test_port_accepts_only_while_someone_listens():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        assert processes.port_accepts(port) and not processes.port_is_free(port)
    assert not processes.port_accepts(port)


# -- http ------------------------------------------------------------------------------------

class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server's name
        if self.path == "/overview":
            body = json.dumps({"taskmanagers": 1}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        else:
            self.send_error(404, "no such thing")

    def log_message(self, *args):
        pass


@pytest.fixture
def local_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", processes.free_port()), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_try_json_reads_json_and_is_none_without_a_service(local_server):
    assert local_http.try_json(local_server + "/overview") == {"taskmanagers": 1}
    assert local_http.try_json(f"http://127.0.0.1:{processes.free_port()}/overview", 1) is None


def test_error_status_is_an_http_error(local_server):
    with pytest.raises(local_http.HttpError) as raised:
        local_http.get_json(local_server + "/missing")
    assert raised.value.status == 404
    assert local_http.try_json(local_server + "/missing") is None


def test_no_proxy_from_the_environment_is_used(local_server, monkeypatch):
    dead = f"http://127.0.0.1:{processes.free_port()}"  # a proxy nobody answers on
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.setenv(name, dead)
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    assert local_http.get_json(local_server + "/overview") == {"taskmanagers": 1}
    assert local_http.get_text(local_server + "/overview").startswith("{")


# -- the zip shipped with flink run ----------------------------------------------------------

def test_job_zip_holds_the_job_packages_and_never_the_tooling(tmp_path):
    archive = build_zip(tmp_path)
    names = zipfile.ZipFile(archive).namelist()
    tops = {name.split("/", 1)[0] for name in names}
    assert tops == {"jobs", "udfs", "protos"}
    assert "jobs/__init__.py" in names and not any("__pycache__" in n for n in names)
    assert build_zip(tmp_path) == archive  # the same content is packed once
    assert sorted(tmp_path.glob("job-files-*.zip")) == [archive]
    assert (PROJECT_ROOT / "modelserving").is_dir()  # the tooling exists, it is just not shipped


def test_job_zip_python_path_imports_the_jobs_without_the_tooling(tmp_path):
    """What a TaskManager sees: only the zip (and the venv's libraries) on its path."""
    archive = build_zip(tmp_path)
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import jobs, udfs.serving, protos; "
            "assert jobs.__file__.startswith(sys.argv[1]), jobs.__file__; "
            "assert 'modelserving' not in sys.modules, 'a job package imported the tooling'")
    done = subprocess.run([sys.executable, "-c", code, str(archive)], capture_output=True,
                          text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr


# -- a job process that cannot start ---------------------------------------------------------

def test_a_job_process_that_exits_is_reported_with_its_log_and_leaves_nothing(tmp_path):
    from jobs.settings import Settings
    from modelserving.errors import FlinkClusterError
    from modelserving.local.job_process import JobProcess

    settings = Settings.from_sources([], environ={}, connector_jar=str(tmp_path / "connector.jar"))
    job = JobProcess("jobs.no_such_job", settings, tmp_path / "job.log")
    assert job.settings.rest_port > 0  # a free port of its own
    with pytest.raises(FlinkClusterError, match="jobs.no_such_job exited with code 1") as raised:
        job.start(timeout_s=60)
    assert "No module named jobs.no_such_job" in str(raised.value)  # the log tail
    assert not processes.is_alive(job.process.pid)


def test_the_cluster_logs_with_the_projects_log4j_file_and_the_distributions_others(tmp_path):
    """flink-conf/log4j.properties (rate-limited Kafka reconnect warnings) replaces the
    distribution's; the files the project has no version of come from the distribution."""
    from modelserving.local.flink_config import LOG_FILES, write_conf_dir
    from modelserving.paths import FLINK_CONF_DIR

    write_conf_dir(tmp_path, {"parallelism.default": 2}, rest_port=8081, taskmanagers=2)
    ours = (FLINK_CONF_DIR / "log4j.properties").read_text()
    assert (tmp_path / "log4j.properties").read_text() == ours
    assert "BurstFilter" in ours and "kafka.shaded.org.apache.kafka.clients.NetworkClient" in ours
    assert (tmp_path / "log4j-cli.properties").exists() and "log4j-cli.properties" in LOG_FILES
    assert (tmp_path / "workers").read_text() == "127.0.0.1\n127.0.0.1\n"


def test_a_child_does_not_inherit_what_the_loopback_worker_put_in_our_environment(monkeypatch):
    """After a job test with loopback workers, this process has PYFLINK_GATEWAY_DISABLED set:
    a job process inheriting it failed to start its Flink client."""
    from modelserving.local.processes import child_environ

    monkeypatch.setenv("PYFLINK_GATEWAY_DISABLED", "true")
    monkeypatch.setenv("MODELSERVING_KEEP_ME", "1")
    monkeypatch.setenv("FLINK_LIB_DIR", "/elsewhere/lib")
    env = child_environ(without=("FLINK_LIB_DIR",))
    assert "PYFLINK_GATEWAY_DISABLED" not in env and "FLINK_LIB_DIR" not in env
    assert env["MODELSERVING_KEEP_ME"] == "1"
