"""The benchmark's results page and plots, so a run can be read without opening the raw JSON.

Everything here works from the results dict alone (see ``write_report``), so a page can be
regenerated from an old ``results.json`` without rerunning anything.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from modelserving.bench import (BYTEWAX, CONFLUENT_LOOP, CONFLUENT_LOOP_2P, IN_PROCESS, JOBS,
                                KEYED_FOUR_TYPES, MODEL_TYPES, PASS_THROUGH, PEERS, PLAIN_LOOP, QUIX)

NO_MODEL = "NONE"
#: Table order: the jobs, then what they are compared with.
SYSTEMS = (*JOBS, KEYED_FOUR_TYPES, *PEERS, IN_PROCESS, PASS_THROUGH)
#: Systems drawn as bars (the pass-through job is a line: it scores nothing).
BAR_SYSTEMS = (*JOBS, KEYED_FOUR_TYPES, *PEERS, IN_PROCESS)
# The throughput and latency targets: formats and jobs they are promised for, and the goals.
TARGET_MODEL_TYPES = ("ONNX", "TENSORFLOWSAVED")
TARGET_JOBS = ("keyed", KEYED_FOUR_TYPES, "broadcast")
P50_GOAL_MS, P99_GOAL_MS = 20.0, 50.0
SWITCH_MODEL_TYPES = ("ONNX", "PMML")
SWITCH_GOAL_MS = 1000.0
DASH = "–"
AT_LEAST = "≥"

# Fixed colours so a system looks the same in every plot.
SYSTEM_COLOURS = {"keyed": "#1f77b4", "broadcast": "#ff7f0e", PLAIN_LOOP: "#2ca02c",
                  QUIX: "#9467bd", BYTEWAX: "#8c564b", CONFLUENT_LOOP: "#e377c2",
                  CONFLUENT_LOOP_2P: "#bcbd22", IN_PROCESS: "#d62728", PASS_THROUGH: "#7f7f7f"}
PERCENTILE_COLOURS = {"p50_ms": "#9ecae1", "p95_ms": "#4292c6", "p99_ms": "#08519c"}
FIGURE_SIZE = (10, 5)
DPI = 110


def write_report(results: dict, out_dir: Path) -> dict[str, Path]:
    """Writes results.json, results.md and the four plots into out_dir; returns their paths by role."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "results.json", "markdown": out_dir / "results.md",
             "throughput_plot": out_dir / "throughput.png", "latency_plot": out_dir / "latency.png",
             "switch_plot": out_dir / "model_switch.png", "cpu_plot": out_dir / "cpu.png"}
    paths["json"].write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    paths["markdown"].write_text(markdown(results), encoding="utf-8")
    plot_throughput(results, paths["throughput_plot"])
    plot_latency(results, paths["latency_plot"])
    plot_model_switch(results, paths["switch_plot"])
    plot_cpu(results, paths["cpu_plot"])
    return paths


# ----------------------------------------------------------------------------------------------
# Lookups (tolerant: any figure may be missing because a run failed or was not measured)

def _number(value) -> float | None:
    """None for anything that cannot be plotted or divided, so callers only test for None."""
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) or math.isinf(number) else number


def _entries(results: dict) -> list[dict]:
    return [entry for entry in results.get("results") or [] if isinstance(entry, dict)]


def _entry(results: dict, system: str, model_type: str) -> dict | None:
    return next((entry for entry in _entries(results)
                 if entry.get("system") == system and entry.get("model_type") == model_type), None)


def _pass_through(results: dict) -> dict | None:
    """The pass-through job has no model; prefer its NONE entry but accept any it has."""
    return _entry(results, PASS_THROUGH, NO_MODEL) or next(
        (entry for entry in _entries(results) if entry.get("system") == PASS_THROUGH), None)


def _figure(entry: dict | None, field: str) -> float | None:
    return None if entry is None else _number(entry.get(field))


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def _in_order(present: Iterable[str], preferred: Sequence[str]) -> list[str]:
    """The preferred order first, then anything unexpected, so no measured row is ever dropped."""
    present = list(dict.fromkeys(present))
    return [item for item in preferred if item in present] + sorted(
        item for item in present if item not in preferred)


def _model_types(results: dict, include_none: bool = False) -> list[str]:
    present = [entry.get("model_type") for entry in _entries(results) if entry.get("model_type")]
    order = _in_order(present, (*MODEL_TYPES, NO_MODEL))
    return order if include_none else [model_type for model_type in order if model_type != NO_MODEL]


# ----------------------------------------------------------------------------------------------
# Ratios and targets

def ratios(results: dict) -> list[dict]:
    """Each Flink job's throughput relative to the three baselines, per model type it ran."""
    pass_through_rate = _figure(_pass_through(results), "throughput_rps")
    rows = []
    for job in (*JOBS, KEYED_FOUR_TYPES):
        job_types = [entry.get("model_type") for entry in _entries(results) if entry.get("system") == job]
        for model_type in _in_order(job_types, MODEL_TYPES):
            rate = _figure(_entry(results, job, model_type), "throughput_rps")
            rows.append({
                "system": job, "model_type": model_type,
                "vs_plain_loop": _ratio(rate, _figure(_entry(results, PLAIN_LOOP, model_type), "throughput_rps")),
                "vs_pass_through": _ratio(rate, pass_through_rate),
                "vs_in_process": _ratio(rate, _figure(_entry(results, IN_PROCESS, model_type), "throughput_rps")),
            })
    return rows


@dataclass(frozen=True)
class _Target:
    """A target plus how to read it, which the public dicts leave out to keep their shape fixed."""

    row: dict
    unit: str  # "x" (a ratio) or "ms"
    at_most: bool  # met when the value is at most the goal (latency, switch time) rather than at least


def targets(results: dict) -> list[dict]:
    """The project's stated performance targets, each with a verdict a person can read."""
    return [target.row for target in _targets(results)]


def _targets(results: dict) -> list[_Target]:
    found = []
    for model_type in TARGET_MODEL_TYPES:
        fastest_peer = max((rate for rate in (_figure(_entry(results, peer, model_type), "throughput_rps")
                                              for peer in (QUIX, BYTEWAX)) if rate is not None), default=None)
        loop = _figure(_entry(results, CONFLUENT_LOOP_2P, model_type), "throughput_rps")
        for job in TARGET_JOBS:
            entry = _entry(results, job, model_type)
            if entry is None:
                continue
            rate = _figure(entry, "throughput_rps")
            found += [
                _verdict(f"{job} throughput >= fastest of Quix and bytewax", model_type,
                         _ratio(rate, fastest_peer), 1.0, "x", at_most=False),
                _verdict(f"{job} throughput >= 0.5x confluent-loop, 2 processes", model_type,
                         _ratio(rate, loop), 0.5, "x", at_most=False),
                _verdict(f"{job} p50 at half load <= 20 ms", model_type, _figure(entry, "p50_ms"),
                         P50_GOAL_MS, "ms", at_most=True),
                _verdict(f"{job} p99 at half load <= 50 ms", model_type, _figure(entry, "p99_ms"),
                         P99_GOAL_MS, "ms", at_most=True)]
    switches = _switch_entries(results)
    for job in _in_order([entry.get("system") for entry in switches if entry.get("system")], JOBS):
        for model_type in SWITCH_MODEL_TYPES:
            entry = next((entry for entry in switches
                          if entry.get("system") == job and entry.get("model_type") == model_type), None)
            found.append(_verdict(f"{job}: new inline model serving within 1 s", model_type,
                                  _figure(entry, "model_switch_ms"), SWITCH_GOAL_MS, "ms", at_most=True))
    return found


def _verdict(target: str, model_type: str, value: float | None, goal: float, unit: str,
             at_most: bool) -> _Target:
    if value is None:
        met, by = None, "not measured"
    else:
        met = value <= goal if at_most else value >= goal
        by = _met_text(value, unit) if met else _missed_text(value, goal, unit, at_most)
    return _Target({"target": target, "model_type": model_type, "value": value, "goal": goal,
                    "met": met, "by": by}, unit, at_most)


def _met_text(value: float, unit: str) -> str:
    return f"met ({_ms_whole(value)} ms)" if unit == "ms" else f"met ({_times(value)})"


def _missed_text(value: float, goal: float, unit: str, at_most: bool) -> str:
    if unit == "ms":
        return f"missed by {_ms_whole(value - goal)} ms"
    shortfall = (value - goal) / goal if at_most else (goal - value) / goal
    percent = f"{shortfall * 100:.0f}%" if shortfall >= 0.005 else "<1%"
    return f"missed by {percent} ({_times(value)} of {goal:g}x)"


# ----------------------------------------------------------------------------------------------
# Formatting

def _formatted(value, spec: str, suffix: str = "") -> str:
    number = _number(value)
    return DASH if number is None else f"{number:{spec}}{suffix}"


def _rate(value) -> str:
    return _formatted(value, ",.0f")


def _ms(value) -> str:
    return _formatted(value, ",.1f")


_ms_whole = _rate


def _cores(value) -> str:
    return _formatted(value, ".2f")


def _times(value) -> str:
    return _formatted(value, ".2f", "x")


def _cell(value) -> str:
    """Table cells must stay on one line and must not open a new column."""
    text = "" if value is None else str(value)
    return " ".join(text.split()).replace("|", "\\|")


def _table(header: Sequence[str], rows: Iterable[Sequence], numeric: Iterable[int]) -> list[str]:
    """Numeric columns right-aligned so magnitudes compare at a glance."""
    numeric = set(numeric)
    aligns = ["--:" if column in numeric else ":--" for column in range(len(header))]
    lines = ["| " + " | ".join(_cell(name) for name in header) + " |", "| " + " | ".join(aligns) + " |"]
    lines += ["| " + " | ".join(_cell(value) or DASH for value in row) + " |" for row in rows]
    return lines


def _details(mapping) -> str:
    if not isinstance(mapping, dict) or not mapping:
        return DASH
    return ", ".join(f"{key} {value}" for key, value in mapping.items())


def _machine(machine) -> str:
    if not isinstance(machine, dict) or not machine:
        return DASH
    parts = []
    if machine.get("cores") is not None:
        parts.append(f"{machine['cores']} cores")
    if machine.get("memory_gib") is not None:
        parts.append(f"{machine['memory_gib']} GiB memory")
    parts += [str(machine[key]) for key in ("cpu", "platform") if machine.get(key)]
    parts += [f"{key} {value}" for key, value in machine.items()
              if key not in ("cores", "memory_gib", "cpu", "platform")]
    return ", ".join(parts)


# ----------------------------------------------------------------------------------------------
# The page

def markdown(results: dict) -> str:
    """The whole results page; plots are linked relatively, so it must sit next to them."""
    lines = ["# Benchmark results", ""]
    lines.append(f"Created {results.get('created') or 'at an unknown time'}; "
                 f"{'quick' if results.get('quick') else 'full'} run; "
                 f"{results.get('runs', DASH)} runs per figure.")
    lines += ["", f"- Machine: {_machine(results.get('machine'))}",
              f"- Versions: {_details(results.get('versions'))}", "", "Settings:", ""]
    settings = results.get("settings")
    lines += [f"- {key}: {value}" for key, value in settings.items()] if isinstance(settings, dict) and settings \
        else [f"- {DASH}"]
    if results.get("method"):
        lines += ["", "## Method", "", str(results["method"]).strip()]
    lines += ["", *_throughput_section(results)]
    lines += ["", *_ratios_section(results)]
    lines += ["", *_switch_section(results)]
    lines += ["", *_targets_section(results)]
    experiments = [entry for entry in results.get("experiments") or [] if isinstance(entry, dict)]
    if experiments:
        lines += ["", *_experiments_section(experiments)]
    profiles = [entry for entry in results.get("profiles") or [] if isinstance(entry, dict)]
    if profiles:
        lines += ["", *_profiles_section(profiles)]
    lines += ["", "## Plots", "", "![throughput](throughput.png)", "", "![latency](latency.png)", "",
              "![CPU per record](cpu.png)", "", "![model switch](model_switch.png)", ""]
    return "\n".join(lines)


def _throughput_section(results: dict) -> list[str]:
    rows, notes, lower_bounds = [], [], False
    for model_type in _model_types(results, include_none=True):
        in_type = [entry for entry in _entries(results) if entry.get("model_type") == model_type]
        for system in _in_order([entry.get("system") or DASH for entry in in_type], SYSTEMS):
            entry = next(entry for entry in in_type if (entry.get("system") or DASH) == system)
            rate = _rate(entry.get("throughput_rps"))
            if entry.get("limited_by") and rate != DASH:
                rate, lower_bounds = f"{AT_LEAST} {rate}", True
            rows.append((model_type, system, rate, _ms(entry.get("p50_ms")), _ms(entry.get("p95_ms")),
                         _ms(entry.get("p99_ms")), _rate(entry.get("latency_rate_rps")),
                         _ms(entry.get("cpu_us_per_record")), _cores(entry.get("cpu_cores"))))
            if entry.get("note"):
                notes.append(f"- {system}, {model_type}: {_cell(entry['note'])}")
            if entry.get("limited_by"):
                notes.append(f"- {system}, {model_type}: limited by the {_cell(entry['limited_by'])}, "
                             "so the rate is a lower bound")
    lines = ["## Throughput and latency", "",
             "The highest rate each system sustained, and its latency when fed at about half that rate "
             "(the \"at rate\" column). CPU: what the system's processes (a job's JVM and Python workers, "
             "a peer's processes) used during its sustained trial, per record answered, and as cores busy "
             "on average; the load generator, the collector and the broker are not counted.", ""]
    lines += _table(("model type", "system", "highest sustainable rate (records/s)", "p50 ms", "p95 ms",
                     "p99 ms", "at rate (records/s)", "CPU µs/record", "CPU cores"), rows, numeric=range(2, 9))
    if lower_bounds:
        lines += ["", f"{AT_LEAST}: the input generator, not the system, was the bottleneck."]
    if notes:
        lines += ["", "Notes:", "", *notes]
    return lines


def _ratios_section(results: dict) -> list[str]:
    rows = [(row["system"], row["model_type"], _times(row["vs_plain_loop"]), _times(row["vs_pass_through"]),
             _times(row["vs_in_process"])) for row in ratios(results)]
    return ["## Ratios", "", "Each job's highest sustainable rate divided by the baseline's.", "",
            *_table(("job", "model type", "vs plain loop", "vs pass-through", "vs in-process"), rows,
                    numeric=range(2, 5))]


def _switch_entries(results: dict) -> list[dict]:
    return [entry for entry in results.get("model_switch") or [] if isinstance(entry, dict)]


def _switch_section(results: dict) -> list[str]:
    rows = []
    for entry in _switch_entries(results):
        runs = [_ms_whole(run) for run in entry.get("runs_ms") or []]
        rows.append((entry.get("system") or DASH, entry.get("model_type") or DASH,
                     _ms_whole(entry.get("model_switch_ms")), ", ".join(runs) or DASH))
    return ["## Model switch", "",
            "Time from publishing a new inline model until records are scored by it.", "",
            *_table(("job", "model type", "median ms", "runs (ms)"), rows, numeric=(2,))]


def _targets_section(results: dict) -> list[str]:
    rows = []
    for target in _targets(results):
        row = target.row
        if target.unit == "ms":
            value = DASH if row["value"] is None else f"{_ms_whole(row['value'])} ms"
            goal = f"{_ms_whole(row['goal'])} ms"
        else:
            value, goal = _times(row["value"]), f"{row['goal']:g}x"
        rows.append((row["target"], row["model_type"], value, f"{'≤' if target.at_most else '≥'} {goal}",
                     row["by"]))
    return ["## Targets", "", *_table(("target", "model type", "value", "goal", "verdict"), rows, numeric=(2, 3))]


def _experiments_section(experiments: list[dict]) -> list[str]:
    rows = [(entry.get("setting") or DASH, entry.get("value"), entry.get("system"), entry.get("model_type"),
             _rate(entry.get("throughput_rps")), _ms(entry.get("p50_ms")), _ms(entry.get("p99_ms")),
             entry.get("note") or "") for entry in experiments]
    return ["## Tuning experiments", "",
            "One setting changed at a time from the settings above.", "",
            *_table(("setting", "value", "system", "model type", "throughput (records/s)", "p50 ms", "p99 ms",
                     "note"), rows, numeric=range(4, 7))]


def _profiles_section(profiles: list[dict]) -> list[str]:
    lines = ["## Profiles", "",
             "py-spy samples (200/s, all threads) of each system's Python processes during its "
             "first sustain trial: where the samples fell, and the functions most often on top "
             "of the stack. Raw stacks are in `profiles/`.", ""]
    for entry in profiles:
        areas = ", ".join(f"{name} {share:.0f}%" for name, share in (entry.get("areas") or {}).items())
        top = "; ".join(f"`{name}` {share:.0f}%" for name, share in (entry.get("self") or [])[:6])
        lines.append(f"- **{entry.get('system')}** {entry.get('model_type')}, process {entry.get('pid')} "
                     f"({entry.get('samples', 0)} samples at {_rate(entry.get('rate_rps'))} records/s): "
                     f"{areas or DASH}. Top: {top or DASH}.")
    return lines


# ----------------------------------------------------------------------------------------------
# Plots

def _pyplot():
    """Agg, because benchmarks run on headless machines where an interactive backend would fail."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _compact(value: float) -> str:
    if value >= 10_000:
        return f"{value / 1000:,.0f}k"
    if value >= 1000:
        return f"{value / 1000:.1f}k"
    return f"{value:.0f}"


def _save(plt, fig, path: Path) -> Path:
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return Path(path)


def _no_data(ax, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what} measured", ha="center", va="center", transform=ax.transAxes, color="grey")


def _bars(ax, results: dict, field: str, hatch_lower_bounds: bool, text) -> tuple[list[str], list[float]]:
    """One group of bars per model type, one bar per system (pass-through excluded), each
    labelled with ``text(value)``; returns the model types (the x axis) and the values drawn."""
    model_types = _in_order(_model_types(results), MODEL_TYPES) or list(MODEL_TYPES)
    systems = _in_order([entry.get("system") for entry in _entries(results)
                         if entry.get("system") and entry.get("system") != PASS_THROUGH], BAR_SYSTEMS)
    width = 0.8 / max(len(systems), 1)
    plotted, labelled = [], set()
    for index, system in enumerate(systems):
        for position, model_type in enumerate(model_types):
            entry = _entry(results, system, model_type)
            value = _figure(entry, field)
            if value is None or value <= 0:
                continue
            lower_bound = hatch_lower_bounds and bool(entry.get("limited_by"))
            x = position - 0.4 + width * (index + 0.5)
            ax.bar(x, value, width, color=SYSTEM_COLOURS.get(system, f"C{index + 4}"),
                   hatch="//" if lower_bound else None, edgecolor="white" if lower_bound else None,
                   label=None if system in labelled else system)
            labelled.add(system)
            ax.text(x, value, (AT_LEAST if lower_bound else "") + text(value), ha="center", va="bottom",
                    fontsize=7)
            plotted.append(value)
    return model_types, plotted


def _pass_through_line(ax, results: dict, field: str, plotted: list[float]) -> None:
    """The pass-through job's figure (it scores nothing) as a dashed line across the groups."""
    value = _figure(_pass_through(results), field)
    if value is not None and value > 0:
        ax.axhline(value, color=SYSTEM_COLOURS[PASS_THROUGH], linestyle="--", label="pass-through (no scoring)")
        plotted.append(value)


def _bar_axes(ax, model_types: list[str], plotted: list[float], what: str, unit: str, title: str) -> None:
    if plotted and max(plotted) / min(plotted) > 50:
        ax.set_yscale("log")
    if not plotted:
        _no_data(ax, what)
    ax.set_xticks(range(len(model_types)), model_types)
    ax.set_xlim(-0.5, len(model_types) - 0.5)
    ax.set_xlabel("model type")
    ax.set_ylabel(unit + (" (log scale)" if ax.get_yscale() == "log" else ""))
    ax.set_title(title)


def plot_throughput(results: dict, path: Path) -> Path:
    """Grouped bars per model type, with the pass-through job as the ceiling a scoring job can reach."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=FIGURE_SIZE)
    model_types, plotted = _bars(ax, results, "throughput_rps", True, _compact)
    _pass_through_line(ax, results, "throughput_rps", plotted)
    _bar_axes(ax, model_types, plotted, "throughput", "records/s", "Highest sustainable rate")
    if plotted:
        ax.legend(fontsize=8, title=f"{AT_LEAST} hatched: input-limited" if _any_lower_bound(results) else None,
                  title_fontsize=8)
    fig.tight_layout()
    return _save(plt, fig, path)


def plot_cpu(results: dict, path: Path) -> Path:
    """CPU per record of each system during its sustained trial (lower is better), with the
    pass-through job's (no scoring) as a line."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=FIGURE_SIZE)
    model_types, plotted = _bars(ax, results, "cpu_us_per_record", False, lambda v: f"{v:,.0f}")
    _pass_through_line(ax, results, field="cpu_us_per_record", plotted=plotted)
    _bar_axes(ax, model_types, plotted, "CPU", "CPU µs per record",
              "CPU per record at the highest sustainable rate (lower is better)")
    if plotted:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(plt, fig, path)


def _any_lower_bound(results: dict) -> bool:
    return any(entry.get("limited_by") for entry in _entries(results))


def plot_latency(results: dict, path: Path) -> Path:
    """One panel per model type, since latencies of different formats differ by orders of magnitude."""
    plt = _pyplot()
    percentiles = ("p50_ms", "p95_ms", "p99_ms")
    model_types = _in_order(_model_types(results), MODEL_TYPES) or list(MODEL_TYPES)
    columns = 2 if len(model_types) > 1 else 1
    rows = math.ceil(len(model_types) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(FIGURE_SIZE[0], max(FIGURE_SIZE[1], 3.2 * rows)),
                             squeeze=False)
    pass_through = _pass_through(results)
    for ax, model_type in zip(axes.flat, model_types):
        groups = []
        for system in _in_order([entry.get("system") for entry in _entries(results)
                                 if entry.get("model_type") == model_type and entry.get("system")
                                 and entry.get("system") != PASS_THROUGH], BAR_SYSTEMS):
            entry = _entry(results, system, model_type)
            if any(_figure(entry, percentile) is not None for percentile in percentiles):
                groups.append((system, entry))
        if pass_through is not None and any(_figure(pass_through, p) is not None for p in percentiles):
            groups.append(("pass-through\n(no scoring)", pass_through))
        width = 0.8 / len(percentiles)
        for position, (_, entry) in enumerate(groups):
            for index, percentile in enumerate(percentiles):
                value = _figure(entry, percentile)
                if value is None:
                    continue
                ax.bar(position - 0.4 + width * (index + 0.5), value, width,
                       color=PERCENTILE_COLOURS[percentile], label=percentile.removesuffix("_ms"))
        if not groups:
            _no_data(ax, "latency")
        ax.set_xticks(range(len(groups)), [label for label, _ in groups], fontsize=8)
        ax.set_title(model_type, fontsize=10)
        ax.set_ylabel("ms")
    for ax in list(axes.flat)[len(model_types):]:
        ax.set_visible(False)
    handles = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    if handles:
        fig.legend(handles.values(), handles.keys(), loc="upper right", fontsize=8)
    fig.suptitle("Latency at half the sustainable rate")
    fig.tight_layout(rect=(0, 0, 0.92, 1))
    return _save(plt, fig, path)


def plot_model_switch(results: dict, path: Path) -> Path:
    """Per job, how long a newly published inline model takes to serve, against the 1 s target."""
    plt = _pyplot()
    switches = [entry for entry in _switch_entries(results)
                if entry.get("system") and entry.get("model_type")]
    jobs = _in_order([entry["system"] for entry in switches], JOBS)
    model_types = _in_order([entry["model_type"] for entry in switches], MODEL_TYPES)
    fig, ax = plt.subplots(figsize=FIGURE_SIZE)
    width = 0.8 / max(len(model_types), 1)
    plotted = False
    for index, model_type in enumerate(model_types):
        for position, job in enumerate(jobs):
            entry = next((entry for entry in switches
                          if entry["system"] == job and entry["model_type"] == model_type), None)
            value = _figure(entry, "model_switch_ms")
            x = position - 0.4 + width * (index + 0.5)
            if value is None:
                ax.text(x, 0, "not\nmeasured", ha="center", va="bottom", fontsize=8, color="grey")
                continue
            ax.bar(x, value, width, color=f"C{index}", label=model_type)
            ax.text(x, value, f"{value:,.0f}", ha="center", va="bottom", fontsize=8)
            plotted = True
    ax.axhline(SWITCH_GOAL_MS, color="black", linestyle="--", label="1 s target")
    if not plotted:
        _no_data(ax, "model switch")
    ax.set_xticks(range(len(jobs)), jobs)
    ax.set_xlim(-0.5, max(len(jobs), 1) - 0.5)
    ax.set_xlabel("job")
    ax.set_ylabel("ms until the new model serves")
    ax.set_title("Model switch time")
    handles = {}
    for handle, label in zip(*ax.get_legend_handles_labels()):
        handles.setdefault(label, handle)
    ax.legend(handles.values(), handles.keys(), fontsize=8)
    fig.tight_layout()
    return _save(plt, fig, path)
