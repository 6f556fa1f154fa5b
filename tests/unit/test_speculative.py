"""Speculative execution without Flink: the deciders, the set's validation, and a batch scored
by real models at once, one of them made slow (a real runtime behind a delay)."""
from __future__ import annotations

import dataclasses
import threading
import time

import pytest

from modelserving.demo.training import DEMO_DATA_TYPE, demo_dataset, descriptor_for
from modelserving.kafka.clients import Row, encode_record
from protos import DeadLetter, ModelDescriptor, ModelType, ServingResult, SpeculativeSet
from udfs.errors import ModelRejected
from udfs.runtimes.base import Prediction
from udfs.serving import BAD_RECORD, SCORED, ModelServer
from udfs.speculative import (CONFIDENCE, CONSENSUS, PREFERRED, Candidate, SetChange, decide,
                              member_key)


def candidate(rank, label, probabilities=(), value=0.0):
    return Candidate(rank, f"m{rank}", Prediction(value, label, tuple(probabilities)))


@pytest.mark.parametrize("decider", [PREFERRED, CONSENSUS, CONFIDENCE])
def test_no_answer_decides_nothing(decider):
    assert decide(decider, []) is None


def test_preferred_takes_the_first_listed_that_answered():
    assert decide(PREFERRED, [candidate(1, "b"), candidate(2, "c")]).model_id == "m1"


def test_consensus_takes_the_majority_and_the_earliest_listed_of_it():
    votes = [candidate(0, "a"), candidate(1, "b"), candidate(2, "b"), candidate(3, "a"),
             candidate(4, "b")]
    assert decide(CONSENSUS, votes).model_id == "m1"


def test_consensus_tie_goes_to_the_earlier_listed():
    assert decide(CONSENSUS, [candidate(0, "b"), candidate(1, "a"), candidate(2, "a"),
                              candidate(3, "b")]).model_id == "m0"
    assert decide(CONSENSUS, [candidate(1, "x"), candidate(2, "y")]).model_id == "m1"


def test_consensus_of_regressions_votes_on_the_value():
    votes = [candidate(0, "", value=1.0), candidate(1, "", value=2.0000001),
             candidate(2, "", value=2.0)]
    assert decide(CONSENSUS, votes).model_id == "m1"


def test_confidence_takes_the_highest_probability_ties_to_the_earlier():
    votes = [candidate(0, "a", (0.6, 0.4)), candidate(1, "b", (0.1, 0.9)),
             candidate(2, "c", (0.9, 0.1))]
    assert decide(CONFIDENCE, votes).model_id == "m1"
    nan_first = [candidate(0, "a", (float("nan"), 0.2)), candidate(1, "b", (0.3, 0.7))]
    assert decide(CONFIDENCE, nan_first).model_id == "m1"
    assert decide(CONFIDENCE, [candidate(0, "r", value=3.0), candidate(1, "s", value=4.0)]
                  ).model_id == "m0"   # no probabilities anywhere: the preferred order


def speculative_descriptor(models, budget_ms=100, decider=PREFERRED, withdraw=False,
                           data_type=DEMO_DATA_TYPE) -> bytes:
    descriptor = ModelDescriptor(name="set", dataType=data_type, withdraw=withdraw)
    descriptor.speculative.CopyFrom(SpeculativeSet(models=models, budgetMs=budget_ms,
                                                   decider=decider))
    return descriptor.SerializeToString()


@pytest.fixture()
def server(trained_models):
    model_dir = next(m.path for m in trained_models.values() if not m.inline).parent
    server = ModelServer(model_dirs=[model_dir], max_model_bytes=5_000_000,
                         data_topic="mdata", models_topic="models", subtask=0,
                         speculative_max_budget_ms=5000)
    yield server
    server.close()


def test_a_speculative_descriptor_is_validated(server):
    change = server.build(speculative_descriptor(["a", "b"], 50, CONSENSUS))
    assert isinstance(change, SetChange) and change.plan.models == ("a", "b")
    assert change.plan.budget_ms == 50 and change.plan.decider_name == "CONSENSUS"
    assert server.build(speculative_descriptor([], 50)).plan is None
    assert server.build(speculative_descriptor(["a"], 50, withdraw=True)).plan is None
    for models, budget, reason in [(["a", "a"], 50, "twice"), (["a", ""], 50, "model ids"),
                                   (["a"], 0, "budgetMs"), (["a"], 5001, "budgetMs")]:
        with pytest.raises(ModelRejected, match=reason):
            server.build(speculative_descriptor(models, budget))


class Delayed:
    """A real runtime that answers ``delay_s`` late: a model slower than the budget."""

    def __init__(self, runtime, delay_s):
        self.runtime, self.delay_s = runtime, delay_s
        self.input_names = runtime.input_names
        self.closed = threading.Event()

    def score(self, batch):
        time.sleep(self.delay_s)
        return self.runtime.score(batch)

    def close(self):
        self.closed.set()
        self.runtime.close()


def member(server, model, model_id, delay_s=0.0):
    descriptor = descriptor_for(model)
    descriptor.modelId = model_id
    built = server.build(descriptor.SerializeToString())
    if delay_s:
        built = dataclasses.replace(built, runtime=Delayed(built.runtime, delay_s))
    server.install(member_key(DEMO_DATA_TYPE, model_id), built)
    return built


@pytest.fixture(scope="module")
def raws():
    names, X, y, labels = demo_dataset()
    return [encode_record(Row(DEMO_DATA_TYPE, tuple(names), tuple(map(float, X[i])), f"r{i}"))
            for i in range(12)]


def plan(server, models, budget_ms, decider=PREFERRED):
    return server.build(speculative_descriptor(models, budget_ms, decider)).plan


def test_every_model_scores_and_the_preferred_answer_wins(server, trained_models, raws):
    onnx = member(server, trained_models[ModelType.ONNX], "onnx")
    pmml = member(server, trained_models[ModelType.PMML], "pmml")
    outcomes, tally = server.serve_speculative(
        raws, plan(server, ["pmml", "onnx"], 5000), [("pmml", pmml, ""), ("onnx", onnx, "")])
    assert [o.kind for o in outcomes] == [SCORED] * len(raws)
    direct = server.serve(raws, pmml)
    for outcome, alone in zip(outcomes, direct):
        result, expected = ServingResult.FromString(outcome.payload), ServingResult.FromString(alone.payload)
        assert (result.modelId, result.modelName) == ("pmml", pmml.info.name)
        assert result.label == expected.label and result.recordId == expected.recordId
        assert list(result.probabilities) == pytest.approx(list(expected.probabilities))
        assert list(result.speculative.answered) == ["pmml", "onnx"]
        assert not result.speculative.timedOut and result.speculative.budgetMs == 5000
    assert [(t.modelId, t.answered, t.wins, t.timeouts) for t in tally] == [
        ("pmml", len(raws), len(raws), 0), ("onnx", len(raws), 0, 0)]


def test_a_slow_model_is_not_waited_for_beyond_the_budget(server, trained_models, raws):
    fast = member(server, trained_models[ModelType.ONNX], "fast")
    slow = member(server, trained_models[ModelType.TENSORFLOW], "slow", delay_s=6.0)
    started = time.perf_counter()
    outcomes, tally = server.serve_speculative(   # a budget a busy machine's ONNX call meets
        raws, plan(server, ["slow", "fast"], 1000), [("slow", slow, ""), ("fast", fast, "")])
    took = time.perf_counter() - started
    assert took < 4.0, f"waited {took:.2f} s for a model 6 s late with a 1 s budget"
    results = [ServingResult.FromString(o.payload) for o in outcomes]
    assert {r.modelId for r in results} == {"fast"}
    assert all(list(r.speculative.timedOut) == ["slow"] for r in results)
    assert [(t.modelId, t.wins, t.timeouts) for t in tally] == [("slow", 0, len(raws)),
                                                                ("fast", len(raws), 0)]
    # the slow model is still busy with that batch: the next one does not queue behind it
    outcomes, tally = server.serve_speculative(
        raws[:2], plan(server, ["slow", "fast"], 1000), [("slow", slow, ""), ("fast", fast, "")])
    assert tally[0].timeouts == 2 and tally[1].wins == 2
    # replacing the slow model closes it only once it has finished its batch
    server.install(member_key(DEMO_DATA_TYPE, "slow"), None)
    assert not slow.runtime.closed.is_set()
    assert slow.runtime.closed.wait(20)


def test_with_a_budget_above_its_latency_the_slow_preferred_model_wins(server, trained_models, raws):
    fast = member(server, trained_models[ModelType.ONNX], "fast")
    slow = member(server, trained_models[ModelType.TENSORFLOW], "slow", delay_s=0.3)
    outcomes, tally = server.serve_speculative(
        raws, plan(server, ["slow", "fast"], 3000), [("slow", slow, ""), ("fast", fast, "")])
    assert {ServingResult.FromString(o.payload).modelId for o in outcomes} == {"slow"}
    assert tally[0].wins == len(raws) and tally[0].totalMillis >= 300 * len(raws)


def test_no_answer_in_time_dead_letters_the_records_with_each_models_reason(server, trained_models,
                                                                             raws):
    slow = member(server, trained_models[ModelType.ONNX], "slow", delay_s=1.0)
    outcomes, tally = server.serve_speculative(
        raws[:3] + [b"\xff not a record"], plan(server, ["slow", "absent"], 50),
        [("slow", slow, ""), ("absent", None, "no model 'absent' is installed")])
    assert [o.kind for o in outcomes] == [BAD_RECORD] * 4
    letters = [DeadLetter.FromString(o.payload) for o in outcomes]
    assert [letter.kind for letter in letters] == [DeadLetter.MODEL_UNAVAILABLE] * 3 + [DeadLetter.BAD_RECORD]
    assert "slow: no answer within 50 ms" in letters[0].reason
    assert "absent: no model 'absent' is installed" in letters[0].reason
    assert [(t.timeouts, t.failures) for t in tally] == [(3, 0), (0, 3)]


def test_consensus_over_three_real_models(server, trained_models, raws):
    models = [member(server, trained_models[t], name) for t, name in
              [(ModelType.ONNX, "onnx"), (ModelType.PMML, "pmml"), (ModelType.TENSORFLOW, "tf")]]
    outcomes, tally = server.serve_speculative(
        raws, plan(server, ["onnx", "pmml", "tf"], 5000, CONSENSUS),
        [(m.info.declared_id, m, "") for m in models])
    alone = {m.info.declared_id: [ServingResult.FromString(o.payload).label
                                  for o in server.serve(raws, m)] for m in models}
    for index, outcome in enumerate(outcomes):
        result = ServingResult.FromString(outcome.payload)
        labels = [alone[name][index] for name in ("onnx", "pmml", "tf")]
        majority = max(labels, key=lambda label: (labels.count(label), -labels.index(label)))
        assert result.label == majority
        assert result.modelId == ("onnx", "pmml", "tf")[labels.index(majority)]
    assert sum(t.wins for t in tally) == len(raws)
