"""The logic every Python peer shares (model table, batch scoring into results) and how the
runner starts each peer."""
from __future__ import annotations

import sys

import pytest

from modelserving.bench import JOBS, BYTEWAX, CONFLUENT_LOOP, CONFLUENT_LOOP_2P, PEERS, PLAIN_LOOP, QUIX, SYSTEMS
from modelserving.bench.peers import launch
from modelserving.bench.peers.scoring import ModelTable, score
from protos import DataRecord, ModelDescriptor, ModelType, ServingResult
from udfs.runtimes.base import Prediction


class FakeRuntime:
    """Scores a row as the sum of its features, and remembers every call."""

    def __init__(self, input_names=("a", "b")):
        self.input_names = tuple(input_names)
        self.calls = []
        self.closed = False

    def score(self, batch):
        assert batch.names == self.input_names
        self.calls.append(batch.values.copy())
        return [Prediction(float(row.sum()), label=f"L{int(row.sum())}", probabilities=(0.25, 0.75),
                           class_labels=("x", "y")) for row in batch.values]

    def close(self):
        self.closed = True


def record(data_type: str, record_id: str, ts: int, **features) -> bytes:
    message = DataRecord(dataType=data_type, id=record_id, ts=ts)
    message.features.update(features)
    return message.SerializeToString()


def table_with(**runtimes) -> ModelTable:
    table = ModelTable([])
    for data_type, runtime in runtimes.items():
        descriptor = ModelDescriptor(name=f"m-{data_type}", version="3", dataType=data_type,
                                     modeltype=ModelType.ONNX)
        table.models[data_type] = (descriptor, runtime)
    return table


def test_one_model_call_per_data_type_and_results_in_wire_format():
    red, white = FakeRuntime(("a", "b")), FakeRuntime(("b",))
    table = table_with(red=red, white=white)
    raws = [record("red", "r1", 11, a=1.0, b=2.0), record("white", "w1", 12, a=5.0, b=7.0),
            record("red", "r2", 13, b=10.0, a=20.0), record("rose", "x1", 14, a=1.0, b=1.0),
            b"\xff\xff not a record"]
    results = [ServingResult.FromString(raw) for raw in score(table, raws)]
    assert len(red.calls) == 1 and len(white.calls) == 1
    assert red.calls[0].tolist() == [[1.0, 2.0], [20.0, 10.0]]   # the model's feature order
    assert white.calls[0].tolist() == [[7.0]]
    # no model for "rose", and the bad bytes: skipped; the rest in first-appearance order of types
    assert [(r.recordId, r.dataType, r.score, r.label) for r in results] == [
        ("r1", "red", 3.0, "L3"), ("r2", "red", 30.0, "L30"), ("w1", "white", 7.0, "L7")]
    first = results[0]
    assert first.status == ServingResult.SCORED
    assert (first.modelName, first.modelVersion, first.modelType) == ("m-red", "3", ModelType.ONNX)
    assert first.recordTs == 11
    assert list(first.probabilities) == [0.25, 0.75] and list(first.classLabels) == ["x", "y"]
    assert first.scoringMicros > 0 and first.servedMs > 0
    assert results[0].servedMs == results[1].servedMs   # one batch, one serving time


def test_no_records_no_calls():
    runtime = FakeRuntime()
    assert score(table_with(red=runtime), []) == []
    assert runtime.calls == []


def test_a_bad_descriptor_leaves_the_table_as_it_was(tmp_path):
    runtime = FakeRuntime()
    table = table_with(red=runtime)
    assert not table.install(b"\xff\xff not a descriptor")
    unknown_location = ModelDescriptor(name="m", version="4", dataType="red", modeltype=ModelType.ONNX,
                                       location=str(tmp_path / "missing.onnx"))
    assert not table.install(unknown_location.SerializeToString())
    assert table.models["red"][1] is runtime and not runtime.closed
    assert len(table) == 1 and "red" in table and "white" not in table


def test_a_new_model_replaces_and_closes_the_old(tmp_path):
    pytest.importorskip("onnxruntime")
    from modelserving.demo.training import (TrainedModel, demo_dataset, descriptor_for, export_onnx,
                                            fit_logistic)

    data = demo_dataset()
    path = tmp_path / "logreg.onnx"
    export_onnx(fit_logistic(data.X, data.y), len(data.feature_names), path)
    model = TrainedModel("logreg", "5", ModelType.ONNX, path, True, data.feature_names,
                         data.class_labels, "")
    old = FakeRuntime()
    table = table_with(red=old)
    assert table.install(descriptor_for(model, "red").SerializeToString())
    descriptor, runtime = table.models["red"]
    assert (descriptor.name, descriptor.version) == ("logreg", "5") and old.closed
    raw = record("red", "r1", 1, **dict(zip(data.feature_names, map(float, data.X[0]))))
    (result,) = [ServingResult.FromString(r) for r in score(table, [raw])]
    assert result.label == str(data.y[0]) and len(result.probabilities) == 3


def test_every_peer_is_a_system_measured_after_the_jobs():
    assert PEERS == (PLAIN_LOOP, QUIX, BYTEWAX, CONFLUENT_LOOP, CONFLUENT_LOOP_2P)
    assert set(PEERS) <= set(SYSTEMS)
    assert min(SYSTEMS.index(peer) for peer in PEERS) > max(SYSTEMS.index(job) for job in JOBS)


def test_commands_of_each_peer(tmp_path, monkeypatch):
    venv = tmp_path / "peers-venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").touch()
    monkeypatch.setenv(launch.PEERS_VENV_VARIABLE, str(venv))
    assert launch.commands(PLAIN_LOOP) == [[sys.executable, "-m", "modelserving.bench.plain_loop"]]
    one = [sys.executable, "-m", "modelserving.bench.peers.confluent_loop", "--batch", "1000"]
    assert launch.commands(CONFLUENT_LOOP) == [one]
    assert launch.commands(CONFLUENT_LOOP_2P) == [one, one]   # one consumer group: the settings' group_id
    assert launch.commands(QUIX) == [[str(venv / "bin" / "python"), "-m", "modelserving.bench.peers.quix_app"]]
    workers = launch.commands(BYTEWAX)
    assert [argv[:4] for argv in workers] == [
        [sys.executable, "-m", "bytewax.run", "modelserving.bench.peers.bytewax_flow:get_flow(1000)"]] * 2
    assert [argv[4:6] for argv in workers] == [["-i", "0"], ["-i", "1"]]
    addresses = {argv[7] for argv in workers}
    assert len(addresses) == 1   # both processes are told the same cluster
    hosts = addresses.pop().split(";")
    assert len(hosts) == 2 and len(set(hosts)) == 2 and all(h.startswith("127.0.0.1:") for h in hosts)
    with pytest.raises(ValueError):
        launch.commands("keyed")


def test_quix_without_its_venv_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv(launch.PEERS_VENV_VARIABLE, str(tmp_path / "nowhere"))
    with pytest.raises(launch.PeerUnavailable, match="./dev setup"):
        launch.commands(QUIX)
    assert launch.peer_versions() == {}
