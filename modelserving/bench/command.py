"""``modelserving bench``: registered through the ``modelserving.commands`` entry point, so
the CLI never imports the benchmark (nor its optional dependencies) to build its parser."""
from __future__ import annotations

from pathlib import Path

from modelserving.cli.common import settings_of, with_settings
from modelserving.errors import UsageError
from modelserving.paths import var_dir
from udfs.runtimes import FORMAT_NAMES

from modelserving.bench import JOBS, SYSTEMS


def subset(text: str, known: tuple[str, ...]) -> tuple[str, ...]:
    chosen = tuple(part for part in text.split(",") if part)
    unknown = set(chosen) - set(known)
    if unknown:
        raise UsageError(f"unknown: {', '.join(sorted(unknown))} (known: {', '.join(known)})")
    return chosen


def cmd_bench(args) -> int:
    settings = settings_of(args)
    if settings.parallelism == 0:
        settings = settings.replace(parallelism=2)  # one per core here; fixed, to compare runs
    if args.serving_patterns:
        return cmd_serving_patterns(args, settings)
    from modelserving.bench.runner import run_bench

    results = run_bench(args.out, var_dir() / "bench" / "work", args.quick, settings,
                        subset(args.systems, SYSTEMS), subset(args.formats, FORMAT_NAMES),
                        args.experiments, subset(args.profile, FORMAT_NAMES))
    print(f"{len(results['results'])} results in {results['elapsed_s']} s; see {args.out}/results.md")
    return 0


def cmd_serving_patterns(args, settings) -> int:
    from modelserving.bench.serving_patterns import run_serving_patterns, summary_lines

    out = var_dir() / "bench" / "serving-patterns"
    report = run_serving_patterns(out, out / "work", settings, args.quick,
                                  subset(args.jobs, JOBS))
    print("\n".join(summary_lines(report)))
    print(f"in {report['elapsed_s']} s; see {out / 'results.json'}")
    return 0 if all("failed" not in job for job in report["jobs"].values()) else 1


def register(sub) -> None:
    bench = with_settings(sub.add_parser(
        "bench", help="throughput, latency and model switches of every system, side by side "
        "(job settings after the options tune the jobs under test)"))
    bench.add_argument("--quick", action="store_true", help="shorter trials: under 10 minutes")
    bench.add_argument("--out", type=Path, default=var_dir() / "bench" / "latest",
                       help="where the JSON, Markdown table and plots go")
    bench.add_argument("--systems", default=",".join(SYSTEMS),
                       help=f"comma-separated subset of {','.join(SYSTEMS)}")
    bench.add_argument("--formats", default=",".join(FORMAT_NAMES),
                       help=f"comma-separated subset of {','.join(FORMAT_NAMES)}")
    bench.add_argument("--experiments", action="store_true",
                       help="also measure each tuning choice (execution mode, bundles, batching, "
                       "chaining) on the keyed job")
    bench.add_argument("--profile", default="",
                       help="comma-separated model formats whose first sustain trial is profiled "
                       "with py-spy (every system's Python workers)")
    bench.add_argument("--serving-patterns", action="store_true",
                       help="instead: the external path (embedded ONNX against the same model "
                       "in MLServer) and a speculative run (a 50 ms budget, one model 200 ms "
                       "slow); writes var/bench/serving-patterns/results.json")
    bench.add_argument("--jobs", default="keyed",
                       help=f"with --serving-patterns: comma-separated subset of {','.join(JOBS)}")
    bench.set_defaults(func=cmd_bench)
