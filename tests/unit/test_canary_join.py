"""Canary and shadow deployment in the keyed join (in-memory runtime context, real ONNX
models): which records the candidate answers, what goes to the shadow output, how the two
models compare, promotion, abort, a failing candidate, refusals and the repository's record
of it all. The expected figures come from the scikit-learn pipelines the models were
exported from, and the expected routing from ``udfs.lifecycle.routing``."""
from __future__ import annotations

import copy

import numpy as np
import pytest
from pyflink.common import Row as FlinkRow

from flink_state_fakes import KeyedContext
from jobs.settings import Settings
from modelserving.demo.training import DEMO_DATA_TYPE, export_onnx, fit_logistic
from modelserving.kafka.clients import Row, encode_record
from protos import DeadLetter, ModelDescriptor, ModelStats, RepositoryEntry, Rollout, ServingResult
from udfs.candidates import Candidacy
from udfs.flink.joins import (DEAD_LETTERS, KEYED_CANDIDATE, MODEL_STATS, REPOSITORY_ENTRIES,
                              SHADOW_RESULTS, KeyedServing)
from udfs.lifecycle.routing import goes_to_candidate
from udfs.lifecycle.repository import ACCEPTED

N = 200


@pytest.fixture(scope="module")
def rotated(onnx_wine, tmp_path_factory):
    """A second classifier that disagrees with the first where it matters: trained on the
    same data with every label moved to the next class."""
    y = (np.asarray(onnx_wine.y_train).astype(int) + 1) % 3
    pipeline = fit_logistic(onnx_wine.X_train, y)
    path = tmp_path_factory.mktemp("rotated") / "rotated.onnx"
    export_onnx(pipeline, len(onnx_wine.feature_names), path)
    return pipeline, path


def descriptor(onnx_wine, path, version: str, **fields) -> ModelDescriptor:
    return ModelDescriptor(name=f"wine-{version}", version=version, dataType=DEMO_DATA_TYPE,
                           modeltype=ModelDescriptor.ONNX, data=path.read_bytes(),
                           inputFeatures=list(onnx_wine.feature_names),
                           classLabels=list(onnx_wine.class_labels), publishedMs=1_000, **fields)


def canary(onnx_wine, path, version: str, share: float) -> bytes:
    return descriptor(onnx_wine, path, version, rollout=Rollout(
        action=Rollout.DEPLOY, mode=Rollout.CANARY, share=share)).SerializeToString()


def shadow(onnx_wine, path, version: str) -> bytes:
    return descriptor(onnx_wine, path, version, rollout=Rollout(
        action=Rollout.DEPLOY, mode=Rollout.SHADOW)).SerializeToString()


def control(action) -> bytes:
    return ModelDescriptor(dataType=DEMO_DATA_TYPE, publishedMs=2_000,
                           rollout=Rollout(action=action)).SerializeToString()


class Served:
    """What the join emitted: results by record id, shadow results by id, dead letters."""

    def __init__(self):
        self.results: dict[str, ServingResult] = {}
        self.shadow: dict[str, ServingResult] = {}
        self.letters: list[DeadLetter] = []

    def take(self, outputs) -> "Served":
        for output in outputs:
            if isinstance(output, tuple) and output[0] is DEAD_LETTERS:
                self.letters.append(DeadLetter.FromString(output[1]))
            elif isinstance(output, tuple) and output[0] is SHADOW_RESULTS:
                result = ServingResult.FromString(output[1])
                self.shadow[result.recordId] = result
            else:
                for payload in output[0]:
                    result = ServingResult.FromString(payload)
                    self.results[result.recordId] = result
        return self


def joined(context) -> KeyedServing:
    join = KeyedServing(Settings(state_topic="", stats_interval_ms=0), {})
    join.open(context)
    return join


def send_model(join, context, raw: bytes) -> Served:
    return Served().take(join.process_element2(FlinkRow(0, 0, raw), context))


def records(onnx_wine, n: int = N, prefix: str = "r"):
    X = np.vstack([onnx_wine.X_train, onnx_wine.X_test])
    X = X[np.random.default_rng(7).integers(0, len(X), n)]
    ids = [f"{prefix}{i}" for i in range(n)]
    raws = [encode_record(Row(DEMO_DATA_TYPE, onnx_wine.feature_names, tuple(map(float, x)), i))
            for i, x in zip(ids, X)]
    return ids, X, raws


def serve(join, context, raws) -> Served:
    served = Served()
    for start in range(0, len(raws), 50):
        chunk = raws[start:start + 50]
        served.take(join.process_element1(
            FlinkRow(DEMO_DATA_TYPE, 0, list(range(len(chunk))), chunk), context))
    return served


def labels(pipeline, X) -> list[str]:
    return [str(label) for label in pipeline.predict(X)]


def stats_of(context) -> ModelStats:
    return ModelStats.FromString(context.state[MODEL_STATS][DEMO_DATA_TYPE])


def entries_of(context) -> dict[str, RepositoryEntry]:
    return {RepositoryEntry.FromString(raw).version: RepositoryEntry.FromString(raw)
            for raw in context.state[REPOSITORY_ENTRIES].values()}


def test_a_canary_answers_its_share_by_record_id_and_is_compared_on_it(onnx_wine, rotated):
    pipeline, path = rotated
    context = KeyedContext()
    join = joined(context)
    send_model(join, context, descriptor(onnx_wine, onnx_wine.path, "1").SerializeToString())
    assert send_model(join, context, canary(onnx_wine, path, "2", 0.25)).letters == []
    ids, X, raws = records(onnx_wine)
    served = serve(join, context, raws)

    salt = Candidacy.of(context.state[KEYED_CANDIDATE]).model_id
    chosen = [i for i, record_id in enumerate(ids) if goes_to_candidate(record_id, 0.25, salt)]
    assert 25 <= len(chosen) <= 75   # a quarter of 200, give or take
    primary_labels, candidate_labels = labels(onnx_wine.pipeline, X), labels(pipeline, X)
    for i, record_id in enumerate(ids):
        result = served.results[record_id]
        if i in chosen:
            assert (result.modelVersion, result.label) == ("2", candidate_labels[i])
        else:
            assert (result.modelVersion, result.label) == ("1", primary_labels[i])
    assert len(served.results) == N and served.shadow == {} and served.letters == []

    candidate = stats_of(context).candidate
    agreed = sum(primary_labels[i] == candidate_labels[i] for i in chosen)
    assert agreed < len(chosen)   # the rotated model disagrees somewhere
    assert (candidate.modelVersion, candidate.mode, candidate.share) == ("2", Rollout.CANARY, 0.25)
    assert (candidate.records, candidate.compared, candidate.agreed, candidate.failures,
            candidate.primaryRecords) == (len(chosen), len(chosen), agreed, 0, N - len(chosen))
    assert stats_of(context).usage == N - len(chosen)   # the primary's own usage
    assert context.gauge("candidate_records") == len(chosen)
    assert context.gauge("candidate_agreement_milli") == agreed * 1000 // len(chosen)

    # a restored join sends every record the same way again
    restored = KeyedContext(copy.deepcopy(context.state))
    again = serve(joined(restored), restored, raws)
    assert {r: (x.modelVersion, x.label) for r, x in again.results.items()} == \
        {r: (x.modelVersion, x.label) for r, x in served.results.items()}
    assert stats_of(restored).candidate.records == 2 * len(chosen)


def primary_and_shadow(onnx_wine, candidate_path):
    """A keyed join serving the first model as v1 with the model at ``candidate_path`` as its
    shadow v2."""
    context = KeyedContext()
    join = joined(context)
    send_model(join, context, descriptor(onnx_wine, onnx_wine.path, "1").SerializeToString())
    send_model(join, context, shadow(onnx_wine, candidate_path, "2"))
    return context, join


def test_a_shadow_scores_every_record_and_only_the_primary_answers(onnx_wine, rotated):
    pipeline, path = rotated
    context, join = primary_and_shadow(onnx_wine, path)
    ids, X, raws = records(onnx_wine)
    served = serve(join, context, raws)

    primary_labels, candidate_labels = labels(onnx_wine.pipeline, X), labels(pipeline, X)
    assert {r: (x.modelVersion, x.label) for r, x in served.results.items()} == \
        {r: ("1", label) for r, label in zip(ids, primary_labels)}
    assert {r: (x.modelVersion, x.label) for r, x in served.shadow.items()} == \
        {r: ("2", label) for r, label in zip(ids, candidate_labels)}
    candidate = stats_of(context).candidate
    agreed = sum(a == b for a, b in zip(primary_labels, candidate_labels))
    assert (candidate.mode, candidate.records, candidate.compared, candidate.agreed,
            candidate.primaryRecords) == (Rollout.SHADOW, N, N, agreed, N)
    # score difference: the candidate's probability of the primary's label minus the primary's
    p1, p2 = onnx_wine.pipeline.predict_proba(X), pipeline.predict_proba(X)
    picked = onnx_wine.pipeline.predict(X).astype(int)
    expected = float(np.mean(p2[np.arange(N), picked] - p1[np.arange(N), picked]))
    assert candidate.differenceSum / candidate.compared == pytest.approx(expected, abs=1e-4)
    assert stats_of(context).usage == N


def test_promotion_makes_the_candidate_serve_and_the_repository_says_so(onnx_wine, rotated):
    pipeline, path = rotated
    context = KeyedContext()
    join = joined(context)
    send_model(join, context, descriptor(onnx_wine, onnx_wine.path, "1").SerializeToString())
    send_model(join, context, canary(onnx_wine, path, "2", 0.5))
    ids, X, raws = records(onnx_wine, 40)
    serve(join, context, raws)
    assert send_model(join, context, control(Rollout.PROMOTE)).letters == []

    served = serve(join, context, raws)
    assert {x.modelVersion for x in served.results.values()} == {"2"}
    assert [served.results[r].label for r in ids] == labels(pipeline, X)
    stats = stats_of(context)
    assert (stats.modelVersion, stats.usage, stats.HasField("candidate")) == ("2", 40, False)
    assert context.state.get(KEYED_CANDIDATE) is None
    assert context.gauge("candidate_records") == 0

    entries = entries_of(context)
    [first] = entries["1"].deployments
    assert (first.role, first.retiredBy) == ("", "2") and first.retiredMs > 0
    as_canary, as_model = entries["2"].deployments
    assert (as_canary.outcome, as_canary.role, as_canary.retiredBy) == (ACCEPTED, "canary 50%",
                                                                         "promoted")
    assert (as_model.outcome, as_model.role, as_model.retiredMs) == (ACCEPTED, "", 0)
    assert as_model.deployedMs >= as_canary.retiredMs - 1000


def test_abort_leaves_the_primary_alone_and_retires_the_candidate(onnx_wine, rotated):
    context, join = primary_and_shadow(onnx_wine, rotated[1])
    ids, _, raws = records(onnx_wine, 20)
    serve(join, context, raws)
    assert send_model(join, context, control(Rollout.ABORT)).letters == []
    served = serve(join, context, raws)
    assert {x.modelVersion for x in served.results.values()} == {"1"} and served.shadow == {}
    assert not stats_of(context).HasField("candidate")
    [deployment] = entries_of(context)["2"].deployments
    assert (deployment.role, deployment.retiredBy) == ("shadow", "aborted")
    assert entries_of(context)["1"].deployments[0].retiredMs == 0   # still serving


def test_a_candidate_that_fails_records_leaves_them_to_the_primary(onnx_wine):
    context = KeyedContext()
    join = joined(context)
    send_model(join, context, descriptor(onnx_wine, onnx_wine.path, "1").SerializeToString())
    broken = descriptor(onnx_wine, onnx_wine.path, "2", rollout=Rollout(
        action=Rollout.DEPLOY, mode=Rollout.CANARY, share=1.0))
    broken.inputFeatures[:] = [f"missing_{i}" for i in range(len(onnx_wine.feature_names))]
    send_model(join, context, broken.SerializeToString())
    ids, X, raws = records(onnx_wine, 30)
    served = serve(join, context, raws)
    assert [served.results[r].label for r in ids] == labels(onnx_wine.pipeline, X)
    assert {x.modelVersion for x in served.results.values()} == {"1"} and served.letters == []
    candidate = stats_of(context).candidate
    assert (candidate.records, candidate.failures, candidate.primaryRecords) == (0, 30, 30)
    assert context.gauge("candidate_failures") == 30


@pytest.mark.parametrize("raw, reason", [
    (lambda w, p: control(Rollout.PROMOTE), "has no candidate model to promote"),
    (lambda w, p: control(Rollout.ABORT), "has no candidate model to abort"),
    (lambda w, p: canary(w, p, "2", 1.5), "a canary's share lies in (0, 1], not 1.5"),
    (lambda w, p: canary(w, p, "2", 0.0), "a canary's share lies in (0, 1], not 0.0"),
])
def test_what_cannot_be_rolled_out_is_a_dead_letter_and_the_model_serves_on(onnx_wine, rotated,
                                                                           raw, reason):
    _, path = rotated
    context = KeyedContext()
    join = joined(context)
    send_model(join, context, descriptor(onnx_wine, onnx_wine.path, "1").SerializeToString())
    [letter] = send_model(join, context, raw(onnx_wine, path)).letters
    assert letter.kind == DeadLetter.BAD_MODEL and reason in letter.reason, letter.reason
    assert context.gauge("dead_letters_models") == 1
    ids, X, raws = records(onnx_wine, 10)
    served = serve(join, context, raws)
    assert [served.results[r].modelVersion for r in ids] == ["1"] * 10
    assert context.state.get(KEYED_CANDIDATE) is None
