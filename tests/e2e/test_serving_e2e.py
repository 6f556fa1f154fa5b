"""End to end on the real broker: models and records published with the client, results read
back from Kafka. One job process per job module serves the whole scenario, in order."""
from __future__ import annotations

import math
from hashlib import sha256 as _sha256

import pytest

from modelserving.kafka.clients import Row, encode_record
from modelserving.demo.training import DEMO_DATA_TYPE, descriptor_for
from protos import DeadLetter, ModelDescriptor, ModelType, ServingResult

from jobrunner import MAX_MODEL_BYTES, Collector, JobProcess, assert_scored_by

pytestmark = pytest.mark.e2e


def sha256(raw: bytes) -> str:
    return _sha256(raw).hexdigest()


def test_record_before_any_model_is_reported(serving):
    rows = serving.rows("early", 3, data_type="nothing-published-for-this-type")
    serving.send_records(rows)
    results = serving.wait_for_ids([r.record_id for r in rows])
    assert {r.status for r in results.values()} == {ServingResult.NO_MODEL}


def test_model_a_scores_records_then_model_b_takes_over(serving):
    model_a, model_b = serving.models[ModelType.ONNX], serving.models[ModelType.TENSORFLOWSAVED]
    serving.send_model(descriptor_for(model_a))
    serving.wait_until_serving(model_a.name)
    rows_a = serving.rows("a", 40)
    serving.send_records(rows_a)
    assert_scored_by(serving.wait_for_ids(r.record_id for r in rows_a), model_a, rows_a)

    serving.send_model(descriptor_for(model_b))  # by location: a SavedModel directory
    serving.wait_until_serving(model_b.name)
    rows_b = serving.rows("b", 40)
    serving.send_records(rows_b)
    assert_scored_by(serving.wait_for_ids(r.record_id for r in rows_b), model_b, rows_b)
    # the switch is in the log, at INFO, naming both models
    log = serving.process.flink_log()
    assert f"loaded TENSORFLOWSAVED model '{model_b.name}' v{model_b.version} for data type " \
        f"'{DEMO_DATA_TYPE}', replacing ONNX model '{model_a.name}'" in log


def bad_models(models) -> dict[str, tuple[bytes, str]]:
    """Every bad model of the issue, with the reason its dead letter must give."""
    def d(name, **fields) -> bytes:
        base = dict(name=name, version="9", dataType=DEMO_DATA_TYPE, modeltype=ModelType.ONNX)
        base.update(fields)
        return ModelDescriptor(**base).SerializeToString()
    pmml_doctype = (b'<?xml version="1.0"?>\n<!DOCTYPE PMML [<!ENTITY e SYSTEM "file:///etc/passwd">]>\n'
                    + models[ModelType.PMML].path.read_bytes().split(b"?>", 1)[1])
    return {
        "empty": (b"", "empty model message"),
        "unparsable": (b"\xff\xff\xff not a descriptor", "not a ModelDescriptor protobuf"),
        "unknown type": (d("unknown-type", modeltype=17, data=b"x"), "unknown model type 17"),
        "corrupt onnx": (d("corrupt-onnx", data=b"\x08\x01 these are not onnx bytes"), "model 'corrupt-onnx'"),
        "corrupt pmml": (d("corrupt-pmml", modeltype=ModelType.PMML, data=b"<PMML><oops"), "model 'corrupt-pmml'"),
        "missing location": (d("missing", modeltype=ModelType.TENSORFLOWSAVED, location="nope/1"), "does not exist"),
        "outside location": (d("outside", modeltype=ModelType.TENSORFLOWSAVED, location="/etc"),
                             "outside the model directories"),
        "doctype": (d("doctype", modeltype=ModelType.PMML, data=pmml_doctype), "DOCTYPE"),
        "too large": (d("too-large", data=b"\0" * (MAX_MODEL_BYTES + 1)), "over the limit"),
    }


def test_bad_input_goes_to_dead_letters_and_serving_continues(serving):
    model_b = serving.models[ModelType.TENSORFLOWSAVED]
    serving.send_model(descriptor_for(model_b))
    serving.wait_until_serving(model_b.name)

    good = serving.rows("x", 1)[0]
    bad_records = {
        "empty": (b"", "empty message"),
        "unparsable": (b"\xff\xfe\xfd garbage", "not a WineRecord or DataRecord protobuf"),
        "nan": (encode_record(Row(DEMO_DATA_TYPE, good.names, (math.nan,) + good.values[1:], "nan")),
                "is nan"),
        "wrong count": (encode_record(Row(DEMO_DATA_TYPE, good.names[:5], good.values[:5], "few")),
                        "wrong number of features"),
    }
    for raw, _ in bad_records.values():
        serving.send_raw_record(raw)
    models = bad_models(serving.models)
    for raw, _ in models.values():
        serving.send_model(raw)

    data_topic, models_topic = serving.settings.data_topic, serving.settings.models_topic
    # dead letters carry a bounded prefix of the input, and the whole input's SHA-256
    wanted = [(data_topic, sha256(raw)) for raw, _ in bad_records.values()] + \
             [(models_topic, sha256(raw)) for raw, _ in models.values()]

    def letters(c: Collector):
        found = {(d.sourceTopic, d.rawSha256): d for d in c.dead_letters}
        return found if all(key in found for key in wanted) else None
    found = serving.collector.wait_for(letters, 120, "a dead letter for every bad input")
    for what, (raw, reason) in bad_records.items():
        letter = found[(data_topic, sha256(raw))]
        assert reason in letter.reason and letter.kind == DeadLetter.BAD_RECORD, what
    for what, (raw, reason) in models.items():
        letter = found[(models_topic, sha256(raw))]
        assert reason in letter.reason and letter.kind == DeadLetter.BAD_MODEL, what

    # the bad models left model B serving
    after = serving.rows("after-bad", 20)
    serving.send_records(after)
    assert_scored_by(serving.wait_for_ids(r.record_id for r in after), model_b, after)
    # counted in the job's metrics (Python metrics reach the REST API with some delay)
    counted = serving.collector.wait_for(
        lambda c: (m := job_metrics(serving.process)).get("dead_letters_models", 0) >= len(models)
        and m.get("dead_letters_records", 0) >= len(bad_records) and m, 90, "dead-letter metrics")
    assert counted["records_scored"] >= len(after)
    # and per data type, with the serving model's version as a gauge
    assert counted[f"datatype.{DEMO_DATA_TYPE}.records_scored"] >= len(after)
    assert counted[f"datatype.{DEMO_DATA_TYPE}.dead_letters_records"] >= 2  # nan, wrong count
    assert counted[f"datatype.{DEMO_DATA_TYPE}.model_version"] >= int(model_b.version)


def job_metrics(process: JobProcess) -> dict[str, float]:
    """Sum of the serving operator's modelserving.* metrics over its subtasks (REST API)."""
    job = process.rest(f"/jobs/{process.job_id}")
    totals: dict[str, float] = {}
    for vertex in job["vertices"]:
        names = process.rest(f"/jobs/{process.job_id}/vertices/{vertex['id']}/subtasks/metrics") or []
        wanted = [m["id"] for m in names if ".modelserving." in m["id"]]
        if not wanted:
            continue
        # a few ids per request: the ids of every data type's metrics in one query string
        # outgrow the REST server's 4 KiB request line, and it answers with an error
        for start in range(0, len(wanted), 20):
            values = process.rest(
                f"/jobs/{process.job_id}/vertices/{vertex['id']}/subtasks/metrics"
                f"?get={','.join(wanted[start:start + 20])}&agg=sum") or []
            for metric in values:
                totals[metric["id"].split(".modelserving.", 1)[1]] = metric["sum"]
    return totals


def test_withdrawn_model_stops_serving_its_data_type(serving):
    model = serving.models[ModelType.ONNX]
    data_type = "withdrawn-type"
    serving.send_model(descriptor_for(model, data_type=data_type))
    serving.wait_until_serving(model.name, data_type)
    serving.send_model(ModelDescriptor(name=model.name, dataType=data_type, withdraw=True))
    serving.wait_until(lambda r: r.status == ServingResult.NO_MODEL, data_type,
                       what="NO_MODEL results after the withdrawal")
    # the other data type keeps its model
    serving.wait_until(lambda r: r.status == ServingResult.SCORED, what="the demo type still served")
