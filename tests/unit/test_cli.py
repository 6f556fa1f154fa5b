"""The ``modelserving`` entry point: command groups, and one clear line per expected failure."""
from __future__ import annotations

import json

import pytest

from modelserving import cli
from modelserving.errors import FlinkClusterError, ToolError
from modelserving.local.processes import free_port


def subcommands(parser) -> set[str]:
    action = next(a for a in parser._actions if a.dest == "command")
    return set(action.choices)


def test_every_command_group_is_on_the_parser_and_the_benchmark_comes_from_its_entry_point():
    names = subcommands(cli.build_parser())
    assert {"kafka", "topics", "publish", "follow", "run", "jars", "cluster", "submit", "jobs",
            "savepoint", "resume", "cancel", "state", "demo", "train"} <= names
    assert "bench" in names
    assert "modelserving.bench" not in " ".join(cli.COMMAND_MODULES)


def test_a_bad_setting_in_an_option_is_one_line_and_exit_2(capsys):
    code = cli.main(["topics", "create", "--batch-max-size", "many"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err == ["modelserving: batch_max_size must be an integer, not 'many' (from --batch-max-size)"]


def test_a_bad_setting_in_the_environment_is_the_same_error(capsys, monkeypatch):
    monkeypatch.setenv("MODELSERVING_CHECKPOINT_INTERVAL_MS", "soon")
    code = cli.main(["follow", "--timeout", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err == [err[0]] and "checkpoint_interval_ms" in err[0]


def test_a_choice_outside_its_list_names_the_setting(capsys):
    code = cli.main(["topics", "create", "--delivery-guarantee", "twice"])
    err = capsys.readouterr().err
    assert code == 2 and "delivery" in err and "twice" in err


def test_an_unreachable_cluster_is_one_line_and_exit_1(capsys, tmp_path):
    code = cli.main(["jobs", "--workdir", str(tmp_path), "--rest-port", str(free_port())])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert len(err) == 1 and "no Flink cluster answers" in err[0]


def test_a_multi_line_failure_shows_its_first_line_and_all_of_it_with_verbose(capsys):
    failure = FlinkClusterError("the job failed\nTraceback of the job:\n  line 2")
    assert cli.report_failure(failure) == 1
    assert capsys.readouterr().err == "modelserving: the job failed (details: add -v)\n"
    cli.report_failure(failure, verbose=True)
    assert capsys.readouterr().err.count("\n") == 3


def test_an_unexpected_exception_keeps_its_traceback(monkeypatch):
    def broken(args):
        raise KeyError("a bug")

    from modelserving.cli import demo

    monkeypatch.setattr(demo, "cmd_train", broken)
    with pytest.raises(KeyError, match="a bug"):
        cli.main(["train"])
    assert not issubclass(KeyError, ToolError)


def test_an_option_of_no_command_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["train", "--no-such-option"])
    assert exit_.value.code == 2
    assert "--no-such-option" in capsys.readouterr().err


# -- the model lifecycle: validate, and what publish model attaches ------------------------------

def lifecycle_args(onnx_wine, *extra):
    """``publish model``'s parsed options, as ``main`` parses them."""
    args, _ = cli.build_parser().parse_known_args(
        ["publish", "model", str(onnx_wine.path), "--data-type", "wine-cultivar",
         "--input-features", ",".join(onnx_wine.feature_names), *extra])
    return args


def flipped_holdout(onnx_wine, tmp_path, count: int):
    """The holdout file with ``count`` labels the model gets right changed to wrong ones."""
    from modelserving.demo.training import demo_dataset, write_rows

    predicted = onnx_wine.pipeline.predict(onnx_wine.X_test)
    y = onnx_wine.y_test.copy()
    right = [i for i in range(len(y)) if predicted[i] == y[i]][:count]
    y[right] = (y[right] + 1) % 3
    return write_rows(tmp_path / "flipped.csv", demo_dataset(), onnx_wine.X_test, y), \
        int(sum(predicted == y))


def test_validate_passes_with_exit_0_and_fails_with_exit_1_and_the_figures(onnx_wine, tmp_path,
                                                                           capsys):
    assert "validate" in subcommands(cli.build_parser())
    features = ["--input-features", ",".join(onnx_wine.feature_names)]
    hits = int(sum(onnx_wine.pipeline.predict(onnx_wine.X_test) == onnx_wine.y_test))
    code = cli.main(["validate", str(onnx_wine.path), "--data", str(onnx_wine.holdout_csv),
                     "--min-accuracy", "0.9", *features])
    out = capsys.readouterr().out.splitlines()
    assert code == 0
    assert out[0] == f"validation passed on 45 rows: accuracy {hits / 45:.4f} >= minimum 0.9 ({hits}/45 labels)"
    assert out[2] == f"  labels: 45 expected, {45 - hits} mismatched, accuracy {hits / 45:.4f}, minimum 0.9"

    flipped, hits = flipped_holdout(onnx_wine, tmp_path, 5)
    code = cli.main(["validate", str(onnx_wine.path), "--data", str(flipped), "--min-accuracy", "0.9",
                     "--json", *features])
    figures = json.loads(capsys.readouterr().out)
    assert code == 1
    assert figures["passed"] is False and figures["mismatches"] == 45 - hits
    assert figures["accuracy"] == pytest.approx(hits / 45) and figures["minAccuracy"] == 0.9


def test_validate_reports_what_it_cannot_read_in_one_line(onnx_wine, tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("alcohol,label\nstrong,1\n")
    assert cli.main(["validate", str(onnx_wine.path), "--data", str(bad)]) == 2
    assert capsys.readouterr().err.strip() == \
        f"modelserving: cannot read {bad}: {bad}, line 2: could not convert string to float: 'strong'"
    # a vector model without its input order cannot even load: one line, exit 1
    assert cli.main(["validate", str(onnx_wine.path), "--data", str(onnx_wine.holdout_csv)]) == 1
    assert "needs inputFeatures" in capsys.readouterr().err


def test_publish_model_attaches_validation_reference_and_quality(onnx_wine, capsys):
    from modelserving.cli.lifecycle import attach_lifecycle, descriptor_of

    args = lifecycle_args(onnx_wine, "--validation", str(onnx_wine.holdout_csv), "--min-accuracy",
                          "0.9", "--reference", str(onnx_wine.training_csv), "--quality",
                          "auc=0.99", "--quality", "f1 = 0.95")
    descriptor = descriptor_of(args, args.data_type)
    attach_lifecycle(descriptor, args)
    assert capsys.readouterr().out.startswith("validation passed on 45 rows")
    assert dict(descriptor.qualityMetrics) == {"auc": 0.99, "f1": 0.95}
    assert len(descriptor.validation.rows) == 45 and descriptor.validation.minAccuracy == 0.9
    assert not descriptor.validation.HasField("tolerance")
    reference = descriptor.reference
    assert reference.rows == 133 and reference.source == "training.csv, 133 rows"
    assert [h.name for h in reference.features] == list(onnx_wine.feature_names)
    assert all(len(h.edges) <= 9 and sum(h.proportions) == pytest.approx(1) for h in reference.features)
    # the output reference: the model's labels on the validation rows
    predicted = onnx_wine.pipeline.predict(onnx_wine.X_test)
    assert reference.outputRows == 45
    assert dict(reference.labels) == {str(c): pytest.approx(sum(predicted == c) / 45) for c in (0, 1, 2)}


def test_publish_model_refuses_a_model_that_fails_its_validation_unless_forced(onnx_wine, tmp_path,
                                                                                capsys):
    from modelserving.cli.lifecycle import attach_lifecycle, descriptor_of

    flipped, _ = flipped_holdout(onnx_wine, tmp_path, 10)
    args = lifecycle_args(onnx_wine, "--validation", str(flipped), "--min-accuracy", "0.9")
    with pytest.raises(ToolError, match=r"not published: validation failed on 45 rows: accuracy"):
        attach_lifecycle(descriptor_of(args, args.data_type), args)
    forced = lifecycle_args(onnx_wine, "--validation", str(flipped), "--min-accuracy", "0.9", "--force")
    descriptor = descriptor_of(forced, forced.data_type)
    attach_lifecycle(descriptor, forced)
    assert len(descriptor.validation.rows) == 45 and descriptor.reference.outputRows == 45
    # only a reference: its outputs are the model's on the reference data itself
    alone = lifecycle_args(onnx_wine, "--reference", str(onnx_wine.training_csv))
    descriptor = descriptor_of(alone, alone.data_type)
    attach_lifecycle(descriptor, alone)
    assert not descriptor.HasField("validation") and descriptor.reference.outputRows == 133


def test_a_bad_quality_metric_is_one_line_and_exit_2_before_anything_is_sent(onnx_wine, capsys):
    code = cli.main(["publish", "model", str(onnx_wine.path), "--data-type", "x",
                     "--quality", "accuracy"])
    assert code == 2
    assert capsys.readouterr().err.strip() == \
        "modelserving: --quality takes NAME=NUMBER, not 'accuracy'"
