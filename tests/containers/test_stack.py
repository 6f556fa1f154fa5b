"""The compose stack (docker/compose.yaml) for real, with podman: the job image built from
docker/Dockerfile on a Debian base, the stack started with podman-compose, a model and
records published from the host, and then the results, the Flink REST API, the state
service and Prometheus checked; one TaskManager container killed and the job recovering
with no record lost. Machine-specific tooling: tests/containers/podman_tools.py.

Grafana is not started (no image can be had here); its dashboard's queries are checked
against what Prometheus scraped. What was measured (image build, size, stack start,
recovery, Python worker memory) goes to artifacts/containers/measurements.json; nothing
here asserts a timing.
"""
from __future__ import annotations

import json
import os
import re
import time
import urllib.parse
import uuid

import pytest

from jobs.settings import Settings
from modelserving.kafka import clients as client
from modelserving.local import flink_rest, http, processes
from modelserving.local.waiting import wait_until
from modelserving.paths import PROJECT_ROOT
from protos import ModelDescriptor, ServingResult
from podman_tools import JOB_IMAGE, KAFKA_IMAGE, PROMETHEUS_IMAGE, Podman
from jobrunner import Collector, Scenario, assert_scored_by

pytestmark = [
    pytest.mark.containers, pytest.mark.timeout(3600),
    # minutes and a 3 GB image: not part of the main suite's run; .ci/run runs it on its own
    pytest.mark.skipif(os.environ.get("MODELSERVING_CONTAINER_TESTS") != "1",
                       reason="the podman stack test runs only with MODELSERVING_CONTAINER_TESTS=1 "
                              "(.ci/run's own step)"),
]

#: Everything of the stack but Grafana.
SERVICES = ("kafka", "topics", "jobmanager", "taskmanager", "submit", "state", "prometheus")
DASHBOARD = PROJECT_ROOT / "docker" / "grafana" / "dashboards" / "modelserving.json"
MEASUREMENTS = PROJECT_ROOT / "artifacts" / "containers" / "measurements.json"
JOB_NAME = "modelserving-keyed"


class Stack:
    def __init__(self, podman: Podman, project: str, ports: dict[str, int]):
        self.podman, self.project, self.ports = podman, project, ports
        self.flink = f"http://127.0.0.1:{ports['FLINK_PORT']}"
        self.state = f"http://127.0.0.1:{ports['STATE_PORT']}"
        self.prometheus = f"http://127.0.0.1:{ports['PROMETHEUS_PORT']}"
        self.measured: dict[str, object] = {}

    def env(self) -> dict[str, str]:
        return {"MODELSERVING_IMAGE": JOB_IMAGE, "KAFKA_IMAGE": KAFKA_IMAGE,
                "PROMETHEUS_IMAGE": PROMETHEUS_IMAGE, **{k: str(v) for k, v in self.ports.items()}}

    def compose(self, *args: str, **kwargs):
        return self.podman.compose(self.project, self.env(), *args, **kwargs)

    def job(self) -> dict | None:
        jobs = [j for j in flink_rest.list_jobs(self.flink) if j.get("name") == JOB_NAME]
        return jobs[0] if jobs else None

    def running_job(self) -> dict | None:
        """The job once every task of it runs (the tooling's one definition of running)."""
        job = self.job()
        return flink_rest.running_job(self.flink, job["jid"]) if job else None

    def taskmanager_containers(self) -> list[str]:
        out = self.podman.run(["ps", "--filter", f"label=io.podman.compose.project={self.project}",
                               "--filter", "label=com.docker.compose.service=taskmanager",
                               "--format", "{{.Names}}"]).stdout
        return sorted(out.split())

    def busy_taskmanager_container(self) -> str:
        """The container of a TaskManager that runs tasks of the job: Flink names a
        TaskManager by its address, the container's own on the stack's network."""
        busy = [tm["path"] for tm in flink_rest.taskmanagers(self.flink)
                if tm["freeSlots"] < tm["slotsNumber"]]
        addresses = {}
        for name in self.taskmanager_containers():
            addresses[name] = self.podman.run(
                ["inspect", "--format", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
                 name]).stdout.strip()
            if any(f"@{addresses[name]}:" in path for path in busy):
                return name
        raise AssertionError(f"no TaskManager container runs the job's tasks: {busy}, {addresses}")

    def prometheus_query(self, query: str) -> list[dict]:
        url = f"{self.prometheus}/api/v1/query?query={urllib.parse.quote(query)}"
        return (http.try_json(url) or {}).get("data", {}).get("result", [])

    def save_logs(self) -> None:
        """Every container's whole log into build/containers/logs/ (kept after the stack
        is gone, for whoever reads a failure)."""
        directory = self.podman.work / "logs"
        directory.mkdir(parents=True, exist_ok=True)
        names = self.podman.run(["ps", "-a", "--filter", f"label=io.podman.compose.project={self.project}",
                                 "--format", "{{.Names}}"], check=False).stdout.split()
        for name in names:
            log = self.podman.run(["logs", name], check=False, timeout=120).stdout
            (directory / f"{name}.log").write_text(log)

    def diagnostics(self) -> str:
        names = self.podman.run(["ps", "-a", "--filter", f"label=io.podman.compose.project={self.project}",
                                 "--format", "{{.Names}} {{.Status}}"], check=False).stdout
        logs = "".join(f"\n--- {n.split()[0]}\n{self.podman.logs(n.split()[0], 30)}"
                       for n in names.splitlines() if n.strip())
        return names + logs


@pytest.fixture(scope="module")
def stack():
    podman = Podman.usable()
    podman.build_images()
    ports = {name: processes.free_port()
             for name in ("KAFKA_PORT", "FLINK_PORT", "STATE_PORT", "PROMETHEUS_PORT", "GRAFANA_PORT")}
    stack = Stack(podman, f"modelserving-test-{uuid.uuid4().hex[:6]}", ports)
    stack.measured["image"] = {"name": JOB_IMAGE, "size_bytes": podman.image_size(JOB_IMAGE)}
    started = time.monotonic()
    try:
        stack.compose("up", "-d", *SERVICES)
        wait_until(lambda: len(flink_rest.taskmanagers(stack.flink)) >= 2 if
                   flink_rest.answers(stack.flink) else None, 600,
                   "two TaskManagers registered", interval_s=2, details=stack.diagnostics)
        wait_until(stack.running_job, 600, f"{JOB_NAME} running", interval_s=2,
                   details=stack.diagnostics)
        stack.measured["stack_start_s"] = round(time.monotonic() - started, 1)
        yield stack
    finally:
        stack.measured["timings_s"] = podman.timings
        MEASUREMENTS.parent.mkdir(parents=True, exist_ok=True)
        MEASUREMENTS.write_text(json.dumps(stack.measured, indent=2) + "\n")
        stack.save_logs()
        stack.compose("down", "-v", "-t", "5", check=False, timeout=600)


@pytest.fixture(scope="module")
def scenario(stack, trained_models):
    settings = Settings.from_sources(
        [], environ={}, bootstrap_servers=f"localhost:{stack.ports['KAFKA_PORT']}").for_job("keyed")
    producer = client.producer(settings)
    collector = Collector(settings)
    yield Scenario(settings, producer, collector, None, trained_models, instances=1)
    collector.stop()
    producer.close()


def inline_model(trained_models, model_type: int):
    return next(m for m in trained_models.values() if m.inline and m.model_type == model_type)


def test_the_job_runs_on_two_taskmanagers(stack):
    taskmanagers = flink_rest.taskmanagers(stack.flink)
    assert len(taskmanagers) == 2
    assert len(stack.taskmanager_containers()) == 2
    job = stack.running_job()
    assert job["name"] == JOB_NAME
    assert {v["parallelism"] for v in job["vertices"]} == {2}


def test_a_model_and_records_from_the_host_are_scored(stack, scenario, trained_models):
    model = inline_model(trained_models, ModelDescriptor.ONNX)
    started = time.monotonic()
    rows = scenario.publish_and_score(model, "wine-cultivar", "host", 40)
    stack.measured["first_model_scored_s"] = round(time.monotonic() - started, 1)
    results = scenario.collector.results_for(r.record_id for r in rows)
    assert_scored_by(results, model, rows)
    assert not scenario.collector.dead_letters


def test_the_state_service_shows_the_model(stack, scenario, trained_models):
    model = inline_model(trained_models, ModelDescriptor.ONNX)

    def current():
        data = http.try_json(f"{stack.state}/models") or {}
        entry = data.get("data_types", {}).get("wine-cultivar")
        return entry if entry and model.name in json.dumps(entry) else None
    entry = wait_until(current, 60, f"the state service showing {model.name}", interval_s=1)
    assert JOB_NAME in json.dumps(entry)


def test_prometheus_scrapes_the_serving_metrics(stack, scenario):
    scored = "flink_taskmanager_job_task_operator_modelserving_records_scored"
    # the 40 records of the test before (and its probes) once a scrape has seen them
    value = wait_until(lambda: (lambda v: v if v >= 40 else None)(
        sum(float(r["value"][1]) for r in stack.prometheus_query(scored))),
        120, f"{scored} >= 40 in Prometheus", interval_s=2)
    with scenario.collector.lock:
        scored_results = sum(1 for r in scenario.collector.results if r.status == ServingResult.SCORED)
    assert value <= scored_results, (value, scored_results)
    # both TaskManagers and the JobManager are scraped (found by name)
    targets = http.try_json(f"{stack.prometheus}/api/v1/targets")["data"]["activeTargets"]
    assert sum(t["health"] == "up" for t in targets) == 3, targets
    # every metric the Grafana dashboard draws exists
    names = {r["metric"]["__name__"] for r in stack.prometheus_query('{__name__=~"flink_.*"}')}
    drawn = set(re.findall(r"flink_[a-zA-Z_]+", DASHBOARD.read_text()))
    assert drawn and drawn <= names, sorted(drawn - names)


#: Run in a TaskManager container: the resident memory of its TaskManager JVM, Python
#: workers (and whether TensorFlow is loaded in them) and pypmml JVMs, as JSON.
MEMORY_PROBE = """
import json, os
me, found = os.getpid(), []
for pid in os.listdir("/proc"):
    if not pid.isdigit() or int(pid) == me:
        continue
    try:
        cmd = open(f"/proc/{pid}/cmdline").read().replace(chr(0), " ").strip()
        status = dict(line.split(":", 1) for line in open(f"/proc/{pid}/status") if ":" in line)
        maps = open(f"/proc/{pid}/maps").read()
    except OSError:
        continue
    kind = ("python worker" if "fn_execution" in cmd else "pypmml jvm" if "pypmml" in cmd
            else "taskmanager jvm" if "TaskManagerRunner" in cmd else None)
    if kind:
        found.append({"kind": kind, "pid": int(pid), "ppid": int(status["PPid"]),
                      "rss_mb": round(int(status.get("VmRSS", "0 kB").split()[0]) / 1024),
                      "tensorflow": "libtensorflow" in maps, "process": cmd[:200]})
print(json.dumps(found))
"""


def test_python_worker_memory(stack, scenario, trained_models):
    """A TensorFlow and a PMML model serve (their data types' own), then the resident memory
    of every Python worker and pypmml JVM in the TaskManager containers is recorded."""
    for model_type, data_type in ((ModelDescriptor.TENSORFLOW, "wine-tf"),
                                  (ModelDescriptor.PMML, "wine-pmml")):
        model = inline_model(trained_models, model_type)
        rows = scenario.publish_and_score(model, data_type, f"mem-{data_type}", 10)
        assert_scored_by(scenario.collector.results_for(r.record_id for r in rows), model, rows)
    measured = {}
    for container in stack.taskmanager_containers():
        out = stack.podman.run(["exec", container, "python", "-c", MEMORY_PROBE]).stdout
        measured[container] = json.loads(out.strip().splitlines()[-1])
    stack.measured["taskmanager_processes"] = measured
    processes_ = [p for ps in measured.values() for p in ps]
    tf_workers = [p for p in processes_ if p["kind"] == "python worker" and p["tensorflow"]]
    jvms = [p for p in processes_ if p["kind"] == "pypmml jvm"]
    assert tf_workers and jvms, measured
    stack.measured["python_worker_memory_mb"] = {
        "worker_with_tensorflow": max(p["rss_mb"] for p in tf_workers),
        "pypmml_jvm": max(p["rss_mb"] for p in jvms),
        "worker_with_tensorflow_plus_pypmml_jvm":
            max(p["rss_mb"] for p in tf_workers) + max(p["rss_mb"] for p in jvms),
        "taskmanager_jvm": max((p["rss_mb"] for p in processes_
                                if p["kind"] == "taskmanager jvm"), default=None),
    }


def test_a_killed_taskmanager_loses_nothing(stack, scenario, trained_models):
    model = inline_model(trained_models, ModelDescriptor.ONNX)
    before = scenario.rows("before-kill", 30)
    scenario.send_records(before)
    scenario.wait_for_ids(r.record_id for r in before)
    victim = stack.busy_taskmanager_container()
    job_id = stack.job()["jid"]
    killed, killed_at = time.monotonic(), time.time()
    stack.podman.run(["kill", victim])
    during = scenario.rows("during-kill", 30)
    scenario.send_records(during)
    # the job fails over and runs again (on the TaskManager left, which has free slots)
    flink_rest.wait_restarted(stack.flink, job_id, since=killed_at, timeout_s=300)
    stack.measured["taskmanager_kill_to_running_s"] = round(time.monotonic() - killed, 1)
    after = scenario.rows("after-kill", 30)
    scenario.send_records(after)
    results = scenario.wait_for_ids([r.record_id for r in before + during + after], timeout_s=300)
    stack.measured["taskmanager_kill_to_all_scored_s"] = round(time.monotonic() - killed, 1)
    assert_scored_by(results, model, before + during + after)
    assert stack.job()["jid"] == job_id   # the same job recovered, not a new submission
