"""The model lifecycle library (udfs.lifecycle): digests, the validation gate, drift, canary and
shadow routing, the repository. Real models: the demo's ONNX classifier and an ONNX regressor."""
from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from protos import DataRecord, ModelDescriptor, ModelType, Reference, RepositoryEntry, Validation
from udfs.errors import ModelRejected, ValidationFailed
from udfs.lifecycle import digest, drift, repository, routing, validation
from udfs.lifecycle.repository import ACCEPTED, REFUSED, VALIDATION_FAILED, Repository, RollbackError
from udfs.models import load_request
from udfs.runtimes import load_model
from udfs.runtimes.base import FeatureBatch, Prediction

ROOT = Path(__file__).resolve().parents[2]
DATA_TYPE = "wine-cultivar"


# -- models -------------------------------------------------------------------------------------

def classifier_descriptor(wine, **fields) -> ModelDescriptor:
    return ModelDescriptor(name="logreg", version="1", dataType=DATA_TYPE, modeltype=ModelType.ONNX,
                           data=wine.path.read_bytes(), inputFeatures=wine.feature_names,
                           classLabels=wine.class_labels, **fields)


@pytest.fixture(scope="module")
def classifier(onnx_wine):
    runtime = load_model(load_request(classifier_descriptor(onnx_wine), [], 1 << 30))
    yield runtime
    runtime.close()


@pytest.fixture(scope="module")
def regressor(onnx_wine):
    """A LinearRegression of the class index, as ONNX (float32), and the fitted estimator."""
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.linear_model import LinearRegression

    estimator = LinearRegression().fit(onnx_wine.X_train, onnx_wine.y_train.astype(float))
    model = convert_sklearn(estimator, initial_types=[("x", FloatTensorType([None, 13]))],
                            target_opset=17)
    descriptor = ModelDescriptor(name="linreg", dataType=DATA_TYPE, modeltype=ModelType.ONNX,
                                 data=model.SerializeToString(),
                                 inputFeatures=onnx_wine.feature_names)
    runtime = load_model(load_request(descriptor, [], 1 << 30))
    yield estimator, runtime
    runtime.close()


def rows_of(wine, X, *, labels=None, scores=None, prefix="r") -> list[validation.FileRow]:
    return [validation.FileRow(f"{prefix}-{i}", dict(zip(wine.feature_names, map(float, x))),
                               expected_score=None if scores is None else float(scores[i]),
                               expected_label=None if labels is None else str(labels[i]))
            for i, x in enumerate(X)]


# -- digest -------------------------------------------------------------------------------------

def saved_model_like(directory: Path) -> Path:
    (directory / "variables").mkdir(parents=True)
    (directory / "assets").mkdir()
    (directory / "saved_model.pb").write_bytes(b"graph-v1")
    (directory / "variables" / "variables.index").write_bytes(b"index")
    (directory / "variables" / "variables.data-00000-of-00001").write_bytes(b"\x00\x01weights")
    (directory / "assets" / "vocab.txt").write_text("a\nb\n")
    return directory


def by_location(path: Path) -> ModelDescriptor:
    return ModelDescriptor(name="saved", version="3", dataType=DATA_TYPE,
                           modeltype=ModelType.TENSORFLOWSAVED, location=str(path))


def test_the_digest_of_inline_bytes_and_of_the_same_file_by_location_agree(tmp_path):
    (tmp_path / "m.onnx").write_bytes(b"onnx bytes")
    inline = ModelDescriptor(dataType="t", modeltype=ModelType.ONNX, data=b"onnx bytes")
    located = ModelDescriptor(dataType="t", modeltype=ModelType.ONNX, location="m.onnx")
    expected = hashlib.sha256(b"onnx bytes").hexdigest()
    assert digest.model_digest(inline) == expected
    assert digest.model_digest(located, [tmp_path]) == expected
    external = ModelDescriptor(dataType="t", modeltype=ModelType.EXTERNAL)
    external.server.url = "http://127.0.0.1:8080"
    assert digest.model_digest(external) == ""


def test_a_directory_digest_is_its_sorted_files_paths_sizes_and_contents(tmp_path):
    model = saved_model_like(tmp_path / "models" / "saved")
    expected = hashlib.sha256()
    for relative in ("assets/vocab.txt", "saved_model.pb", "variables/variables.data-00000-of-00001",
                     "variables/variables.index"):
        content = (model / relative).read_bytes()
        expected.update(f"{relative}\0{len(content)}\0".encode() + content)
    found = digest.model_digest(by_location(model), [tmp_path / "models"])
    assert found == expected.hexdigest()
    # the same files written in another order elsewhere: the same digest
    other = tmp_path / "other" / "saved"
    for relative in reversed(("assets/vocab.txt", "saved_model.pb", "variables/variables.index",
                              "variables/variables.data-00000-of-00001")):
        (other / relative).parent.mkdir(parents=True, exist_ok=True)
        (other / relative).write_bytes((model / relative).read_bytes())
    assert digest.model_digest(by_location(other), [tmp_path / "other"]) == found


def test_the_digest_changes_when_a_file_of_the_directory_changes_and_rollback_is_refused(tmp_path):
    models = tmp_path / "models"
    model = saved_model_like(models / "saved")
    descriptor = by_location(model)
    first = digest.model_digest(descriptor, [models])
    assert digest.location_changed(descriptor, first, [models]) is None

    (model / "variables" / "variables.index").write_bytes(b"indeX")      # same size, one byte
    changed = digest.model_digest(descriptor, [models])
    assert changed != first
    reason = digest.location_changed(descriptor, first, [models])
    assert reason == (f"the files at location {str(model)!r} changed since the model was first "
                      f"published: their SHA-256 is now {changed}, it was {first}")
    (model / "variables" / "variables.index").write_bytes(b"index")
    assert digest.model_digest(descriptor, [models]) == first
    (model / "assets" / "vocab.txt").rename(model / "assets" / "words.txt")   # renamed only
    assert digest.model_digest(descriptor, [models]) != first


def test_the_digest_keeps_to_the_model_directories(tmp_path):
    models = tmp_path / "models"
    model = saved_model_like(models / "saved")
    outside = tmp_path / "secret.txt"
    outside.write_text("not a model")
    with pytest.raises(ModelRejected, match="outside the model directories"):
        digest.model_digest(by_location(outside), [models])
    (model / "assets" / "link.txt").symlink_to(outside)
    with pytest.raises(ModelRejected, match="links to .* outside the model directories"):
        digest.model_digest(by_location(model), [models])
    (model / "assets" / "link.txt").unlink()
    os.mkfifo(model / "assets" / "pipe")      # reading it would wait forever
    with pytest.raises(ModelRejected, match="not a regular file"):
        digest.model_digest(by_location(model), [models])


# -- validation ---------------------------------------------------------------------------------

def test_a_classifier_passes_its_holdout_with_the_accuracy_scikit_learn_measures(onnx_wine, classifier):
    rows = rows_of(onnx_wine, onnx_wine.X_test, labels=onnx_wine.y_test)
    gate = validation.validation_from_rows(rows, DATA_TYPE, min_accuracy=0.9)
    outcome = validation.validate(gate, classifier, ModelType.ONNX)
    hits = int(np.sum(onnx_wine.pipeline.predict(onnx_wine.X_test) == onnx_wine.y_test))
    n = len(rows)
    assert outcome.passed and outcome.rows == n == 45 and outcome.label_rows == n
    assert outcome.mismatches == n - hits and outcome.accuracy == pytest.approx(hits / n)
    assert outcome.reason == (f"validation passed on {n} rows: accuracy {hits / n:.4f} >= minimum "
                              f"0.9 ({hits}/{n} labels)")
    assert len(outcome.predictions) == n and all(p.label in "012" for p in outcome.predictions)


def test_a_classifier_below_the_minimum_accuracy_fails_with_its_figures(onnx_wine, classifier):
    predicted = onnx_wine.pipeline.predict(onnx_wine.X_test)
    expected = onnx_wine.y_test.copy()
    right = np.flatnonzero(predicted == expected)[:5]
    expected[right] = (expected[right] + 1) % 3            # five labels the model cannot match
    rows = rows_of(onnx_wine, onnx_wine.X_test, labels=expected)
    gate = validation.validation_from_rows(rows, DATA_TYPE, min_accuracy=0.9)
    outcome = validation.validate(gate, classifier, ModelType.ONNX)
    n, hits = len(rows), int(np.sum(predicted == expected))
    assert hits <= n - 5 and not outcome.passed
    first = int(np.flatnonzero(predicted != expected)[0])
    assert outcome.reason == (
        f"validation failed on {n} rows: accuracy {hits / n:.4f} < minimum 0.9 ({hits}/{n} labels) "
        f"(first: row {first} (id 'r-{first}'): label '{predicted[first]}', expected "
        f"'{expected[first]}')")
    figures = outcome.figures()
    assert (figures.passed, figures.rows, figures.labelRows, figures.mismatches) == \
        (False, n, n, n - hits)
    assert figures.accuracy == pytest.approx(hits / n) and figures.minAccuracy == 0.9


def test_without_a_minimum_accuracy_every_expected_label_must_match(onnx_wine, classifier):
    X = onnx_wine.X_test[:10]
    labels = onnx_wine.pipeline.predict(X)                 # what the model answers
    passing = validation.validation_from_rows(rows_of(onnx_wine, X, labels=labels), DATA_TYPE)
    assert validation.validate(passing, classifier, ModelType.ONNX).passed
    labels[3] = (labels[3] + 1) % 3
    failing = validation.validation_from_rows(rows_of(onnx_wine, X, labels=labels), DATA_TYPE)
    outcome = validation.validate(failing, classifier, ModelType.ONNX)
    assert not outcome.passed and outcome.mismatches == 1
    assert "1 label mismatch(es) in 10 labelled rows (first: row 3 (id 'r-3')" in outcome.reason


def test_a_regressor_within_and_beyond_its_tolerance(onnx_wine, regressor):
    estimator, runtime = regressor
    X = onnx_wine.X_test[:20]
    scores = estimator.predict(X)                           # float64; the ONNX model is float32
    gate = validation.validation_from_rows(rows_of(onnx_wine, X, scores=scores), DATA_TYPE,
                                           tolerance=1e-3)
    outcome = validation.validate(gate, runtime, ModelType.ONNX)
    assert outcome.passed and outcome.score_rows == 20 and outcome.max_abs_error < 1e-3
    assert outcome.reason.startswith(f"validation passed on 20 rows: max |score error| "
                                     f"{outcome.max_abs_error:.6g} <= tolerance 0.001")

    scores[7] += 0.5
    gate = validation.validation_from_rows(rows_of(onnx_wine, X, scores=scores), DATA_TYPE,
                                           tolerance=1e-3)
    outcome = validation.validate(gate, runtime, ModelType.ONNX)
    assert not outcome.passed
    assert outcome.max_abs_error == pytest.approx(0.5, abs=1e-3)
    got = outcome.predictions[7].value
    assert outcome.reason == (f"validation failed on 20 rows: max |score error| "
                              f"{outcome.max_abs_error:.6g} > tolerance 0.001 (row 7 (id 'r-7'): "
                              f"score {got:.6g}, expected {scores[7]:.6g})")
    # unset tolerance: the default, float32 rounding, which this float32 model misses
    strict = validation.validation_from_rows(rows_of(onnx_wine, X, scores=estimator.predict(X)),
                                             DATA_TYPE)
    outcome = validation.validate(strict, runtime, ModelType.ONNX)
    assert outcome.tolerance == validation.DEFAULT_TOLERANCE
    assert outcome.passed == (outcome.max_abs_error <= 1e-6)


def test_a_row_the_model_cannot_read_fails_the_gate(onnx_wine, classifier):
    rows = rows_of(onnx_wine, onnx_wine.X_test[:3], labels=onnx_wine.y_test[:3])
    del rows[1].features["alcohol"]
    outcome = validation.validate(validation.validation_from_rows(rows, DATA_TYPE), classifier,
                                  ModelType.ONNX)
    assert not outcome.passed and outcome.unscored == 1 and outcome.label_rows == 2
    assert "1 row(s) could not be scored (first: row 1 (id 'r-1'): wrong number of features" \
        in outcome.reason


def test_the_gate_refuses_what_cannot_be_a_validation(classifier):
    empty = validation.validate(Validation(), classifier, ModelType.ONNX)
    assert not empty.passed and empty.reason == "validation failed: it has no rows"
    bad = Validation(minAccuracy=1.5)
    bad.rows.add(record=DataRecord(dataType="t", features={"x": 1.0}).SerializeToString())
    assert "minAccuracy 1.5 lies outside [0, 1]" in validation.validate(bad, classifier,
                                                                        ModelType.ONNX).reason


def test_a_descriptor_without_validation_has_no_gate_and_a_failed_one_is_refused(onnx_wine,
                                                                                 classifier):
    descriptor = classifier_descriptor(onnx_wine)
    assert validation.validate_descriptor(descriptor, classifier) is None
    validation.raise_if_failed(None, descriptor)
    labels = (onnx_wine.pipeline.predict(onnx_wine.X_test[:4]) + 1) % 3
    descriptor.validation.CopyFrom(validation.validation_from_rows(
        rows_of(onnx_wine, onnx_wine.X_test[:4], labels=labels), DATA_TYPE, min_accuracy=0.5))
    outcome = validation.check_descriptor(descriptor, [], 1 << 30)   # loads it as the job does
    assert not outcome.passed and outcome.accuracy == 0.0
    with pytest.raises(ValidationFailed) as refused:
        validation.raise_if_failed(outcome, descriptor)
    assert isinstance(refused.value, ModelRejected) and refused.value.outcome is outcome
    assert str(refused.value) == (f"{outcome.reason} (model 'logreg' version '1', data type "
                                  f"'{DATA_TYPE}')")


def test_validation_files_in_csv_and_json_lines(tmp_path):
    csv_file = tmp_path / "rows.csv"
    csv_file.write_text("id;a;b;label;score\nx1;1.5;2;yes;0.25\n;3;4;;\n")
    rows = validation.read_rows(csv_file)
    assert rows == [validation.FileRow("x1", {"a": 1.5, "b": 2.0}, 0.25, "yes"),
                    validation.FileRow("rows-2", {"a": 3.0, "b": 4.0}, None, None)]
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text('{"id": "x1", "features": {"a": 1.5, "b": 2}, "label": "yes", "score": 0.25}\n'
                     '\n{"features": {"a": 3, "b": 4}}\n')
    assert validation.read_rows(jsonl) == [rows[0], validation.FileRow("rows-3", rows[1].features)]
    gate = validation.validation_from_file(jsonl, "t", tolerance=0.5)
    assert [r.HasField("expectedScore") for r in gate.rows] == [True, False]
    assert gate.tolerance == 0.5 and not gate.HasField("minAccuracy")
    record = DataRecord.FromString(gate.rows[0].record)
    assert (record.dataType, record.id, dict(record.features)) == ("t", "x1", {"a": 1.5, "b": 2.0})
    (tmp_path / "bad.csv").write_text("a,b\n1,two\n")
    with pytest.raises(ValueError, match="bad.csv, line 2"):
        validation.read_rows(tmp_path / "bad.csv")
    with pytest.raises(ValueError, match="3 validation rows, over 2"):
        validation.validation_from_rows(rows + rows[:1], "t", max_rows=2)


# -- drift --------------------------------------------------------------------------------------

def test_psi_by_hand():
    assert drift.psi([0.5, 0.5], [0.5, 0.5]) == 0.0
    assert drift.psi([0.5, 0.5], [0.25, 0.75]) == pytest.approx(
        (0.25 - 0.5) * math.log(0.25 / 0.5) + (0.75 - 0.5) * math.log(0.75 / 0.5))
    assert drift.psi([0.5, 0.5], [0.25, 0.75]) == pytest.approx(0.2746530722)
    # an empty bin counts as EPSILON (1e-4): large, finite
    assert drift.psi([0.5, 0.5], [0.0, 1.0]) == pytest.approx(
        (1e-4 - 0.5) * math.log(1e-4 / 0.5) + 0.5 * math.log(2))
    assert drift.psi([0.5, 0.5], [0.0, 1.0]) == pytest.approx(4.604318, abs=1e-6)


def test_bins_and_quantile_histograms():
    assert drift.bin_counts([1.0, 2.0], [0.5, 1.0, 1.5, 2.0, 3.0, math.nan]).tolist() == [1, 2, 2]
    histogram = drift.histogram("x", np.arange(100.0), bins=4)
    assert list(histogram.edges) == [24.75, 49.5, 74.25]
    assert list(histogram.proportions) == [0.25] * 4
    constant = drift.histogram("c", [3.0] * 10)
    assert list(constant.edges) == [3.0] and list(constant.proportions) == [0.0, 1.0]


def test_the_monitor_counts_into_the_reference_bins_and_flags_above_the_threshold():
    reference = Reference(features=[Reference.Histogram(name="x", edges=[0.0],
                                                        proportions=[0.5, 0.5])])
    values = np.array([[-1.0]] * 25 + [[0.0]] * 75)       # 0.0 belongs to the upper bin
    monitor = drift.DriftMonitor(reference, min_rows=100)
    monitor.add_batch(FeatureBatch(("x", "ignored"), np.hstack([values, values])))
    report = monitor.report()
    assert report.feature_psi == {"x": pytest.approx(0.2746530722)}
    assert report.flagged_features == ("x",) and report.flagged and report.output_psi is None
    assert report.describe() == "input drift on 'x' (PSI 0.275) (threshold 0.2; 100 rows, 0 outputs)"
    patient = drift.DriftMonitor(reference, min_rows=101)
    patient.restore(json.loads(json.dumps(monitor.snapshot())))
    assert patient.feature_psi() == monitor.feature_psi() and not patient.report().flagged
    lenient = drift.DriftMonitor(reference, threshold=0.3, min_rows=1)
    lenient.merge(monitor)
    assert lenient.rows == 100 and not lenient.report().flagged


def test_wine_data_shifted_is_flagged_and_unshifted_is_not(onnx_wine):
    X = np.vstack([onnx_wine.X_train, onnx_wine.X_test])
    names = onnx_wine.feature_names
    reference = drift.reference_from_matrix(names, X, source="the wine data")
    assert reference.rows == 178 and len(reference.features) == 13
    assert all(len(h.proportions) == len(h.edges) + 1 and sum(h.proportions) == pytest.approx(1)
               for h in reference.features)
    sample = X[np.random.default_rng(1).integers(0, len(X), 2000)]
    same = drift.DriftMonitor(reference)
    for start in range(0, len(sample), 250):       # in batches, as the job sees them
        same.add_batch(FeatureBatch(names, sample[start:start + 250]))
    report = same.report()
    assert report.rows == 2000 and not report.flagged
    assert max(report.feature_psi.values()) < 0.05

    shifted = sample.copy()
    alcohol = names.index("alcohol")
    shifted[:, alcohol] += 1.0                      # about 1.2 standard deviations
    moved = drift.DriftMonitor(reference)
    moved.add_batch(FeatureBatch(names, shifted))
    report = moved.report()
    assert report.flagged_features == ("alcohol",)
    assert report.feature_psi["alcohol"] > 1.0
    assert "input drift on 'alcohol'" in report.describe()


def test_output_drift_of_a_classifier_against_its_validation_outputs(onnx_wine, classifier):
    gate = validation.validation_from_rows(
        rows_of(onnx_wine, onnx_wine.X_test, labels=onnx_wine.y_test), DATA_TYPE, min_accuracy=0.9)
    outcome = validation.validate(gate, classifier, ModelType.ONNX)
    reference = drift.add_output_reference(Reference(), outcome.predictions)
    predicted = onnx_wine.pipeline.predict(onnx_wine.X_test)
    assert dict(reference.labels) == {str(c): pytest.approx(np.mean(predicted == c)) for c in (0, 1, 2)}
    assert reference.outputRows == 45 and not reference.HasField("scores")

    names = onnx_wine.feature_names
    sample = onnx_wine.X_test[np.random.default_rng(2).integers(0, 45, 1000)]
    same = drift.DriftMonitor(reference)
    same.add_predictions(classifier.score(FeatureBatch(names, sample)))
    assert same.outputs == 1000 and same.output_psi() < 0.05 and not same.report().flagged

    only_first_class = onnx_wine.X_test[predicted == 0]
    skewed = drift.DriftMonitor(reference)
    skewed.add_predictions(classifier.score(FeatureBatch(names, only_first_class[
        np.random.default_rng(3).integers(0, len(only_first_class), 200)])))
    report = skewed.report()
    assert report.output_flagged and report.output_psi > 1.0 and report.flagged_features == ()


def test_output_drift_of_a_regressor_is_a_score_histogram_and_labels_stay_bounded():
    reference = drift.add_output_reference(Reference(), [Prediction(float(v)) for v in range(100)],
                                           bins=4)
    assert list(reference.scores.edges) == [24.75, 49.5, 74.25] and not reference.labels
    monitor = drift.DriftMonitor(reference, min_rows=1)
    monitor.add_predictions([Prediction(10.0)] * 50 + [Prediction(90.0)] * 50)
    expected = drift.psi([0.25] * 4, [0.5, 0, 0, 0.5])
    assert monitor.output_psi() == pytest.approx(expected) and monitor.report().output_flagged

    labelled = drift.add_output_reference(Reference(), [Prediction(0, "a"), Prediction(1, "b")])
    monitor = drift.DriftMonitor(labelled)
    monitor.add_predictions([Prediction(0, f"new-{i}") for i in range(200)])
    counted = monitor.snapshot()["labels"]
    assert len(counted) == drift.MAX_EXTRA_LABELS + 2 + 1     # the bound, then "(other)"
    assert counted[drift.OTHER_LABEL] == 200 - drift.MAX_EXTRA_LABELS - 2


# -- routing ------------------------------------------------------------------------------------

def test_canary_routing_is_stable_and_close_to_its_share_over_10000_ids():
    ids = [f"record-{i}" for i in range(10_000)]
    for share in (0.1, 0.5):
        primary, candidate = routing.split(ids, share)
        assert sorted(primary + candidate) == list(range(10_000))
        assert abs(len(candidate) / 10_000 - share) < 0.015     # 3 standard deviations at 0.5
        assert routing.split(ids, share) == (primary, candidate)
    tenth, fifth = set(routing.split(ids, 0.1)[1]), set(routing.split(ids, 0.2)[1])
    assert tenth < fifth                                        # a larger share only adds records
    assert routing.split(ids, 0.0)[1] == [] and routing.split(ids, 1.0)[0] == []
    other = set(routing.split(ids, 0.1, salt="v2")[1])
    assert len(other & tenth) < 200                             # another salt, another sample
    with pytest.raises(ValueError, match="lies in"):
        routing.goes_to_candidate("x", 1.5)


def test_canary_routing_is_the_same_in_another_process():
    ids = ["a", "record-17", "cultivar-3", ""]
    here = [routing.route_point(i) for i in ids]
    code = ("import json, sys; from udfs.lifecycle.routing import route_point; "
            f"print(json.dumps([route_point(i) for i in {ids!r}]))")
    env = dict(os.environ, PYTHONHASHSEED="12345")
    there = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, check=True,
                           capture_output=True, text=True).stdout
    assert json.loads(there) == here
    assert routing.route_point(b"record-17") == here[1]


def test_shadow_comparison_of_classifiers_and_regressors():
    labels = ("a", "b")
    shadow = routing.ShadowComparison()
    shadow.add_all([Prediction(0, "a", (0.8, 0.2), labels), Prediction(1, "b", (0.3, 0.7), labels),
                    Prediction(0, "a", (0.9, 0.1), labels), Prediction(0, "a", (0.6, 0.4), labels)],
                   [Prediction(0, "a", (0.6, 0.4), labels), Prediction(1, "b", (0.2, 0.8), labels),
                    Prediction(1, "b", (0.4, 0.6), labels), Prediction(0, "a", (0.6, 0.4), labels)])
    assert shadow.agreement_rate == 0.75
    # the candidate's probability of the primary's label, minus the primary's
    assert shadow.mean_score_difference == pytest.approx((-0.2 + 0.1 - 0.5 + 0.0) / 4)
    regressors = routing.ShadowComparison(tolerance=0.01)
    regressors.add_all([Prediction(5.0), Prediction(6.0)], [Prediction(5.005), Prediction(5.5)])
    assert regressors.agreement_rate == 0.5
    assert regressors.mean_score_difference == pytest.approx((0.005 - 0.5) / 2)
    assert regressors.mean_abs_score_difference == pytest.approx((0.005 + 0.5) / 2)
    both = routing.ShadowComparison()
    both.merge(shadow)
    both.restore(regressors.snapshot(), add=True)
    assert (both.compared, both.agreed) == (6, 4)
    assert routing.ShadowComparison().agreement_rate is None
    with pytest.raises(ValueError):
        shadow.add_all([Prediction(1.0)], [])


# -- repository ---------------------------------------------------------------------------------

def published(version: str, at_ms: int, **fields) -> ModelDescriptor:
    return ModelDescriptor(name="logreg", version=version, dataType=DATA_TYPE,
                           modeltype=ModelType.ONNX, data=f"model {version}".encode(),
                           publishedMs=at_ms, inputFeatures=["a", "b"], classLabels=["0", "1"],
                           qualityMetrics={"accuracy": 0.9 + int(version) / 100}, **fields)


def entry_of(descriptor: ModelDescriptor) -> RepositoryEntry:
    return repository.entry_from_descriptor(descriptor,
                                            digest=digest.model_digest(descriptor))


def test_an_entry_describes_the_model_and_decisions_leave_the_original_alone():
    descriptor = published("1", 100)
    descriptor.validation.rows.add(record=b"r")
    entry = entry_of(descriptor)
    assert repository.entry_key(entry) == f"{DATA_TYPE}//1"
    assert repository.topic_key(entry, "keyed") == f"{DATA_TYPE}//1@keyed"
    assert (entry.name, entry.version, entry.modelType, entry.createdMs) == ("logreg", "1",
                                                                              ModelType.ONNX, 100)
    assert entry.digest == hashlib.sha256(b"model 1").hexdigest() and entry.inlineBytes == 7
    assert list(entry.inputFeatures) == ["a", "b"] and dict(entry.qualityMetrics) == {"accuracy": 0.91}
    assert entry.descriptor == descriptor.SerializeToString() and entry.hasValidation
    assert not entry.hasReference and len(entry.descriptorId) == 16
    accepted = repository.record_deployment(entry, "keyed", ACCEPTED, 1000)
    retired = repository.record_retirement(accepted, "keyed", 2000, retired_by="2")
    assert not entry.deployments and not accepted.deployments[0].retiredMs
    assert (retired.deployments[0].retiredMs, retired.deployments[0].retiredBy) == (2000, "2")
    assert repository.record_retirement(entry, "keyed", 3000) == entry   # never served there
    big = repository.entry_from_descriptor(descriptor, max_descriptor_bytes=10)
    assert big.descriptor == b""
    unversioned = entry_of(ModelDescriptor(dataType="t", modeltype=ModelType.ONNX, data=b"x"))
    assert repository.entry_key(unversioned) == \
        f"t//sha256:{hashlib.sha256(b'x').hexdigest()[:16]}"
    many = entry
    for at in range(40):
        many = repository.record_deployment(many, "keyed", REFUSED, at, reason="no")
    assert len(many.deployments) == repository.MAX_DEPLOYMENTS
    assert many.deployments[0].deployedMs == 40 - repository.MAX_DEPLOYMENTS


@pytest.fixture()
def timeline():
    """Three versions, two jobs, each job publishing its own view of an entry (topic_key)."""
    v1, v2, v3 = published("1", 100), published("2", 200), published("3", 300)
    e1, e2, e3 = entry_of(v1), entry_of(v2), entry_of(v3)
    failed = validation.ValidationOutcome(False, "validation failed on 2 rows: accuracy 0.5000 < "
                                          "minimum 0.9 (1/2 labels)", rows=2, label_rows=2,
                                          mismatches=1, min_accuracy=0.9)
    records = []
    for job, at in (("keyed", 1000), ("broadcast", 1100)):
        first = repository.record_deployment(e1, job, ACCEPTED, at)
        records.append(first)
        records.append(repository.record_deployment(e2, job, ACCEPTED, at + 1000))
        records.append(repository.record_retirement(first, job, at + 1000, retired_by="2"))
    records.append(repository.record_deployment(e3, "keyed", VALIDATION_FAILED, 3000,
                                                reason=failed.reason, figures=failed.figures()))
    return (v1, v2, v3), records


def test_folding_the_topic_gives_list_show_history_and_who_serves_what(timeline):
    _, records = timeline
    repo = Repository.fold([r.SerializeToString() for r in records] + [None])
    assert repo.data_types() == [DATA_TYPE]
    assert [e.version for e in repo.history(DATA_TYPE)] == ["1", "2", "3"]
    assert [e.version for e in repo.listing()] == ["3"]
    assert repo.show(DATA_TYPE).version == "3" and repo.show(DATA_TYPE, "2").createdMs == 200
    assert repo.show(DATA_TYPE, "9") is None
    first = repo.show(DATA_TYPE, "1")
    assert sorted((d.job, d.deployedMs, d.retiredMs, d.retiredBy) for d in first.deployments) == \
        [("broadcast", 1100, 2100, "2"), ("keyed", 1000, 2000, "2")]
    third = repo.show(DATA_TYPE, "3")
    [refusal] = third.deployments
    assert refusal.outcome == VALIDATION_FAILED and refusal.validation.mismatches == 1
    assert refusal.validation.minAccuracy == 0.9 and "accuracy 0.5000" in refusal.reason
    assert {job: e.version for job, e in repo.serving(DATA_TYPE).items()} == \
        {"broadcast": "2", "keyed": "2"}


def test_rollback_finds_the_previous_accepted_version_or_the_named_one(timeline):
    (v1, _, _), records = timeline
    repo = Repository.fold(records)
    target = repo.rollback_target(DATA_TYPE)
    assert target.version == "1"
    assert repo.rollback_target(DATA_TYPE, job="broadcast").version == "1"
    assert repo.rollback_target(DATA_TYPE, to_version="1").version == "1"
    with pytest.raises(RollbackError, match="version '3' .* never accepted: VALIDATION_FAILED by "
                                            "'keyed': validation failed on 2 rows"):
        repo.rollback_target(DATA_TYPE, to_version="3")
    with pytest.raises(RollbackError, match="version '2' .* is the one serving"):
        repo.rollback_target(DATA_TYPE, to_version="2")
    with pytest.raises(RollbackError, match="has no version '9'"):
        repo.rollback_target(DATA_TYPE, to_version="9")
    with pytest.raises(RollbackError, match="no model of data type 'other' is serving"):
        repo.rollback_target("other")

    again = repository.republished(target, 4000)
    assert again.publishedMs == 4000
    again.publishedMs = v1.publishedMs
    assert again == v1
    # the rollback is published and accepted: v1 serves on keyed, created at its first time
    back = repository.record_deployment(entry_of(repository.republished(target, 4000)), "keyed",
                                        ACCEPTED, 4100)
    repo.add(back)
    repo.add(repository.record_retirement(repo.show(DATA_TYPE, "2"), "keyed", 4100, retired_by="1"))
    assert {job: e.version for job, e in repo.serving(DATA_TYPE).items()} == \
        {"broadcast": "2", "keyed": "1"}
    assert repo.show(DATA_TYPE, "1").createdMs == 100 and repo.show(DATA_TYPE, "1").publishedMs == 4000
    assert [e.version for e in repo.history(DATA_TYPE)] == ["1", "2", "3"]
    with pytest.raises(RollbackError, match="no accepted version before '1' on job 'keyed'"):
        repo.rollback_target(DATA_TYPE, job="keyed")


def test_a_candidate_neither_serves_nor_is_rolled_back_to_and_comes_back_without_rollout(
        timeline):
    """v4 deployed as a canary after v2 serves: v2 still serves, a rollback still goes to v1
    (v4 was only ever a candidate), and republishing v4 drops its rollout."""
    from protos import Rollout

    _, records = timeline
    repo = Repository.fold(records)
    v4 = published("4", 400)
    v4.rollout.CopyFrom(Rollout(mode=Rollout.CANARY, share=0.1))
    entry = repository.entry_from_descriptor(v4, digest="d4")
    repo.add(repository.record_deployment(entry, "keyed", ACCEPTED, 5000, role="canary 10%"))
    assert {job: e.version for job, e in repo.serving(DATA_TYPE).items()} == \
        {"broadcast": "2", "keyed": "2"}
    assert repo.rollback_target(DATA_TYPE, job="keyed").version == "1"
    # named, it may be (like a version never deployed): the user asks for it
    assert repo.rollback_target(DATA_TYPE, to_version="4", job="keyed").version == "4"
    again = repository.republished(repo.show(DATA_TYPE, "4"), 6000)
    assert not again.HasField("rollout") and again.version == "4"
    # retiring the candidate leaves the data type's model's deployment alone
    ended = repository.record_retirement(repo.show(DATA_TYPE, "4"), "keyed", 7000, "aborted",
                                         candidate=True)
    assert (ended.deployments[-1].retiredMs, ended.deployments[-1].retiredBy) == (7000, "aborted")
    assert repository.record_retirement(repo.show(DATA_TYPE, "4"), "keyed", 7000, "x") == \
        repo.show(DATA_TYPE, "4")   # it never served as the data type's model


def test_a_republished_location_with_other_files_is_refused_with_both_digests(tmp_path):
    models = tmp_path / "models"
    model = saved_model_like(models / "saved")
    descriptor = by_location(model)
    known = repository.entry_from_descriptor(descriptor, digest=digest.model_digest(descriptor, [models]))
    same = digest.model_digest(descriptor, [models])
    assert repository.republication_refused(known, descriptor, same) is None
    assert repository.republication_refused(None, descriptor, same) is None
    (model / "saved_model.pb").write_bytes(b"graph-v2")
    now = digest.model_digest(descriptor, [models])
    reason = repository.republication_refused(known, descriptor, now)
    assert reason is not None and now in reason and known.digest in reason
    inline = published("1", 1)
    assert repository.republication_refused(entry_of(inline), inline, "other") is None
    too_big = repository.entry_from_descriptor(descriptor, max_descriptor_bytes=1)
    with pytest.raises(RollbackError, match="too large"):
        repository.republished(too_big, 1)


def test_the_demo_manifest_keeps_quality_metrics(tmp_path):
    from modelserving.demo.training import TrainedModel, descriptor_for, load_manifest, write_manifest

    (tmp_path / "m.onnx").write_bytes(b"x")
    model = TrainedModel("m", "1", ModelType.ONNX, tmp_path / "m.onnx", True, ("a",), ("0",), "d",
                         quality_metrics={"holdoutAccuracy": 0.9777777777777777})
    write_manifest(tmp_path, [model])
    [read] = load_manifest(tmp_path)
    assert read.quality_metrics == {"holdoutAccuracy": 0.9777777777777777}
    assert dict(descriptor_for(read).qualityMetrics) == {"holdoutAccuracy": 0.9777777777777777}
