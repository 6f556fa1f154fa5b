"""The benchmark's results page and plots, from a small synthetic results dict (no benchmark run)."""
from __future__ import annotations

import json

import pytest

from modelserving.bench import report


def result(system: str, model_type: str, rate: float | None, p50=None, p95=None, p99=None, at_rate=None,
           limited_by=None, note="", cpu_us=None, cores=None):
    return {"system": system, "model_type": model_type, "throughput_rps": rate, "p50_ms": p50, "p95_ms": p95,
            "p99_ms": p99, "latency_rate_rps": at_rate, "runs": [], "limited_by": limited_by, "note": note,
            "cpu_us_per_record": cpu_us, "cpu_cores": cores}


@pytest.fixture
def results() -> dict:
    return {
        "created": "2026-11-23T23:10:00Z", "quick": True, "runs": 3,
        "machine": {"cores": 2, "memory_gib": 23.4, "cpu": "AMD EPYC 7B13", "platform": "Linux-6.1"},
        "versions": {"python": "3.11.9", "apache-flink": "2.2.1", "kafka": "4.4.0"},
        "settings": {"batch_max_size": 64, "batch_max_wait_ms": 5, "parallelism": 2},
        "method": "Each figure is the median of three runs.",
        "results": [
            result("keyed", "ONNX", 5230.0, 21.0, 40.2, 55.1, 2615.0),
            result("broadcast", "ONNX", 4800.0, 18.0, 35.0, 48.0, 2400.0, limited_by="producer"),
            result("plain-loop", "ONNX", 2615.0, 2.0, 4.0, 6.0, 1300.0),
            result("in-process", "ONNX", 104600.0),
            result("keyed", "TENSORFLOWSAVED", 3200.0, 30.0, 45.0, None, 1600.0),
            result("broadcast", "TENSORFLOWSAVED", 3000.0, 31.0, 46.0, 60.0, 1500.0),
            result("plain-loop", "TENSORFLOWSAVED", 2000.0, 3.0, 5.0, 7.0, 1000.0),
            result("in-process", "TENSORFLOWSAVED", 40000.0),
            result("keyed", "TENSORFLOW", 6000.0, 15.0, 30.0, 40.0, 3000.0),
            result("broadcast", "TENSORFLOW", 5500.0, 16.0, 31.0, 42.0, 2750.0),
            result("plain-loop", "TENSORFLOW", 2000.0, 3.0, 5.0, 7.0, 1000.0),
            result("in-process", "TENSORFLOW", 50000.0),
            result("keyed", "PMML", 1500.0, 50.0, 80.0, 120.0, 750.0),
            result("broadcast", "PMML", 1400.0, 52.0, 85.0, 130.0, 700.0),
            result("plain-loop", "PMML", 1000.0, 8.0, 12.0, 20.0, 500.0),
            result("in-process", "PMML", 3000.0),
            result("pass-through", "NONE", 8000.0, 10.0, 20.0, 25.0, 4000.0),
        ],
        "model_switch": [
            {"system": "keyed", "model_type": "ONNX", "model_switch_ms": 420.0, "runs_ms": [400.0, 420.0, 500.0]},
            {"system": "keyed", "model_type": "PMML", "model_switch_ms": 1420.0, "runs_ms": [1400.0, 1420.0]},
            {"system": "broadcast", "model_type": "ONNX", "model_switch_ms": 300.0, "runs_ms": [300.0]},
        ],
        "experiments": [
            {"setting": "python_execution_mode", "value": "thread", "system": "keyed", "model_type": "ONNX",
             "throughput_rps": 6100.0, "p50_ms": 3.0, "p99_ms": 9.0, "note": "fewer processes"},
        ],
    }


def by_target(rows: list[dict], target: str, model_type: str) -> dict:
    return next(row for row in rows if row["target"] == target and row["model_type"] == model_type)


def test_ratios_against_each_baseline(results):
    rows = {(row["system"], row["model_type"]): row for row in report.ratios(results)}
    assert set(rows) == {(job, t) for job in ("keyed", "broadcast")
                         for t in ("ONNX", "TENSORFLOWSAVED", "TENSORFLOW", "PMML")}
    keyed_onnx = rows["keyed", "ONNX"]
    assert keyed_onnx["vs_plain_loop"] == pytest.approx(2.0)
    assert keyed_onnx["vs_pass_through"] == pytest.approx(5230 / 8000)
    assert keyed_onnx["vs_in_process"] == pytest.approx(0.05)
    assert rows["broadcast", "PMML"]["vs_plain_loop"] == pytest.approx(1.4)


def test_ratio_is_none_without_its_baseline(results):
    results["results"] = [r for r in results["results"] if r["system"] not in ("plain-loop", "pass-through")]
    row = next(row for row in report.ratios(results) if row["system"] == "keyed" and row["model_type"] == "ONNX")
    assert (row["vs_plain_loop"], row["vs_pass_through"]) == (None, None)


def test_targets_met_missed_and_not_measured(results):
    results["results"] += [result("quix", "ONNX", 4000.0), result("bytewax", "ONNX", 5000.0),
                           result("confluent-loop-2p", "ONNX", 12000.0),
                           result("keyed-4types", "ONNX", 4500.0, 12.0, 30.0, 45.0)]
    rows = report.targets(results)
    peers = by_target(rows, "keyed throughput >= fastest of Quix and bytewax", "ONNX")
    assert (peers["value"], peers["goal"], peers["met"], peers["by"]) == (
        pytest.approx(5230 / 5000), 1.0, True, "met (1.05x)")
    four = by_target(rows, "keyed-4types throughput >= fastest of Quix and bytewax", "ONNX")
    assert (four["met"], four["by"]) == (False, "missed by 10% (0.90x of 1x)")
    loop = by_target(rows, "broadcast throughput >= 0.5x confluent-loop, 2 processes", "ONNX")
    assert (loop["value"], loop["met"]) == (pytest.approx(0.4), False)
    p50 = by_target(rows, "keyed p50 at half load <= 20 ms", "ONNX")
    assert (p50["value"], p50["met"], p50["by"]) == (21.0, False, "missed by 1 ms")
    p99 = by_target(rows, "keyed-4types p99 at half load <= 50 ms", "ONNX")
    assert (p99["met"], p99["by"]) == (True, "met (45 ms)")
    unmeasured = by_target(rows, "keyed p99 at half load <= 50 ms", "TENSORFLOWSAVED")
    assert (unmeasured["value"], unmeasured["met"], unmeasured["by"]) == (None, None, "not measured")
    no_peers = by_target(rows, "keyed throughput >= fastest of Quix and bytewax", "TENSORFLOWSAVED")
    assert no_peers["by"] == "not measured"
    # a job not in the run has no rows; TENSORFLOW is not a target format
    assert not [row for row in rows if row["target"].startswith("keyed-4types") and row["model_type"] != "ONNX"]
    assert not [row for row in rows if row["model_type"] == "TENSORFLOW"]


def test_model_switch_targets_per_job(results):
    rows = report.targets(results)
    switch = [row for row in rows if "within 1 s" in row["target"]]
    assert [(row["target"].split(":")[0], row["model_type"]) for row in switch] == [
        ("keyed", "ONNX"), ("keyed", "PMML"), ("broadcast", "ONNX"), ("broadcast", "PMML")]
    keyed_onnx = by_target(rows, "keyed: new inline model serving within 1 s", "ONNX")
    assert (keyed_onnx["value"], keyed_onnx["goal"], keyed_onnx["met"], keyed_onnx["by"]) == (
        420.0, 1000.0, True, "met (420 ms)")
    keyed_pmml = by_target(rows, "keyed: new inline model serving within 1 s", "PMML")
    assert (keyed_pmml["met"], keyed_pmml["by"]) == (False, "missed by 420 ms")
    assert by_target(rows, "broadcast: new inline model serving within 1 s", "PMML")["by"] == "not measured"


def test_markdown_page(results):
    page = report.markdown(results)
    assert page.startswith("# Benchmark results\n")
    for expected in ("2026-11-23T23:10:00Z", "quick run", "3 runs per figure", "2 cores", "apache-flink 2.2.1",
                     "- batch_max_size: 64", "median of three runs",
                     "## Throughput and latency", "## Ratios", "## Model switch", "## Targets",
                     "## Tuning experiments"):
        assert expected in page
    assert "| ONNX | keyed | 5,230 | 21.0 | 40.2 | 55.1 | 2,615 |" in page
    assert "| ONNX | broadcast | ≥ 4,800 |" in page
    assert "| TENSORFLOWSAVED | keyed | 3,200 | 30.0 | 45.0 | – | 1,600 |" in page
    assert "| ONNX | in-process | 104,600 | – | – | – | – |" in page
    assert "| keyed | ONNX | 2.00x | 0.65x | 0.05x |" in page
    assert "| keyed | ONNX | 420 | 400, 420, 500 |" in page
    assert "missed by 420 ms" in page and "| keyed p50 at half load <= 20 ms | ONNX | 21 ms | ≤ 20 ms | missed by 1 ms |" in page
    assert "| python_execution_mode | thread | keyed | ONNX | 6,100 | 3.0 | 9.0 | fewer processes |" in page
    for image in ("![throughput](throughput.png)", "![latency](latency.png)", "![model switch](model_switch.png)"):
        assert image in page
    # Rows follow the model type order, with the pass-through job last.
    assert page.index("| ONNX | keyed") < page.index("| TENSORFLOWSAVED | keyed") \
        < page.index("| TENSORFLOW | keyed") < page.index("| PMML | keyed") < page.index("| NONE | pass-through")


def test_markdown_without_optional_parts(results):
    del results["experiments"], results["method"]
    page = report.markdown(results)
    assert "## Tuning experiments" not in page and "## Method" not in page


def test_write_report_files(results, tmp_path):
    out_dir = tmp_path / "nested" / "report"
    paths = report.write_report(results, out_dir)
    assert set(paths) == {"json", "markdown", "throughput_plot", "latency_plot", "switch_plot", "cpu_plot"}
    assert {path.name for path in paths.values()} == {
        "results.json", "results.md", "throughput.png", "latency.png", "model_switch.png", "cpu.png"}
    assert all(path.parent == out_dir for path in paths.values())
    assert json.loads(paths["json"].read_text(encoding="utf-8")) == results
    assert paths["markdown"].read_text(encoding="utf-8") == report.markdown(results)
    for key in ("throughput_plot", "latency_plot", "switch_plot", "cpu_plot"):
        data = paths[key].read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 5 * 1024, key


def test_plots_survive_missing_figures(tmp_path):
    sparse = {"results": [result("keyed", "ONNX", None), result("in-process", "PMML", 100.0)], "model_switch": []}
    paths = report.write_report(sparse, tmp_path)
    assert all(path.exists() for path in paths.values())
    assert "| ONNX | keyed | – |" in paths["markdown"].read_text(encoding="utf-8")


def with_peers(results: dict) -> dict:
    """The fixture's run plus every Python peer on ONNX, each with its CPU per record."""
    results["results"] += [
        result("confluent-loop-2p", "ONNX", 105600.0, 7.0, 30.0, 78.0, 52800.0, cpu_us=17.9, cores=1.89),
        result("quix", "ONNX", 26500.0, 5.0, 6.0, 8.0, 13250.0, cpu_us=37.1, cores=0.98),
        result("bytewax", "ONNX", 84200.0, 7.0, 40.0, 81.0, 42100.0, cpu_us=22.4, cores=1.89),
        result("confluent-loop", "ONNX", 88700.0, 6.0, 20.0, 64.0, 44350.0, cpu_us=11.2, cores=0.99),
    ]
    for entry in results["results"]:
        if (entry["system"], entry["model_type"]) == ("keyed", "ONNX"):
            entry.update(cpu_us_per_record=190.4, cpu_cores=1.0)
        if entry["system"] == "in-process" and entry["model_type"] == "ONNX":
            entry.update(cpu_us_per_record=9.56, cpu_cores=1.0)
    return results


def test_peers_and_cpu_side_by_side(results):
    page = report.markdown(with_peers(results))
    assert "CPU µs/record | CPU cores |" in page
    assert "| ONNX | keyed | 5,230 | 21.0 | 40.2 | 55.1 | 2,615 | 190.4 | 1.00 |" in page
    assert "| ONNX | confluent-loop-2p | 105,600 | 7.0 | 30.0 | 78.0 | 52,800 | 17.9 | 1.89 |" in page
    assert "| ONNX | in-process | 104,600 | – | – | – | – | 9.6 | 1.00 |" in page
    # a system without CPU figures shows dashes, not zeros
    assert "| ONNX | broadcast | ≥ 4,800 | 18.0 | 35.0 | 48.0 | 2,400 | – | – |" in page
    # the jobs first, then the peers in the order they are measured, then in-process
    order = [page.index(f"| ONNX | {system} |") for system in
             ("keyed", "broadcast", "plain-loop", "quix", "bytewax", "confluent-loop", "confluent-loop-2p",
              "in-process")]
    assert order == sorted(order)
    assert "![CPU per record](cpu.png)" in page


def test_cpu_plot_draws_every_system(results, tmp_path, monkeypatch):
    drawn = []
    real_bars = report._bars

    def spy(ax, results, field, hatch, text):
        model_types, plotted = real_bars(ax, results, field, hatch, text)
        drawn.append((field, sorted(plotted)))
        return model_types, plotted

    monkeypatch.setattr(report, "_bars", spy)
    path = report.plot_cpu(with_peers(results), tmp_path / "cpu.png")
    assert path.read_bytes().startswith(b"\x89PNG")
    assert drawn == [("cpu_us_per_record", [9.56, 11.2, 17.9, 22.4, 37.1, 190.4])]
