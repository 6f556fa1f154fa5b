"""Helpers of the end-to-end tests: a job in its own process, and a results collector."""
from __future__ import annotations

import itertools
import threading
import time
from typing import Callable

import pytest

from jobs.settings import Settings
from modelserving.errors import ToolError
from modelserving.kafka.admin import create_topics
from modelserving.kafka import clients as client
from modelserving.kafka.clients import Row, encode_record
from modelserving.local.job_process import JobProcess  # noqa: F401  (the tests' name for it)
from modelserving.local.waiting import wait_until
from modelserving.demo.training import DEMO_DATA_TYPE, demo_rows, descriptor_for
from protos import DeadLetter, ModelDescriptor, ServingResult

MAX_MODEL_BYTES = 1_000_000


def settings_with_own_topics(bootstrap: str, suffix: str, compact_models: bool = False,
                             **overrides) -> Settings:
    """Settings of a job whose topics are its own (their names end in ``suffix``), with the
    topics created; ``overrides`` are further settings."""
    settings = Settings.from_sources(
        [], environ={}, bootstrap_servers=bootstrap, data_topic=f"mdata-{suffix}",
        models_topic=f"models-{suffix}", results_topic=f"results-{suffix}",
        dead_letter_topic=f"dead-{suffix}", state_topic=f"state-{suffix}",
        repository_topic=f"repository-{suffix}", shadow_topic=f"shadow-{suffix}",
        **overrides).for_job(suffix)
    create_topics(settings, partitions=2, compact_models=compact_models)
    return settings


class Collector(client.OutputFollower):
    """Collects the results and dead letters of a job, from the beginning, in the background."""

    def __init__(self, settings: Settings):
        super().__init__(settings)
        self.settings = settings
        self.results: list[ServingResult] = []
        self.dead_letters: list[DeadLetter] = []
        self.lock = threading.RLock()
        self.start()

    def handle(self, message) -> None:
        with self.lock:
            (self.dead_letters if isinstance(message, DeadLetter) else self.results).append(message)

    def wait_for(self, predicate: Callable[["Collector"], object], timeout_s: float = 120,
                 what: str = "condition"):
        """``predicate(self)``'s first truthy value, evaluated under the lock."""
        def check():
            with self.lock:
                return predicate(self)
        return wait_until(check, timeout_s, what,
                          details=lambda: f"{len(self.results)} results, "
                                          f"{len(self.dead_letters)} dead letters so far")

    def results_for(self, ids) -> dict[str, ServingResult]:
        ids = set(ids)
        with self.lock:
            return {r.recordId: r for r in self.results if r.recordId in ids}


class Scenario:
    def __init__(self, settings, producer, collector, process, models, instances):
        self.settings, self.producer, self.collector = settings, producer, collector
        self.process, self.models, self.instances = process, models, instances
        self.counter = itertools.count()

    def send_records(self, rows: list[Row]) -> None:
        for row in rows:
            self.producer.send(self.settings.data_topic, key=row.data_type.encode(), value=encode_record(row))
        self.producer.flush()

    def send_raw_record(self, raw: bytes) -> None:
        self.producer.send(self.settings.data_topic, value=raw).get(10)

    def send_model(self, descriptor: ModelDescriptor | bytes) -> None:
        if isinstance(descriptor, ModelDescriptor):
            client.publish_model(self.producer, self.settings.models_topic, descriptor)
        else:
            self.producer.send(self.settings.models_topic, value=descriptor).get(10)

    def rows(self, prefix: str, n: int, data_type: str = DEMO_DATA_TYPE) -> list[Row]:
        base = demo_rows()
        return [Row(data_type, base[i % len(base)].names, base[i % len(base)].values,
                    f"{prefix}-{i}") for i in range(n)]

    def wait_until_serving(self, model_name: str, data_type: str = DEMO_DATA_TYPE,
                           timeout_s: float = 120) -> None:
        self.wait_until(lambda r: r.modelName == model_name, data_type, timeout_s,
                        f"a record scored by {model_name}")

    def wait_until(self, accept, data_type: str = DEMO_DATA_TYPE, timeout_s: float = 120,
                   what: str = "a probe result") -> None:
        """Probe with fresh records until one comes back as ``accept`` wants.

        Records and models travel on different topics, so "published before" does not mean
        "arrived before"; the probe makes the order explicit (on every instance that holds
        a copy of the model)."""
        prefix = f"probe-{data_type}-"

        def probed(c: Collector):
            subtasks = {r.subtask for r in c.results if r.recordId.startswith(prefix) and accept(r)
                        and int(r.recordId.split("-")[-2]) >= first}
            if len(subtasks) < self.instances:
                self.send_records(self.rows(f"{prefix}{next(self.counter)}", 1, data_type))
                return None
            return subtasks
        first = next(self.counter)
        self.collector.wait_for(probed, timeout_s, what)

    def publish_and_score(self, model, data_type: str, prefix: str, n: int) -> list[Row]:
        """Publish ``model`` for ``data_type``, wait until it serves, score ``n`` records."""
        self.send_model(descriptor_for(model, data_type=data_type))
        self.wait_until_serving(model.name, data_type)
        rows = self.rows(prefix, n, data_type)
        self.send_records(rows)
        self.wait_for_ids(r.record_id for r in rows)
        return rows

    def wait_for_ids(self, ids, timeout_s: float = 120) -> dict[str, ServingResult]:
        ids = list(ids)
        self.collector.wait_for(lambda c: len(c.results_for(ids)) == len(ids), timeout_s,
                                f"{len(ids)} results")
        return self.collector.results_for(ids)


def expected_for(model, rows: list[Row]):
    from udfs.models import load_request
    from udfs.records import to_batch
    from udfs.runtimes import load_model

    runtime = load_model(load_request(descriptor_for(model), [model.path.parent], 10**9))
    batch = to_batch([[dict(zip(r.names, r.values))[n] for n in runtime.input_names] for r in rows],
                     runtime.input_names)
    return {row.record_id: p for row, p in zip(rows, runtime.score(batch))}


def assert_scored_by(results: dict[str, ServingResult], model, rows: list[Row]) -> None:
    expected = expected_for(model, rows)
    for row in rows:
        result = results[row.record_id]
        assert result.status == ServingResult.SCORED
        assert (result.modelName, result.modelVersion, result.modelType) == \
            (model.name, model.version, model.model_type)
        assert result.label == expected[row.record_id].label
        assert result.score == pytest.approx(expected[row.record_id].value, abs=1e-6)
        assert list(result.probabilities) == pytest.approx(list(expected[row.record_id].probabilities), abs=1e-5)


class Deployment:
    """The job's topics, settings and arguments, a producer, a collector of its outputs, and
    the id of the job currently serving them."""

    def __init__(self, cluster, settings: Settings, model, module: str):
        self.cluster, self.settings, self.model, self.module = cluster, settings, model, module
        self.broadcast = module == "jobs.broadcast_job"
        self.parallelism = 2
        self.producer = client.producer(settings)
        self.collector = Collector(settings)
        self.job_id: str | None = None
        self.model_published = False
        self.counter = itertools.count()
        self.base = demo_rows()

    def job_args(self) -> list[str]:
        s = self.settings
        return ["--bootstrap-servers", s.bootstrap_servers, "--data-topic", s.data_topic,
                "--models-topic", s.models_topic, "--results-topic", s.results_topic,
                "--dead-letter-topic", s.dead_letter_topic, "--state-topic", s.state_topic,
                "--repository-topic", s.repository_topic, "--shadow-topic", s.shadow_topic,
                "--group-id", s.group_id, "--job-name", s.job_name,
                "--model-dirs", ",".join(s.model_dirs),
                "--delivery-guarantee", s.delivery_guarantee,
                "--parallelism", str(self.parallelism), "--checkpoint-interval-ms", "2000"]

    def submit(self, savepoint: str | None = None) -> float:
        """Submit the job (from a savepoint), wait until every task runs; returns seconds."""
        started = time.monotonic()
        self.job_id = self.cluster.submit(self.module, self.job_args(), savepoint=savepoint)
        self.cluster.wait_running(self.job_id, timeout=180)
        return time.monotonic() - started

    def ensure_serving(self) -> None:
        """Whatever ran before: a job of this deployment fully running and scoring with the
        model (published once per deployment; a job submitted afresh reads it again from the
        models topic, a resumed one has it in its state)."""
        if self.job_id is not None:
            try:
                self.cluster.wait_running(self.job_id, timeout=180)
            except ToolError as exc:  # ended or stuck: an earlier test failed half-way
                print(f"\n[setup] job {self.job_id} is not running ({str(exc)[:200]}); submitting anew")
                self.cancel_job()
        if self.job_id is None:
            self.parallelism = 2
            took = self.submit()
            print(f"\n[timing] flink run to all tasks RUNNING: {took:.1f} s")
        if not self.model_published:
            client.publish_model(self.producer, self.settings.models_topic, descriptor_for(self.model))
            self.model_published = True
        self.wait_until_scored_by(self.model.name)

    def cancel_job(self) -> None:
        if self.job_id:
            try:
                self.cluster.cancel(self.job_id)
            except ToolError:  # the cluster may be gone already; the fixture stops it anyway
                pass
            self.job_id = None

    def row(self, prefix: str, i: int) -> Row:
        base = self.base[i % len(self.base)]
        return Row(DEMO_DATA_TYPE, base.names, base.values, f"{prefix}-{i}")

    def rows(self, prefix: str, n: int) -> list[Row]:
        return [self.row(prefix, i) for i in range(n)]

    def send(self, rows: list[Row]) -> None:
        for row in rows:
            self.producer.send(self.settings.data_topic, key=row.data_type.encode(),
                               value=encode_record(row))
        self.producer.flush()

    def wait_until_scored_by(self, model_name: str, timeout_s: float = 120) -> None:
        """Probe with fresh records until one comes back scored by ``model_name``: records and
        models travel on different topics, so "published before" is not "arrived before"."""
        first = next(self.counter)
        # the broadcast join holds a copy of the model on every instance: probe them all
        instances = self.parallelism if self.broadcast else 1

        def probed(c: Collector):
            subtasks = {r.subtask for r in c.results if r.recordId.startswith("probe-")
                        and int(r.recordId.split("-")[1]) >= first and r.modelName == model_name}
            if len(subtasks) >= instances:
                return True
            self.send(self.rows(f"probe-{next(self.counter)}", 1))
            return False
        self.collector.wait_for(probed, timeout_s, f"a probe scored by {model_name}")

    def results(self, rows: list[Row], timeout_s: float = 120) -> dict[str, ServingResult]:
        ids = [r.record_id for r in rows]
        self.collector.wait_for(lambda c: len(c.results_for(ids)) == len(ids), timeout_s,
                                f"{len(ids)} results")
        return self.collector.results_for(ids)

    def close(self) -> None:
        self.cancel_job()
        self.collector.stop()
        self.producer.close()
