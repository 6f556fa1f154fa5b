"""The model repository as the tooling reads it, without a broker: the view folded from the
topic's records, the state service's endpoints and page section, ``modelserving models``
(tables, JSON, rollback and its refusal of changed files)."""
from __future__ import annotations

import hashlib
import json
import os
import re

import pytest

from jobs.settings import Settings
from modelserving import cli
from modelserving.cli import models as models_cli
from modelserving.errors import ToolError
from modelserving.state.repository import RepositoryView
from modelserving.state.service import StateService
from protos import ModelDescriptor, ModelType, RepositoryEntry
from udfs.lifecycle import repository
from udfs.lifecycle.digest import digest_path, model_digest
from udfs.lifecycle.repository import ACCEPTED, REFUSED, VALIDATION_FAILED
from udfs.lifecycle.validation import ValidationOutcome

from test_state_service import get, key, stats

T0 = 1_700_000_000_000
WINE = "wine"


def published(version: str, at_ms: int, data_type: str = WINE, **fields) -> ModelDescriptor:
    return ModelDescriptor(name=f"logreg-{version}", version=version, dataType=data_type,
                           modeltype=ModelType.ONNX, data=f"model {version}".encode(),
                           publishedMs=at_ms, inputFeatures=["a", "b"], classLabels=["0", "1"],
                           qualityMetrics={"accuracy": 0.9}, **fields)


def entry_of(descriptor: ModelDescriptor) -> RepositoryEntry:
    return repository.entry_from_descriptor(descriptor, digest=model_digest(descriptor))


def records_of_a_timeline() -> list[tuple[str, bytes]]:
    """What the jobs publish (key, value): v1 and v2 accepted on keyed, v1 retired by v2, v3
    refused by its validation gate; v1 accepted on broadcast and still serving there; one
    version of another data type."""
    e1, e2, e3 = (entry_of(published(v, T0 + int(v) * 1000)) for v in ("1", "2", "3"))
    figures = ValidationOutcome(False, "validation failed on 2 rows: accuracy 0.5000 < minimum "
                                       "0.9 (1/2 labels)", rows=2, label_rows=2, mismatches=1,
                                min_accuracy=0.9).figures()
    first = repository.record_deployment(e1, "keyed", ACCEPTED, T0 + 10_000)
    second = repository.record_deployment(e2, "keyed", ACCEPTED, T0 + 20_000)
    records = [first, repository.record_deployment(e1, "broadcast", ACCEPTED, T0 + 11_000),
               second, repository.record_retirement(first, "keyed", T0 + 20_000, retired_by="2"),
               repository.record_deployment(e3, "keyed", VALIDATION_FAILED, T0 + 30_000,
                                            reason="validation failed on 2 rows", figures=figures),
               repository.record_deployment(entry_of(published("7", T0, data_type="iris")),
                                            "keyed", REFUSED, T0 + 5000, reason="corrupt bytes")]
    jobs = ["keyed", "broadcast", "keyed", "keyed", "keyed", "keyed"]
    return [(repository.topic_key(r, job), r.SerializeToString()) for r, job in zip(records, jobs)]


@pytest.fixture
def view() -> RepositoryView:
    folded = RepositoryView()
    for record_key, value in records_of_a_timeline():
        folded.ingest(record_key.encode(), value)
    return folded


def test_the_view_lists_each_data_type_with_its_latest_version_and_who_serves_what(view):
    listing = view.listing()
    assert list(listing["data_types"]) == ["iris", WINE] and listing["count"] == 2
    wine = listing["data_types"][WINE]
    assert wine["versions"] == 3 and wine["latest"]["version"] == "3"
    assert wine["latest"]["outcome"] == "VALIDATION_FAILED" and wine["latest"]["serving_on"] == []
    assert {job: s["version"] for job, s in wine["serving"].items()} == {"broadcast": "1",
                                                                         "keyed": "2"}
    assert wine["serving"]["keyed"]["digest"] == hashlib.sha256(b"model 2").hexdigest()
    assert listing["data_types"]["iris"]["latest"]["outcome"] == "REFUSED"
    json.dumps(listing)


def test_the_history_has_every_version_oldest_first_with_each_jobs_decisions(view):
    history = view.history(WINE)
    assert [v["version"] for v in history["versions"]] == ["1", "2", "3"]
    first, second, third = history["versions"]
    assert first["outcome"] == "SERVING" and first["serving_on"] == ["broadcast"]
    assert sorted((d["job"], d["outcome"], d["deployed_ms"], d["retired_ms"], d["retired_by"])
                  for d in first["deployments"]) == [
        ("broadcast", "ACCEPTED", T0 + 11_000, None, None),
        ("keyed", "ACCEPTED", T0 + 10_000, T0 + 20_000, "2")]
    assert second["serving_on"] == ["keyed"] and second["created_ms"] == T0 + 2000
    assert second["quality_metrics"] == {"accuracy": 0.9} and second["inline_bytes"] == 7
    [refusal] = third["deployments"]
    assert refusal["validation"]["mismatches"] == 1 and refusal["validation"]["minAccuracy"] == 0.9
    assert refusal["validation"]["passed"] is False
    assert history["serving"] == {"broadcast": "1", "keyed": "2"}
    assert view.history("beer") is None
    assert view.show(WINE, "2")["digest"] == hashlib.sha256(b"model 2").hexdigest()
    assert view.show(WINE)["version"] == "3" and view.show(WINE, "9") is None


def test_tombstones_are_skipped_and_undecodable_records_counted(view):
    before = view.listing()
    view.ingest(b"x", None)
    view.ingest(b"y", b"\xff\xff not an entry")
    assert view.listing() == before
    health = view.health()
    assert (health["entries"], health["data_types"], health["undecodable"]) == (4, 2, 1)
    assert health["messages"] == len(records_of_a_timeline()) + 2


# -- the state service ----------------------------------------------------------------------------

@pytest.fixture
def service(view):
    svc = StateService(port=0, repository=view).start()
    try:
        yield svc
    finally:
        svc.stop()


def test_the_repository_endpoints(service):
    status, ctype, body = get(service.url + "/repository")
    assert (status, ctype) == (200, "application/json")
    assert json.loads(body)["data_types"][WINE]["latest"]["version"] == "3"
    status, _, body = get(service.url + f"/repository/{WINE}")
    assert status == 200 and [v["version"] for v in json.loads(body)["versions"]] == ["1", "2", "3"]
    status, _, body = get(service.url + f"/repository/{WINE}?version=1")
    assert status == 200 and json.loads(body)["serving_on"] == ["broadcast"]
    status, _, body = get(service.url + "/repository/beer")
    assert status == 404 and json.loads(body)["known_data_types"] == ["iris", WINE]
    status, _, body = get(service.url + f"/repository/{WINE}?version=9")
    assert status == 404 and "no version '9' of data type 'wine'" in json.loads(body)["message"]
    health = json.loads(get(service.url + "/health")[2])
    assert health["repository"]["view"]["entries"] == 4


def test_without_a_repository_its_endpoints_say_so():
    with StateService(port=0) as svc:
        svc.view.ingest(key("keyed", WINE), stats(WINE))
        status, _, body = get(svc.url + "/repository")
        assert status == 404 and "reads no repository topic" in json.loads(body)["message"]
        assert json.loads(get(svc.url + "/health")[2])["repository"] is None


def test_the_page_draws_the_repository_as_text_from_its_endpoints():
    from modelserving.state.app import load_page

    script = re.search(r"<script>(.*?)</script>", load_page(), flags=re.DOTALL).group(1)
    assert 'getJson("repository")' in script and '"repository/" + encodeURIComponent' in script
    for column in ("version", "created", "deployed", "retired", "outcome"):
        assert f'"{column}"' in script


# -- modelserving models --------------------------------------------------------------------------

def test_the_command_has_list_show_history_rollback_promote_and_abort():
    parser = cli.build_parser()
    models = next(a for a in parser._subparsers._group_actions[0].choices.items()
                  if a[0] == "models")[1]
    actions = models._subparsers._group_actions[0].choices
    assert set(actions) == {"list", "show", "history", "rollback", "promote", "abort"}


def test_the_tables_name_versions_times_outcomes_and_reasons(view):
    listing = models_cli.listing_lines(view.listing())
    assert listing[0].split()[:3] == ["DATA", "TYPE", "VERSIONS"]
    wine = next(line for line in listing if line.startswith(WINE))
    assert wine.split()[:4] == [WINE, "3", "3", "logreg-3"]
    assert "VALIDATION_FAILED" in wine and "broadcast: 1, keyed: 2" in wine

    history = models_cli.history_lines(view.history(WINE))
    assert len(history) == 1 + 4           # the header, two decisions of v1, one each of v2, v3
    keyed_v1 = next(line for line in history if line.startswith("1 ") and " keyed " in line)
    assert "2023-11-14 22:13:30" in keyed_v1 and "2023-11-14 22:13:40" in keyed_v1
    assert keyed_v1.endswith("replaced by 2")
    assert hashlib.sha256(b"model 1").hexdigest()[:12] in keyed_v1
    assert history[-1].endswith("validation failed on 2 rows")

    shown = "\n".join(models_cli.show_lines(view.show(WINE, "1")))
    assert "input features    a, b" in shown and "quality metrics   accuracy=0.9" in shown
    assert "serving on        broadcast" in shown and "possible (descriptor kept)" in shown


def captured_publication(monkeypatch) -> list[ModelDescriptor]:
    from modelserving.kafka import clients

    sent = []

    class Producer:
        def close(self):
            pass

    monkeypatch.setattr(clients, "producer", lambda settings: Producer())
    monkeypatch.setattr(clients, "publish_model",
                        lambda producer, topic, descriptor: sent.append((topic, descriptor)))
    return sent


def test_rollback_republishes_the_version_accepted_before_the_serving_one(view, monkeypatch):
    sent = captured_publication(monkeypatch)
    settings = Settings(models_topic="models-x")
    target, descriptor = models_cli.rollback(settings, WINE, job="keyed",
                                             repository=view.repository(), now_ms=T0 + 99)
    assert target.version == "1"
    [(topic, published_again)] = sent
    assert topic == "models-x" and published_again is descriptor
    assert descriptor.publishedMs == T0 + 99 and descriptor.data == b"model 1"
    with pytest.raises(ToolError, match="not rolled back: version '3' of data type 'wine' was "
                                        "never accepted"):
        models_cli.rollback(settings, WINE, to_version="3", repository=view.repository())


def test_rollback_of_a_location_whose_files_changed_is_refused_with_both_digests(tmp_path,
                                                                                 monkeypatch):
    sent = captured_publication(monkeypatch)
    model = tmp_path / "model.onnx"
    model.write_bytes(b"first files")
    descriptors = [ModelDescriptor(name="m", version=v, dataType=WINE, modeltype=ModelType.ONNX,
                                   location=str(model), publishedMs=T0 + int(v))
                   for v in ("1", "2")]
    folded = RepositoryView()
    for at, descriptor in enumerate(descriptors):
        entry = repository.entry_from_descriptor(descriptor,
                                                 digest=model_digest(descriptor, [tmp_path]))
        folded.ingest(None, repository.record_deployment(entry, "keyed", ACCEPTED,
                                                         T0 + at).SerializeToString())
    first_digest = digest_path(model)
    model.write_bytes(b"other files")
    settings = Settings(model_dirs=(str(tmp_path),))
    with pytest.raises(ToolError) as refused:
        models_cli.rollback(settings, WINE, repository=folded.repository())
    assert str(refused.value) == (
        f"not rolled back: the files at location {str(model)!r} changed since the model was "
        f"first published: their SHA-256 is now {digest_path(model)}, it was {first_digest}")
    assert sent == []
    model.write_bytes(b"first files")        # the same files again: the rollback goes ahead
    target, _ = models_cli.rollback(settings, WINE, repository=folded.repository())
    assert target.version == "1" and len(sent) == 1


def test_the_commands_failures_are_one_line(capsys, monkeypatch):
    for name in [n for n in os.environ if n.startswith("MODELSERVING_")]:
        monkeypatch.delenv(name)
    assert cli.main(["models", "list", "--repository-topic", ""]) == 2
    assert capsys.readouterr().err == (
        "modelserving: the repository topic is empty (repository_topic / "
        "MODELSERVING_REPOSITORY_TOPIC): there is no repository to read\n")
    assert cli.main(["models", "history", "wine", "--bootstrap-servers", "127.0.0.1:1",
                     "--timeout", "2"]) == 1
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("modelserving: ") and "model-repository" in line
