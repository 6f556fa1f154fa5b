"""The ``modelserving`` entry point: command groups, and one clear line per expected failure."""
from __future__ import annotations

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
