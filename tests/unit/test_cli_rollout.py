"""Canary and shadow from the command line, without a broker: what ``publish model --canary``
/ ``--shadow`` and ``models promote`` / ``abort`` put on the models topic, byte for byte (a
producer standing in for Kafka takes what ``clients.publish_model`` sends), their one-line
failures, and the repository tables naming each deployment's role."""
from __future__ import annotations

import os
import re
import struct
import time

import pytest

from modelserving import cli
from modelserving.cli import models as models_cli
from modelserving.cli.lifecycle import canary_share
from modelserving.errors import KafkaToolError, UsageError
from modelserving.state.repository import RepositoryView
from protos import ModelDescriptor, ModelType, Rollout
from udfs.lifecycle import repository

from test_state_service import T0, canary_then_shadow_repository
from test_wire_format import varint

#: ModelDescriptor.rollout is field 19, length-delimited: its key on the wire.
ROLLOUT_KEY = b"\x9a\x01"


class CapturingProducer:
    """Takes what ``clients.publish_model`` sends, as kafka-python's producer would."""

    config = {"bootstrap_servers": "nowhere:9092"}

    def __init__(self):
        self.sent: list[tuple[str, bytes, bytes]] = []
        self.closed = False

    def send(self, topic, key=None, value=None):
        self.sent.append((topic, key, value))
        return self

    def get(self, timeout=None):
        return None

    def close(self):
        self.closed = True


@pytest.fixture
def producer(monkeypatch) -> CapturingProducer:
    from modelserving.kafka import clients

    for name in [n for n in os.environ if n.startswith("MODELSERVING_")]:
        monkeypatch.delenv(name)
    capturing = CapturingProducer()
    monkeypatch.setattr(clients, "producer", lambda settings, **overrides: capturing)
    return capturing


def publish(onnx_wine, *options) -> int:
    return cli.main(["publish", "model", str(onnx_wine.path), "--data-type", "wine-cultivar",
                     "--input-features", ",".join(onnx_wine.feature_names), "--version", "2",
                     "--models-topic", "models-x", *options])


def expected_descriptor(onnx_wine, published_ms: int, rollout: Rollout) -> bytes:
    """The descriptor ``publish`` must send, built here field by field."""
    return ModelDescriptor(name=onnx_wine.path.stem, dataType="wine-cultivar",
                           modeltype=ModelType.ONNX, data=onnx_wine.path.read_bytes(),
                           version="2", inputFeatures=list(onnx_wine.feature_names),
                           publishedMs=published_ms, rollout=rollout).SerializeToString()


# -- publish model --canary / --shadow -------------------------------------------------------------

@pytest.mark.parametrize("share", ["10%", "0.1"])
def test_publish_model_as_a_canary_sends_the_model_with_a_deploy_rollout_and_its_share(
        onnx_wine, producer, capsys, share):
    before = int(time.time() * 1000)
    assert publish(onnx_wine, "--canary", share) == 0
    [(topic, key, value)] = producer.sent
    assert (topic, key, producer.closed) == ("models-x", b"wine-cultivar", True)
    sent = ModelDescriptor.FromString(value)
    assert before <= sent.publishedMs <= int(time.time() * 1000)
    assert value == expected_descriptor(onnx_wine, sent.publishedMs,
                                        Rollout(action=Rollout.DEPLOY, mode=Rollout.CANARY,
                                                share=0.1))
    # on the wire, last (the highest field): action DEPLOY and mode CANARY are the defaults
    # (not written), the share is field 3, a double
    assert value.endswith(ROLLOUT_KEY + b"\x09" + b"\x19" + struct.pack("<d", 0.1))
    assert sent.HasField("rollout") and sent.rollout.share == 0.1
    assert capsys.readouterr().out == (
        f"published ONNX model '{onnx_wine.path.stem}' for data type 'wine-cultivar' "
        f"({len(onnx_wine.path.read_bytes())} bytes inline) to models-x, as its candidate: "
        f"canary 10%\n")


def test_publish_model_as_a_shadow_sends_a_deploy_rollout_in_shadow_mode(onnx_wine, producer,
                                                                         capsys):
    assert publish(onnx_wine, "--shadow") == 0
    [(_, _, value)] = producer.sent
    sent = ModelDescriptor.FromString(value)
    assert value == expected_descriptor(onnx_wine, sent.publishedMs,
                                        Rollout(action=Rollout.DEPLOY, mode=Rollout.SHADOW))
    assert value.endswith(ROLLOUT_KEY + b"\x02" + b"\x10\x01")     # mode (field 2) = SHADOW
    assert capsys.readouterr().out.endswith(" to models-x, as its candidate: shadow\n")


def test_publish_model_without_canary_or_shadow_sends_no_rollout(onnx_wine, producer):
    """The model replaces the data type's model, as before: the rollout is absent, not empty
    (an empty one would still make it a canary of share 0 to the jobs)."""
    assert publish(onnx_wine) == 0
    [(_, _, value)] = producer.sent
    sent = ModelDescriptor.FromString(value)
    assert not sent.HasField("rollout")
    assert value == expected_descriptor(onnx_wine, sent.publishedMs, rollout=None)


@pytest.mark.parametrize("share", ["0", "0%", "1.5", "150%", "-0.1", "nan", "inf", "ten", ""])
def test_a_canary_share_outside_0_to_1_is_one_line_and_exit_2_with_nothing_sent(
        onnx_wine, producer, capsys, share):
    assert publish(onnx_wine, "--canary", share) == 2
    assert capsys.readouterr().err == (
        f"modelserving: --canary takes the share of the records the candidate answers, in "
        f"(0, 1] (0.1, or 10%), not {share!r}\n")
    assert producer.sent == []


def test_canary_shares_take_fractions_and_percentages_up_to_the_whole():
    assert [canary_share(text) for text in ("1", "100%", "0.5%", " 0.25 ", "12.5%")] == [
        1.0, 1.0, 0.005, 0.25, 0.125]
    with pytest.raises(UsageError):
        canary_share("1.0000001")


def test_canary_and_shadow_together_are_refused_by_the_parser(onnx_wine, producer, capsys):
    with pytest.raises(SystemExit) as exit_:
        publish(onnx_wine, "--canary", "0.1", "--shadow")
    assert exit_.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err
    assert producer.sent == []


# -- models promote / abort ------------------------------------------------------------------------



@pytest.mark.parametrize("command, action, effect", [
    ("promote", 1, "each job's candidate of the data type becomes its model (the model serving "
                   "it retires)"),
    ("abort", 2, "each job drops its candidate of the data type (the model serving it serves "
                 "alone)")])
def test_promote_and_abort_publish_only_the_data_type_the_time_and_the_action(
        producer, capsys, command, action, effect):
    before = int(time.time() * 1000)
    assert cli.main(["models", command, "wine", "--models-topic", "models-x"]) == 0
    [(topic, key, value)] = producer.sent
    published_ms = ModelDescriptor.FromString(value).publishedMs
    assert before <= published_ms <= int(time.time() * 1000)
    assert (topic, key) == ("models-x", b"wine")
    # dataType (3) "wine", publishedMs (9), rollout (19) holding only its action (1)
    assert value == (b"\x1a\x04wine" + b"\x48" + varint(published_ms)
                     + ROLLOUT_KEY + b"\x02" + b"\x08" + bytes([action]))
    name = Rollout.Action.Name(action)
    assert capsys.readouterr().out == (
        f"published {name} for data type 'wine' to models-x (rollout action {name}, "
        f"publishedMs {published_ms}): {effect}; a job without a candidate dead-letters it "
        f"(BAD_MODEL)\n")


def test_the_control_descriptor_of_a_given_time():
    descriptor = models_cli.control_descriptor("wine", Rollout.PROMOTE, now_ms=T0)
    assert descriptor == ModelDescriptor(dataType="wine", publishedMs=T0,
                                         rollout=Rollout(action=Rollout.PROMOTE))
    assert descriptor.WhichOneof("MessageContent") is None and not descriptor.name


def test_promote_and_abort_failures_are_one_line(producer, capsys, monkeypatch):
    from modelserving.kafka import clients

    assert cli.main(["models", "promote", " "]) == 2
    assert capsys.readouterr().err == (
        "modelserving: the data type is empty: name the data type whose candidate to end\n")
    assert producer.sent == []

    def unreachable(settings, **overrides):
        raise KafkaToolError("connecting a producer: no Kafka broker answered at 127.0.0.1:1")

    monkeypatch.setattr(clients, "producer", unreachable)
    assert cli.main(["models", "abort", "wine"]) == 1
    assert capsys.readouterr().err == (
        "modelserving: connecting a producer: no Kafka broker answered at 127.0.0.1:1\n")
    with pytest.raises(SystemExit) as exit_:
        cli.main(["models", "promote"])
    assert exit_.value.code == 2


# -- the tables name each deployment's role ---------------------------------------------------------

def cells(line: str) -> list[str]:
    return re.split(r"\s{2,}", line.strip())


def test_history_and_show_name_each_deployments_role_and_how_it_ended():
    view = canary_then_shadow_repository()
    history = models_cli.history_lines(view.history("wine"))
    assert cells(history[0])[6:] == ["JOB", "ROLE", "OUTCOME", "DEPLOYED", "RETIRED", "NOTE"]
    assert [cells(line)[0:1] + cells(line)[6:] for line in history[1:]] == [
        ["1", "keyed", "primary", "ACCEPTED", "2023-11-14 22:13:21", "2023-11-14 22:13:50",
         "replaced by 2"],
        ["1", "broadcast", "primary", "ACCEPTED", "2023-11-14 22:13:21", "-", "-"],
        ["2", "keyed", "canary 10%", "ACCEPTED", "2023-11-14 22:13:30", "2023-11-14 22:13:50",
         "promoted"],
        ["2", "keyed", "primary", "ACCEPTED", "2023-11-14 22:13:50", "-", "-"],
        ["3", "keyed", "shadow", "ACCEPTED", "2023-11-14 22:14:00", "-", "-"],
        ["4", "keyed", "primary", "VALIDATION_FAILED", "2023-11-14 22:14:10", "-",
         "validation failed on 45 rows: accuracy 0.6000 < minimum 0.9 (27/45 labels)"]]
    shown = models_cli.show_lines(view.show("wine", "3"))
    assert "candidate on      keyed" in shown and "serving on        -" in shown
    assert cells(shown[shown.index("decisions:") + 2]) == [
        "keyed", "shadow", "ACCEPTED", "2023-11-14 22:14:00", "-", "-"]


def test_the_listing_names_what_serves_and_the_candidate_apart():
    listing = models_cli.listing_lines(canary_then_shadow_repository().listing())
    assert cells(listing[0])[-2:] == ["SERVING (JOB: VERSION)", "CANDIDATE (JOB: VERSION)"]
    assert cells(listing[1])[-3:] == ["VALIDATION_FAILED", "broadcast: 1, keyed: 2",
                                      "keyed: 3 (shadow)"]


# -- rollback beside a candidate --------------------------------------------------------------------

def published_entry(version: str, *deployments: tuple, rollout: Rollout | None = None):
    """The entry of a published descriptor (kept in it, as the jobs keep it) with
    ``deployments``: (role, deployed, retired, retired by) on keyed."""
    descriptor = ModelDescriptor(name="logreg", version=version, dataType="wine",
                                 modeltype=ModelType.ONNX, data=f"model {version}".encode(),
                                 publishedMs=T0 + int(version), rollout=rollout)
    entry = repository.entry_from_descriptor(descriptor, digest=f"{version:0>64}")
    for role, deployed, retired, by in deployments:
        entry.deployments.add(job="keyed", outcome=repository.ACCEPTED, role=role,
                              deployedMs=T0 + deployed, retiredMs=T0 + retired if retired else 0,
                              retiredBy=by)
    return entry


def test_rollback_steps_back_from_the_serving_model_not_from_its_candidate(monkeypatch):
    """keyed serves v2 (v1 before it) with v3 as a canary deployed after it: a rollback
    republishes v1, not v2 (which it would if the canary counted as what serves); rolled
    back to, v3 comes without its rollout, as the data type's model."""
    from jobs.settings import Settings
    from modelserving.kafka import clients

    sent = []
    monkeypatch.setattr(clients, "producer", lambda settings: CapturingProducer())
    monkeypatch.setattr(clients, "publish_model",
                        lambda producer, topic, descriptor: sent.append(descriptor))
    canary = Rollout(action=Rollout.DEPLOY, mode=Rollout.CANARY, share=0.1)
    view = RepositoryView()
    for entry in (published_entry("1", ("", 1000, 20_000, "2")),
                  published_entry("2", ("", 20_000, 0, "")),
                  published_entry("3", ("canary 10%", 30_000, 0, ""), rollout=canary)):
        view.ingest(None, entry.SerializeToString())
    settings = Settings(models_topic="models-x")
    target, descriptor = models_cli.rollback(settings, "wine", job="keyed",
                                             repository=view.repository(), now_ms=T0 + 99)
    assert target.version == "1" and descriptor.data == b"model 1"
    target, descriptor = models_cli.rollback(settings, "wine", to_version="3",
                                             repository=view.repository(), now_ms=T0 + 99)
    assert target.version == "3" and not descriptor.HasField("rollout")
    assert descriptor.data == b"model 3" and descriptor.publishedMs == T0 + 99
    assert [(d.version, d.publishedMs, d.HasField("rollout")) for d in sent] == [
        ("1", T0 + 99, False), ("3", T0 + 99, False)]
