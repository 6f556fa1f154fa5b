"""The model repository end to end: a running job records the models it accepts and retires
in the compacted repository topic, ``modelserving models`` reads it, and a rollback
republishes the first version, which then serves again."""
from __future__ import annotations

import hashlib

import pytest

from modelserving import cli
from modelserving.cli import models as models_cli
from modelserving.demo.training import descriptor_for
from modelserving.local.waiting import wait_until
from protos import ModelType

pytestmark = pytest.mark.e2e

DATA_TYPE = "repository-type"


def version_of(model, version: str):
    descriptor = descriptor_for(model, data_type=DATA_TYPE)
    descriptor.version = version
    return descriptor


def repository_when(serving, what: str, ready):
    """The repository as ``modelserving models`` reads it, once ``ready(history)`` holds
    (the job publishes its records while it serves)."""
    def read():
        view = models_cli.read_repository(serving.settings, timeout_s=30)
        history = view.history(DATA_TYPE)
        return view if history is not None and ready(history) else None
    return wait_until(read, 90, what)


def decisions(history, version: str) -> list[dict]:
    [entry] = [v for v in history["versions"] if v["version"] == version]
    return entry["deployments"]


def scored(serving, prefix: str, n: int = 10):
    rows = serving.rows(prefix, n, DATA_TYPE)
    serving.send_records(rows)
    return list(serving.wait_for_ids(r.record_id for r in rows).values())


def test_the_repository_records_each_model_and_a_rollback_serves_the_first_version_again(
        serving, capsys):
    job = serving.settings.job_name
    onnx, pmml = serving.models[ModelType.ONNX], serving.models[ModelType.PMML]
    first, second = version_of(onnx, "1"), version_of(pmml, "2")
    digests = {"1": hashlib.sha256(onnx.path.read_bytes()).hexdigest(),
               "2": hashlib.sha256(pmml.path.read_bytes()).hexdigest()}
    serving.send_model(first)
    serving.wait_until_serving(onnx.name, DATA_TYPE)
    assert {(r.modelVersion, r.modelDigest) for r in scored(serving, "repo-a")} == \
        {("1", digests["1"])}
    serving.send_model(second)
    serving.wait_until_serving(pmml.name, DATA_TYPE)
    assert {(r.modelVersion, r.modelDigest) for r in scored(serving, "repo-b")} == \
        {("2", digests["2"])}

    view = repository_when(serving, "both versions recorded, the first retired",
                           lambda h: len(h["versions"]) == 2
                           and all(d["retired_ms"] for d in decisions(h, "1")))
    history = view.history(DATA_TYPE)
    [accepted_1], [accepted_2] = decisions(history, "1"), decisions(history, "2")
    assert (accepted_1["job"], accepted_1["outcome"], accepted_1["retired_by"]) == \
        (job, "ACCEPTED", "2")
    assert (accepted_2["job"], accepted_2["outcome"], accepted_2["retired_ms"]) == \
        (job, "ACCEPTED", None)
    assert accepted_1["retired_ms"] == accepted_2["deployed_ms"] > accepted_1["deployed_ms"]
    by_version = {v["version"]: v for v in history["versions"]}
    assert {v: e["digest"] for v, e in by_version.items()} == digests
    assert by_version["1"]["created_ms"] == first.publishedMs
    assert by_version["2"]["created_ms"] == second.publishedMs
    assert by_version["2"]["type"] == "PMML" and by_version["1"]["location"] is None
    assert view.listing()["data_types"][DATA_TYPE]["serving"][job]["version"] == "2"

    # the same, as the commands print it
    topics = ["--bootstrap-servers", serving.settings.bootstrap_servers,
              "--repository-topic", serving.settings.repository_topic]
    assert cli.main(["models", "list", *topics]) == 0
    [line] = [line for line in capsys.readouterr().out.splitlines() if line.startswith(DATA_TYPE)]
    assert line.split()[:5] == [DATA_TYPE, "2", "2", pmml.name, "PMML"] and f"{job}: 2" in line
    assert cli.main(["models", "history", DATA_TYPE, *topics]) == 0
    table = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in table[1:]] == ["1", "2"]
    assert table[1].endswith("replaced by 2") and digests["1"][:12] in table[1]

    # rollback: the version accepted before the one serving, as first published
    target, republished = models_cli.rollback(serving.settings, DATA_TYPE)
    assert target.version == "1" and republished.data == first.data
    assert republished.publishedMs > first.publishedMs
    serving.wait_until_serving(onnx.name, DATA_TYPE)
    assert {(r.modelVersion, r.modelDigest) for r in scored(serving, "repo-c")} == \
        {("1", digests["1"])}
    view = repository_when(serving, "the rollback recorded",
                           lambda h: len(decisions(h, "1")) == 2
                           and all(d["retired_ms"] for d in decisions(h, "2")))
    history = view.history(DATA_TYPE)
    again = decisions(history, "1")[-1]
    assert (again["outcome"], again["retired_ms"]) == ("ACCEPTED", None)
    assert decisions(history, "2")[0]["retired_by"] == "1"
    assert decisions(history, "2")[0]["retired_ms"] == again["deployed_ms"]
    assert [v["version"] for v in history["versions"]] == ["1", "2"]   # created first, kept
    assert view.show(DATA_TYPE, "1")["created_ms"] == first.publishedMs
    assert history["serving"] == {job: "1"}


def shadow_results(settings, ids: set[str], timeout_s: float = 90) -> dict:
    """The shadow topic's results of ``ids``, once it has them all."""
    from modelserving.kafka import clients
    from protos import ServingResult

    found: dict[str, ServingResult] = {}
    kafka = clients.consumer(settings, [settings.shadow_topic])
    try:
        def read():
            for records in kafka.poll(timeout_ms=500).values():
                for record in records:
                    result = ServingResult.FromString(record.value)
                    if result.recordId in ids:
                        found[result.recordId] = result
            return found if set(found) == ids else None
        return wait_until(read, timeout_s, f"{len(ids)} shadow results")
    finally:
        kafka.close()


def until_shadowed(serving, attempts: int = 12) -> None:
    """Send probes until the shadow model answers all of one (8 records, spread over the
    parts): the models topic and the data topic are read independently, so records sent
    right after the candidate may be scored before it arrives."""
    from modelserving.local.waiting import DeadlineExceeded

    for attempt in range(attempts):
        probe = serving.rows(f"shadow-probe{attempt}-", 8, DATA_TYPE)
        serving.send_records(probe)
        try:
            shadow_results(serving.settings, {r.record_id for r in probe}, 10)
            return
        except DeadlineExceeded:
            continue
    raise AssertionError(f"the shadow model answered none of {attempts} probes")


def test_a_shadow_model_is_compared_then_promoted_with_the_commands(serving, capsys):
    """On the real broker, with the commands a user types: ONNX v11 serves; PMML v12
    published with ``--shadow`` scores every record onto the shadow topic while every result
    stays v11's; ``models promote`` makes v12 serve; the repository tells the shadow
    deployment ended by promotion and v12 serving (versions of their own: the module's other
    test publishes 1 and 2 of the same data type to the same job)."""
    job = serving.settings.job_name
    onnx, pmml = serving.models[ModelType.ONNX], serving.models[ModelType.PMML]
    topics = ["--bootstrap-servers", serving.settings.bootstrap_servers,
              "--models-topic", serving.settings.models_topic,
              "--repository-topic", serving.settings.repository_topic]
    serving.send_model(version_of(onnx, "11"))
    serving.wait_until_serving(onnx.name, DATA_TYPE)
    assert cli.main(["publish", "model", str(pmml.path), "--data-type", DATA_TYPE,
                     "--name", pmml.name, "--version", "12", "--shadow", *topics]) == 0
    until_shadowed(serving)
    rows = serving.rows("shadow", 12, DATA_TYPE)
    serving.send_records(rows)
    results = serving.wait_for_ids(r.record_id for r in rows)
    shadow = shadow_results(serving.settings, {r.record_id for r in rows})
    assert {r.modelVersion for r in results.values()} == {"11"}
    assert {r.modelVersion for r in shadow.values()} == {"12"}
    assert {r.modelName for r in shadow.values()} == {pmml.name}

    assert cli.main(["models", "promote", DATA_TYPE, *topics]) == 0
    serving.wait_until_serving(pmml.name, DATA_TYPE)
    assert {r.modelVersion for r in scored(serving, "promoted")} == {"12"}
    view = repository_when(serving, "v12 promoted from its shadow deployment",
                           lambda h: any(v["version"] == "12" and len(v["deployments"]) == 2
                                         for v in h["versions"]))
    as_shadow, as_model = decisions(view.history(DATA_TYPE), "12")
    assert (as_shadow["job"], as_shadow["role"], as_shadow["retired_by"]) == (job, "shadow",
                                                                               "promoted")
    assert (as_model["role"], as_model["retired_ms"]) == ("", None)
    assert decisions(view.history(DATA_TYPE), "11")[-1]["retired_by"] == "12"
