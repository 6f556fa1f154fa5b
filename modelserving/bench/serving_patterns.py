"""``modelserving bench --serving-patterns``: the external path and speculative execution
measured (issue 12, part 4), each job on one local broker, MLServer on the same machine.

Per job (its own local Flink, parallelism 2 unless the settings say otherwise):

1. **Embedded against external.** The demo logistic regression serves one data type
   embedded (ONNX) and another through MLServer (EXTERNAL, Open Inference Protocol V2); it
   is the same model (same data, split and seed). After a warm-up and a flat-out soak, per
   round and path: the output rate of a burst sent flat out (results per second once warm),
   then p50/p99 latency at a fixed input rate. Rounds alternate the order of the paths;
   then once per path, p50/p99 at a few more rates (``Plan.sweep``). Each fixed-rate trial
   also gives the records per batch (results of one batch share subtask, serving time and
   per-record scoring time) and the median latency of each quarter (a growing backlog).
2. **Speculative.** One data type has a fast model (the ONNX model, modelId ``fast``) and a
   slow one (the same MLServer model behind ``DelayProxy``, which adds 200 ms: modelId
   ``slow``). First the fast model alone (the latest installed serves alone) at a moderate
   fixed rate: the baseline. Then the set ``[slow, fast]``, PREFERRED, budget 50 ms (the slow
   model would win if it answered in time), at the same rate: end-to-end p50/p99, the join's
   own wait (``speculative.waitedMicros`` of each result, batch arrival to decision), the
   share of results each model won, and what the records that got no result became.

Latency = the result's broker append time minus the record's creation time; the first 25% of
a trial's records are warm-up and left out (``workload``). MLServer, the proxy, the broker,
the load generator and the job share the machine's cores. Figures are reported against the
issue's targets, never asserted. Writes ``results.json`` (and a timestamped copy) under
``var/bench/serving-patterns/`` and prints a summary.
"""
from __future__ import annotations

import datetime
import fcntl
import json
import logging
import shutil
import statistics
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from jobs import JOB_MODULES
from jobs.settings import Settings
from modelserving.bench import workload
from modelserving.bench.delay_proxy import DelayProxy
from modelserving.bench.workload import (WARM_UP_FRACTION, RecordTemplate, ResultCollector, Sent,
                                         Trial, fill_trial, new_producer, produce)
from protos import DataRecord, DeadLetter, ModelDescriptor, ServingResult, SpeculativeSet

log = logging.getLogger("bench")

EMBEDDED, EXTERNAL = "embedded ONNX", "EXTERNAL via MLServer"
PATH_TYPES = {EMBEDDED: "sp-embedded", EXTERNAL: "sp-external"}
SPECULATIVE_TYPE = "sp-speculative"
FAST, SLOW = "fast", "slow"
SLOW_DELAY_MS = 200
BUDGET_MS = 50
#: The issue's target for a speculative result: within the budget plus this.
TARGET_SLACK_MS = 20
EXTERNAL_NAME = "wine-cultivar-logreg-mlserver"
SLOW_NAME = "wine-cultivar-logreg-mlserver-200ms"


@dataclass(frozen=True)
class Plan:
    burst: int = 20_000              # records of a flat-out burst
    rate: float = 1000.0             # records/s of the fixed-rate latency trials (both paths)
    trial_s: float = 10.0            # length of a fixed-rate trial
    rounds: int = 2                  # embedded/external rounds, alternating the order
    sweep: tuple[float, ...] = (250.0, 500.0, 2000.0)   # more fixed rates, both paths, once
    sweep_s: float = 5.0
    soak_s: float = 30.0             # flat-out load on both paths before any figure
    speculative_rate: float = 200.0  # records/s of the speculative run and its baseline
    speculative_s: float = 20.0      # length of each of those two trials
    quick: bool = False

    @classmethod
    def quick_plan(cls) -> "Plan":
        return cls(burst=6000, trial_s=5.0, rounds=1, sweep=(250.0,), soak_s=10.0,
                   speculative_s=10.0, quick=True)


# -- pure figures ------------------------------------------------------------------------------

def nearest_rank(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile as ``Trial.percentile`` takes it (nearest rank, no interpolation)."""
    ordered = sorted(values)
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def distribution(values: Sequence[float], digits: int = 1) -> dict:
    """Count, p50/p90/p99, max and mean of ``values``, rounded; Nones when empty."""
    values = list(values)

    def rounded(v):
        return None if v is None else round(v, digits)
    return {"n": len(values), "p50": rounded(nearest_rank(values, 50)),
            "p90": rounded(nearest_rank(values, 90)), "p99": rounded(nearest_rank(values, 99)),
            "max": rounded(max(values) if values else None),
            "mean": rounded(statistics.fmean(values) if values else None)}


def after_warm_up(items: Sequence) -> list:
    """The measured part of a trial's items in creation order (as ``Trial.measured``)."""
    return list(items[int(len(items) * WARM_UP_FRACTION):])


def speculative_summary(results: Iterable[ServingResult], budget_ms: int,
                        slack_ms: int = TARGET_SLACK_MS) -> dict:
    """What the speculative results say: the join's wait (``waitedMicros``) per result in ms,
    how many waited past the budget and past budget + slack, the share of results each model
    won, and per model how often it answered and timed out."""
    results = list(results)
    decided = [r for r in results if r.HasField("speculative")]
    waited = [r.speculative.waitedMicros / 1000 for r in decided]
    wins = Counter(r.modelId for r in decided)
    answered = Counter(m for r in decided for m in r.speculative.answered)
    timed_out = Counter(m for r in decided for m in r.speculative.timedOut)
    failed = Counter(m.split(":", 1)[0] for r in decided for m in r.speculative.failed)
    total = len(decided)
    return {
        "results": len(results), "decided_speculatively": total,
        "budgets_seen": sorted({r.speculative.budgetMs for r in decided}),
        "waited_ms": distribution(waited),
        "waited_at_least_budget": sum(w >= budget_ms for w in waited),
        "waited_over_budget_plus_slack": sum(w > budget_ms + slack_ms for w in waited),
        "wins": {m: {"results": n, "share": round(n / total, 4)} for m, n in sorted(wins.items())},
        "answered": dict(sorted(answered.items())), "timed_out": dict(sorted(timed_out.items())),
        "failed": dict(sorted(failed.items())),
    }


def batch_count(results: Iterable[ServingResult]) -> int:
    """How many batches the results came in: the results of one batch share the serving
    subtask, the time it was served (ms) and the per-record scoring time."""
    return len({(r.subtask, r.servedMs, r.scoringMicros) for r in results
                if r.status == ServingResult.SCORED})


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if not numerator or not denominator:
        return None
    return round(numerator / denominator, 3)


def against_targets(job_report: dict, budget_ms: int = BUDGET_MS,
                    slack_ms: int = TARGET_SLACK_MS) -> list[dict]:
    """The issue's targets, each with the figure and whether this run met it (None: no
    figure). ``job_report`` is what ``measure_job`` returns."""
    paths = job_report.get("paths", {})
    embedded = paths.get(EMBEDDED, {}).get("output_rate_median")
    external = paths.get(EXTERNAL, {}).get("output_rate_median")
    share = ratio(external, embedded)
    spec = job_report.get("speculative", {})
    limit = budget_ms + slack_ms
    waited_p99 = spec.get("summary", {}).get("waited_ms", {}).get("p99")
    e2e_p99 = spec.get("latency", {}).get("p99_ms")
    base_p99 = spec.get("baseline", {}).get("p99_ms")
    added = None if e2e_p99 is None or base_p99 is None else e2e_p99 - base_p99

    def met(value, ok):
        return None if value is None else bool(ok(value))
    return [
        {"target": "external output rate >= 1/2 of embedded", "figure": share,
         "met": met(share, lambda v: v >= 0.5)},
        {"target": f"speculative: the join's wait p99 <= {limit} ms", "figure": waited_p99,
         "met": met(waited_p99, lambda v: v <= limit)},
        {"target": f"speculative: end-to-end p99 <= {limit} ms", "figure": e2e_p99,
         "met": met(e2e_p99, lambda v: v <= limit)},
        {"target": f"speculative: end-to-end p99 minus the fast model alone's <= {limit} ms",
         "figure": added, "met": met(added, lambda v: v <= limit)},
    ]


# -- collecting --------------------------------------------------------------------------------

@dataclass
class Collected:
    """A trial's figures (``workload.Trial``) and its results, in creation order."""
    trial: Trial
    results: list[ServingResult] = field(default_factory=list)
    dead_letters: int = 0
    dead_reasons: dict[str, int] = field(default_factory=dict)

    def latency(self) -> dict:
        t = self.trial
        n = len(t.latencies_ms)
        quarters = [t.latencies_ms[i * n // 4:(i + 1) * n // 4] for i in range(4)]
        batches = batch_count(self.results)
        return {"sent": t.sent.count, "received": t.received, "unscored": t.unscored,
                "dead_letters": self.dead_letters, "rate_rps": t.sent.rate,
                "achieved_rate_rps": round(t.sent.achieved_rate),
                "p50_ms": t.percentile(50), "p90_ms": t.percentile(90),
                "p99_ms": t.percentile(99), "models": dict(t.model_versions),
                "quarter_p50_ms": [nearest_rank(q, 50) for q in quarters],
                "latency_grows": t.latency_grows(), "batches": batches,
                "records_per_batch": round(len(self.results) / batches, 2) if batches else None}


def collect(results: ResultCollector, dead: ResultCollector, sent: Sent,
            timeout_s: float) -> Collected:
    """As ``workload.wait_for_trial``, keeping each result (``modelId``, ``speculative``)
    and counting the trial's dead letters; a record ends on one of the two topics."""
    prefix = sent.trial + "-"
    by_index: dict[int, tuple[int, ServingResult]] = {}
    dead_ids: set[str] = set()
    reasons: Counter = Counter()
    deadline = sent.finished + timeout_s
    while True:
        for appended, raw in results.take():
            result = ServingResult.FromString(raw)
            if result.recordId.startswith(prefix):
                by_index.setdefault(int(result.recordId[len(prefix):]), (appended, result))
        for _, raw in dead.take():
            letter = DeadLetter.FromString(raw)
            try:
                record_id = DataRecord.FromString(letter.raw).id
            except Exception:   # noqa: BLE001 - not one of ours
                continue
            if record_id.startswith(prefix) and record_id not in dead_ids:
                dead_ids.add(record_id)
                reasons[f"{DeadLetter.Kind.Name(letter.kind)}: {letter.reason[:160]}"] += 1
        if len(by_index) + len(dead_ids) >= sent.count or time.time() > deadline:
            break
        time.sleep(0.05)
    trial = Trial(sent)
    kept = fill_trial(trial, by_index)
    return Collected(trial, kept, len(dead_ids), dict(reasons.most_common(5)))


# -- running -----------------------------------------------------------------------------------

def speculative_set(data_type: str, models: Sequence[str], budget_ms: int) -> ModelDescriptor:
    descriptor = ModelDescriptor(name=f"speculative-{data_type}", dataType=data_type,
                                 version="1")
    descriptor.speculative.CopyFrom(SpeculativeSet(models=list(models), budgetMs=budget_ms,
                                                   decider=SpeculativeSet.PREFERRED))
    return descriptor


class JobUnderTest:
    """One job on the bench's broker: its topics, collectors and process."""

    def __init__(self, job: str, bench: "ServingPatterns"):
        self.job, self.bench = job, bench
        tag = f"{bench.run_id}-{job}"
        self.settings = bench.kafka_settings.replace(
            data_topic=f"{tag}-data", models_topic=f"{tag}-models",
            results_topic=f"{tag}-results", dead_letter_topic=f"{tag}-dead-letters",
            state_topic=f"{tag}-state", repository_topic=f"{tag}-repository",
            data_starting_offsets="earliest", group_id="",
            job_name="", model_dirs=(str(bench.models_dir),),
            model_servers=(bench.mlserver.url, bench.proxy.url)).for_job(f"bench-sp-{job}")
        self.log_path = bench.work_dir / job / "job.log"
        self.results: ResultCollector | None = None
        self.dead: ResultCollector | None = None
        self.process = None
        self.counter = 0

    def start(self) -> None:
        from modelserving.kafka.admin import ensure_topics
        from modelserving.local.job_process import JobProcess

        s = self.settings
        ensure_topics(s, [s.data_topic, s.models_topic, s.dead_letter_topic, s.results_topic],
                      compacted=[s.state_topic, s.repository_topic], partitions=2,
                      configs={s.results_topic: workload.result_topic_configs()})
        self.results = ResultCollector(s, s.results_topic)
        self.dead = ResultCollector(s, s.dead_letter_topic)
        for collector in (self.results, self.dead):
            collector.start()
            if not collector.ready.wait(30):
                raise RuntimeError(f"no assignment for {collector.name}")
        self.process = JobProcess(JOB_MODULES[self.job], s, self.log_path)
        self.process.start()

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
        for collector in (self.results, self.dead):
            if collector is not None:
                collector.stop()

    def publish(self, descriptor: ModelDescriptor) -> None:
        descriptor.publishedMs = int(time.time() * 1000)
        producer = self.bench.producer
        producer.produce(self.settings.models_topic, key=descriptor.dataType.encode(),
                         value=descriptor.SerializeToString())
        producer.flush(30)

    def trial(self, data_type: str, count: int, rate: float, timeout_s: float = 60) -> Collected:
        self.counter += 1
        template = RecordTemplate(data_type, self.bench.rows)
        sent = produce(self.bench.producer, self.settings.data_topic, template,
                       f"p{self.counter}{data_type[3:6]}", max(count, 40), rate)
        return collect(self.results, self.dead, sent, timeout_s)

    def until(self, data_type: str, accept, what: str, timeout_s: float = 240) -> Collected:
        """Small trials until one comes back whole and ``accept`` takes its results."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            got = self.trial(data_type, 200, 200, timeout_s=20)
            if got.trial.complete and got.trial.unscored == 0 and got.results and \
                    all(accept(r) for r in got.results):
                return got
            log.info("%s %s: waiting for %s (%d results, %d dead letters)", self.job, data_type,
                     what, got.trial.received, got.dead_letters)
        raise RuntimeError(f"{self.job}: no complete trial of {data_type} with {what} in "
                           f"{timeout_s:.0f} s (see {self.log_path.parent})")


class ServingPatterns:
    def __init__(self, out_dir: Path, work_dir: Path, plan: Plan, settings: Settings,
                 jobs: Sequence[str]):
        from modelserving.demo.training import demo_rows

        self.out_dir, self.work_dir, self.plan = Path(out_dir), Path(work_dir), plan
        self.settings, self.jobs = settings, tuple(jobs)
        self.run_id = "sp-" + time.strftime("%H%M%S")
        self.models_dir = self.work_dir / "models"
        self.rows = [dict(zip(r.names, r.values)) for r in demo_rows()]
        self.kafka_settings: Settings | None = None
        self.producer = None
        self.mlserver = None
        self.proxy: DelayProxy | None = None
        self.onnx = None

    def run(self) -> dict:
        from modelserving.bench.runner import machine, versions
        from modelserving.demo.training import train_all
        from modelserving.local.kafka_broker import LocalKafka
        from modelserving.local.mlserver import LocalMLServer
        from modelserving.local.processes import free_port_range, free_ports
        from protos import ModelType

        started = time.monotonic()
        self.work_dir.mkdir(parents=True, exist_ok=True)
        lock = open(self.work_dir / ".lock", "w")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SystemExit(f"another serving-patterns bench is running in {self.work_dir}") from None
        shutil.rmtree(self.models_dir, ignore_errors=True)
        self.onnx = next(m for m in train_all(self.models_dir) if m.model_type == ModelType.ONNX)
        report = {"created": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                  "plan": asdict(self.plan), "machine": machine(), "versions": versions(),
                  "settings": {k: getattr(self.settings, k) for k in (
                      "parallelism", "batch_max_size", "batch_max_wait_ms", "bundle_time_ms",
                      "buffer_timeout_ms", "python_execution_mode", "model_server_timeout_ms",
                      "model_server_max_in_flight", "checkpoint_interval_ms")},
                  "slow_delay_ms": SLOW_DELAY_MS, "budget_ms": BUDGET_MS,
                  "method": __doc__.split("\n\n", 1)[1].strip(), "jobs": {}}
        kafka_dir = self.work_dir / "kafka"
        shutil.rmtree(kafka_dir, ignore_errors=True)
        port, controller = free_ports(2)
        with LocalKafka(kafka_dir, port=port, controller_port=controller, heap="512m",
                        die_with_parent=True) as kafka, \
                LocalMLServer(self.work_dir / "mlserver", port=free_port_range(3)[0]) as mlserver, \
                DelayProxy(mlserver.url, SLOW_DELAY_MS / 1000) as proxy:
            self.mlserver, self.proxy = mlserver, proxy
            self.kafka_settings = kafka.client_settings(self.settings)
            self.producer = new_producer(self.kafka_settings)
            try:
                for job in self.jobs:
                    try:
                        report["jobs"][job] = self.measure_job(job)
                    except Exception as exc:   # the other job still gets measured
                        log.exception("%s failed", job)
                        report["jobs"][job] = {"failed": f"{type(exc).__name__}: {exc}"}
                    report["jobs"][job]["targets"] = against_targets(report["jobs"][job])
            finally:
                self.producer.flush(30)
                self.producer = None
            report["proxy_calls"] = proxy.calls
        report["elapsed_s"] = round(time.monotonic() - started, 1)
        return report

    def descriptors(self) -> dict[str, ModelDescriptor]:
        from modelserving.demo.training import descriptor_for

        embedded = descriptor_for(self.onnx, PATH_TYPES[EMBEDDED])
        external = self.mlserver.descriptor(PATH_TYPES[EXTERNAL], name=EXTERNAL_NAME)
        slow = self.mlserver.descriptor(SPECULATIVE_TYPE, url=self.proxy.url, name=SLOW_NAME)
        slow.modelId = SLOW
        fast = descriptor_for(self.onnx, SPECULATIVE_TYPE)
        fast.modelId = FAST
        return {EMBEDDED: embedded, EXTERNAL: external, SLOW: slow, FAST: fast}

    def measure_job(self, job: str) -> dict:
        plan = self.plan
        models = self.descriptors()
        system = JobUnderTest(job, self)
        log.info("== %s: starting", job)
        try:
            system.start()
            for key in (EMBEDDED, EXTERNAL, SLOW, FAST):   # fast last: it serves alone at first
                system.publish(models[key])
            for path in (EMBEDDED, EXTERNAL):
                name = models[path].name
                system.until(PATH_TYPES[path], lambda r, n=name: r.modelName == n, name)
            system.until(SPECULATIVE_TYPE, lambda r: r.modelId == FAST and
                         not r.HasField("speculative"), "the fast model alone")
            soaked = time.monotonic()
            while time.monotonic() - soaked < plan.soak_s:
                for path in (EMBEDDED, EXTERNAL):
                    system.trial(PATH_TYPES[path], plan.burst // 4, 0)
            log.info("%s: soaked %.0f s", job, time.monotonic() - soaked)
            paths = {EMBEDDED: [], EXTERNAL: []}
            for round_ in range(plan.rounds):
                order = (EMBEDDED, EXTERNAL) if round_ % 2 == 0 else (EXTERNAL, EMBEDDED)
                for path in order:
                    paths[path].append(self.measure_path(system, path))
                    log.info("%s %s round %d: %s", job, path, round_, paths[path][-1])
            figures = {path: self.path_summary(runs) for path, runs in paths.items()}
            for path in (EMBEDDED, EXTERNAL):
                figures[path]["by_rate"] = {
                    f"{rate:.0f}/s": system.trial(PATH_TYPES[path], int(rate * plan.sweep_s),
                                                  rate).latency() for rate in plan.sweep}
                log.info("%s %s by rate: %s", job, path, {
                    r: (f["p50_ms"], f["p99_ms"], f["records_per_batch"])
                    for r, f in figures[path]["by_rate"].items()})
            speculative = self.measure_speculative(system)
            state = system.process.rest(f"/jobs/{system.process.job_id}") or {}
            exceptions = system.process.rest(f"/jobs/{system.process.job_id}/exceptions") or {}
            return {"paths": figures, "speculative": speculative,
                    "job_state": state.get("state"),
                    "job_exceptions": len(exceptions.get("exceptionHistory", {}).get("entries", [])),
                    "log": str(system.log_path.parent)}
        finally:
            system.stop()

    def measure_path(self, system: JobUnderTest, path: str) -> dict:
        plan = self.plan
        data_type = PATH_TYPES[path]
        burst = system.trial(data_type, plan.burst, 0, timeout_s=120)
        paced = system.trial(data_type, int(plan.rate * plan.trial_s), plan.rate)
        t = burst.trial
        return {"burst": {"sent": t.sent.count, "received": t.received,
                          "dead_letters": burst.dead_letters, "unscored": t.unscored,
                          "input_rate_rps": round(t.sent.achieved_rate),
                          "output_rate_rps": round(t.output_rate() or 0),
                          "throughput_rps": round(t.throughput() or 0),
                          "models": dict(t.model_versions)},
                "latency": paced.latency()}

    @staticmethod
    def path_summary(runs: list[dict]) -> dict:
        def median_of(values):
            values = [v for v in values if v is not None]
            return statistics.median(values) if values else None
        return {"output_rate_median": median_of(r["burst"]["output_rate_rps"] for r in runs),
                "p50_ms_median": median_of(r["latency"]["p50_ms"] for r in runs),
                "p99_ms_median": median_of(r["latency"]["p99_ms"] for r in runs),
                "runs": runs}

    def measure_speculative(self, system: JobUnderTest) -> dict:
        plan = self.plan
        count = int(plan.speculative_rate * plan.speculative_s)
        baseline = system.trial(SPECULATIVE_TYPE, count, plan.speculative_rate)
        system.publish(speculative_set(SPECULATIVE_TYPE, [SLOW, FAST], BUDGET_MS))
        system.until(SPECULATIVE_TYPE, lambda r: r.speculative.budgetMs == BUDGET_MS,
                     f"the speculative set ({BUDGET_MS} ms)")
        run = system.trial(SPECULATIVE_TYPE, count, plan.speculative_rate)
        measured = after_warm_up(run.results)
        return {"rate_rps": plan.speculative_rate, "set": [SLOW, FAST], "decider": "PREFERRED",
                "budget_ms": BUDGET_MS, "slow_delay_ms": SLOW_DELAY_MS,
                "baseline": baseline.latency(), "latency": run.latency(),
                "dead_letter_reasons": run.dead_reasons,
                "summary": speculative_summary(measured, BUDGET_MS)}


# -- the command -------------------------------------------------------------------------------

def summary_lines(report: dict) -> list[str]:
    """A short human summary of ``report`` (what the command prints after the JSON path)."""
    lines = []
    for job, figures in report.get("jobs", {}).items():
        if "failed" in figures:
            lines.append(f"{job}: failed: {figures['failed']}")
            continue
        for path, summary in figures.get("paths", {}).items():
            lines.append(f"{job} {path}: burst {summary['output_rate_median']} results/s; at "
                         f"{report['plan']['rate']:.0f}/s p50 {summary['p50_ms_median']} ms, "
                         f"p99 {summary['p99_ms_median']} ms")
        spec = figures.get("speculative", {})
        if spec:
            s, lat, base = spec["summary"], spec["latency"], spec["baseline"]
            wins = ", ".join(f"{m} {w['share']:.1%}" for m, w in s["wins"].items())
            lines.append(f"{job} speculative [slow {SLOW_DELAY_MS} ms, fast], {BUDGET_MS} ms, "
                         f"{spec['rate_rps']:.0f}/s: p50 {lat['p50_ms']} / p99 {lat['p99_ms']} ms "
                         f"(fast alone {base['p50_ms']} / {base['p99_ms']}); join waited p50 "
                         f"{s['waited_ms']['p50']} / p99 {s['waited_ms']['p99']} / max "
                         f"{s['waited_ms']['max']} ms; wins {wins}; {lat['received']}/{lat['sent']} "
                         f"results, {lat['dead_letters']} dead letters")
        for target in figures.get("targets", []):
            verdict = {True: "met", False: "MISSED", None: "no figure"}[target["met"]]
            lines.append(f"  {target['target']}: {target['figure']} ({verdict})")
    return lines


def run_serving_patterns(out_dir: Path, work_dir: Path, settings: Settings, quick: bool,
                         jobs: Sequence[str]) -> dict:
    plan = Plan.quick_plan() if quick else Plan()
    report = ServingPatterns(out_dir, work_dir, plan, settings, jobs).run()
    out_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(report, indent=2) + "\n"
    (out_dir / "results.json").write_text(text)
    (out_dir / f"results-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(text)
    return report
