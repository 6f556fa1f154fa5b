"""``modelserving bench``: every system, every model format, one broker, one machine, one run.

For each system (keyed job, broadcast job, the Python peers, pass-through job) and model format:
1. a probe: records as fast as the producer sends them; the output rate of a long burst (at
   least 4,000 records, sized by a short one) estimates capacity;
2. per run (median of ``runs``): the highest rate, from 90% of the estimate down in steps of
   25%, that the system sustains (all results back, output rate within 10% of the input
   rate, latency not growing; the figure is the lower of the input and output rates); then
   latency percentiles at half of that rate;
3. per job and format, model-switch latency: a new version published while records flow,
   to the first result scored by it (the result's broker time minus the publish time).
The CPU each system used per record is its processes' CPU time (user + system, the whole
process tree: a job's JVM and Python workers, a peer's processes) during the sustained
trial, divided by the records it answered. In-process batched scoring of the same records,
without Kafka, is the ceiling.
"""
from __future__ import annotations

import datetime
import fcntl
import logging
import os
import platform
import shutil
import signal
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from jobs import JOB_MODULES
from jobs.settings import Settings
from modelserving.bench import (DATA_TYPES_PER_SYSTEM, JOBS, KEYED_FOUR_TYPES, PASS_THROUGH, PEERS,
                                 SYSTEMS, cpu, workload)
from modelserving.bench.peers.launch import PeerProcesses, peer_versions
from modelserving.bench.workload import RecordTemplate, ResultCollector, new_producer, produce, wait_for_trial
from modelserving.demo.training import TrainedModel, demo_rows, descriptor_for, load_manifest, train_all
from modelserving.kafka.admin import ensure_topics
from modelserving.local.job_process import JobProcess
from modelserving.local.kafka_broker import LocalKafka
from modelserving.local.processes import free_ports
from protos import ModelType, ServingResult
from udfs.runtimes import FORMAT_NAMES as FORMATS

log = logging.getLogger("bench")

#: Records of the first, short capacity probe.
PROBE_RECORDS = 1000
JOB_SYSTEMS = {**JOB_MODULES, KEYED_FOUR_TYPES: JOB_MODULES["keyed"],
               PASS_THROUGH: "modelserving.bench.passthrough_job"}
PASS_THROUGH_TYPE = "NONE"


@dataclass(frozen=True)
class Plan:
    runs: int = 3
    trial_s: float = 8.0           # length of a sustain or latency trial
    probe_s: float = 4.0           # aimed length of the capacity probe
    switches: int = 3              # model switches per job and format
    switch_rate: float = 200.0     # records/s flowing while models switch
    soak_s: float = 60.0           # flat-out load before measuring, once per system
    quick: bool = False

    @classmethod
    def quick_plan(cls) -> "Plan":
        return cls(runs=3, trial_s=2.5, probe_s=2.0, switches=3, soak_s=20.0, quick=True)


@dataclass(frozen=True)
class Experiment:
    setting: str
    value: object
    note: str


#: Tuning choices measured against the defaults (keyed job, ONNX), for the results page.
EXPERIMENTS = (
    Experiment("local_python_workers", "loopback", "PyFlink's local default: Python functions "
               "run as threads of the launching process, one interpreter lock for all"),
    Experiment("batch_max_size", 1, "no micro-batching: one model call per record"),
    Experiment("bundle_time_ms", 100, "bundles closed after 100 ms instead of 20 ms"),
    Experiment("bundle_time_ms", 1000, "PyFlink's default bundle time (1 s)"),
    Experiment("bundle_size", 100, "bundles of at most 100 records instead of 1000"),
    Experiment("buffer_timeout_ms", 100, "Flink's default network buffer timeout"),
    Experiment("object_reuse", "off", "records copied between chained operators"),
    Experiment("operator_chaining", "off", "every operator its own task: records serialized "
               "between each"),
)


def data_type_of(model_type: str) -> str:
    return "bench-" + model_type.lower()


def machine() -> dict:
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    processor = ""
    try:
        processor = next(line.split(":", 1)[1].strip() for line in
                         Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cores": os.cpu_count(), "memory_gib": round(memory, 1), "cpu": processor,
            "platform": platform.platform()}


def versions() -> dict:
    from modelserving.local.jars import KAFKA_VERSION

    found = {"python": platform.python_version(), "kafka": KAFKA_VERSION}
    for package in ("apache-flink", "onnxruntime", "tensorflow-cpu", "pypmml", "kafka-python",
                    "confluent-kafka", "bytewax", "protobuf", "numpy"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    found.update(peer_versions())
    return found


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


class System:
    """One system under test, reading ``data_topic`` (+ ``models_topic``), writing ``results_topic``."""

    def __init__(self, name: str, bench: "Bench", overrides: dict | None = None, label: str = ""):
        self.name = name
        self.bench = bench
        self.overrides = overrides or {}
        tag = label or name
        self.data_topic = f"{bench.run_id}-{tag}-data"
        self.models_topic = f"{bench.run_id}-{tag}-models"
        self.results_topic = f"{bench.run_id}-{tag}-results"
        self.dead_letter_topic = f"{bench.run_id}-{tag}-dead-letters"
        self.state_topic = f"{bench.run_id}-{tag}-state"
        self.repository_topic = f"{bench.run_id}-{tag}-repository"
        self.log_path = bench.work_dir / tag / "system.log"
        self.process = None
        self.collector: ResultCollector | None = None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        ensure_topics(self.bench.kafka_settings, [self.data_topic, self.models_topic,
                                                  self.dead_letter_topic, self.results_topic],
                      compacted=[self.state_topic, self.repository_topic], partitions=2,
                      configs={self.results_topic: workload.result_topic_configs()})
        self.collector = ResultCollector(self.bench.kafka_settings, self.results_topic)
        self.collector.start()
        if not self.collector.ready.wait(30):
            raise RuntimeError(f"no assignment for {self.results_topic}")
        if self.name in PEERS:
            self.process = PeerProcesses(self.name, self.job_settings(), self.log_path)
        else:
            self.process = JobProcess(JOB_SYSTEMS[self.name], self.job_settings(), self.log_path)
        self.process.start()  # assigned first, so stop() ends a process that never got ready

    def data_types(self, model_type: str) -> list[str]:
        """The data types this system's records carry for ``model_type``, each served by the
        same model."""
        count = DATA_TYPES_PER_SYSTEM.get(self.name, 1)
        base = data_type_of(model_type)
        return [base] if count == 1 else [f"{base}-{i}" for i in range(count)]

    def pids(self) -> list[int]:
        """The roots of the system's process trees (whose CPU it is charged)."""
        if isinstance(self.process, PeerProcesses):
            return self.process.pids()
        return [self.process.process.pid] if self.process and self.process.process else []

    def check_alive(self) -> None:
        if isinstance(self.process, PeerProcesses) and self.process.exited():
            raise RuntimeError("\n".join(self.process.exited()))

    def job_settings(self) -> Settings:
        return self.bench.kafka_settings.replace(
            data_topic=self.data_topic,
            models_topic=self.models_topic, results_topic=self.results_topic,
            dead_letter_topic=self.dead_letter_topic, state_topic=self.state_topic,
            repository_topic=self.repository_topic,
            data_starting_offsets="earliest", group_id="", job_name="",
            model_dirs=(str(self.bench.models_dir),), **self.overrides).for_job(
            f"bench-{self.name}")

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
        if self.collector is not None:
            self.collector.stop()


class Bench:
    def __init__(self, out_dir: Path, work_dir: Path, plan: Plan, settings: Settings,
                 systems=SYSTEMS, formats=FORMATS, experiments: bool = False,
                 profile: tuple[str, ...] = ()):
        self.out_dir, self.work_dir, self.plan = Path(out_dir), Path(work_dir), plan
        self.profile_formats = profile
        self.profiles: list[dict] = []
        self.settings = settings
        self.systems, self.formats, self.with_experiments = systems, formats, experiments
        self.run_id = "bench-" + time.strftime("%H%M%S")
        self.models_dir = self.work_dir / "models"
        self.rows = [dict(zip(r.names, r.values)) for r in demo_rows()]
        self.producer = None
        self.kafka_settings: Settings | None = None   # the settings pointed at the bench's broker
        self.trial_counter = 0

    # -- the whole run ------------------------------------------------------------------

    def run(self) -> dict:
        started = time.monotonic()
        self.work_dir.mkdir(parents=True, exist_ok=True)
        lock = open(self.work_dir / ".lock", "w")
        try:  # two runs would share (and stop) one broker, and measure each other
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SystemExit(f"another benchmark is running in {self.work_dir}") from None
        self.models = self.trained_models()
        results = {"created": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                   "quick": self.plan.quick, "runs": self.plan.runs, "machine": machine(),
                   "versions": versions(), "settings": self.setting_summary(),
                   "method": __doc__.split("\n\n", 1)[1].strip(),
                   "results": [], "model_switch": [], "experiments": []}
        if "in-process" in self.systems:
            results["results"] += [self.in_process(f) for f in self.formats]
        kafka_dir = self.work_dir / "kafka"
        shutil.rmtree(kafka_dir, ignore_errors=True)
        port, controller = free_ports(2)
        with LocalKafka(kafka_dir, port=port, controller_port=controller, heap="768m",
                        die_with_parent=True) as kafka:
            self.kafka_settings = kafka.client_settings(self.settings)
            self.producer = new_producer(self.kafka_settings)
            for name in self.systems:
                if name == "in-process":
                    continue
                entries, switches = self.measure_system(name)
                results["results"] += entries
                results["model_switch"] += switches
            if self.with_experiments:
                results["experiments"] = self.experiments(results["results"])
            self.producer.flush(30)
            self.producer = None  # librdkafka disconnects now, before the broker stops
        results["profiles"] = self.profiles
        results["elapsed_s"] = round(time.monotonic() - started, 1)
        return results

    def trained_models(self) -> dict[str, TrainedModel]:
        try:
            models = load_manifest(self.models_dir)
        except (OSError, ValueError, KeyError):
            models = []
        if len(models) < len(FORMATS):
            log.info("training the demo models into %s", self.models_dir)
            models = train_all(self.models_dir)
        return {ModelType.Name(m.model_type): m for m in models}

    def setting_summary(self) -> dict:
        keys = ("batch_max_size", "batch_max_wait_ms", "python_execution_mode",
                "local_python_workers", "bundle_size",
                "bundle_time_ms", "buffer_timeout_ms", "object_reuse", "operator_chaining", "parallelism", "checkpoint_interval_ms",
                "delivery_guarantee")
        return {k: getattr(self.settings, k) for k in keys}

    # -- one system -------------------------------------------------------------------------

    def measure_system(self, name: str, overrides: dict | None = None, label: str = "",
                       formats=None, switches: bool = True, runs: int | None = None):
        formats = formats or (self.formats if name != "pass-through" else (FORMATS[0],))
        system = System(name, self, overrides, label)
        log.info("== %s: starting", label or name)
        entries, switch_entries = [], []
        try:
            system.start()
            self.publish_models(system, formats)
            for model_type in formats:
                self.warm_up(system, model_type)
            self.soak(system, formats[0])
            for model_type in formats:
                entry = self.measure(system, model_type, runs or self.plan.runs)
                if name == "pass-through":
                    entry["model_type"] = PASS_THROUGH_TYPE
                entries.append(entry)
                if switches and name in JOBS:
                    switch_entries.append(self.model_switch(system, model_type))
        except Exception as exc:
            log.exception("%s failed: %s", label or name, exc)
            entries.append({"system": name, "model_type": "?", "throughput_rps": None,
                            "p50_ms": None, "p95_ms": None, "p99_ms": None,
                            "note": f"failed: {exc}"})
        finally:
            system.stop()
        return entries, switch_entries

    def publish_models(self, system: System, formats, version: int = 1) -> None:
        for model_type in formats:
            for data_type in system.data_types(model_type):
                descriptor = descriptor_for(self.models[model_type], data_type=data_type)
                descriptor.version = str(version)
                self.send_model(system, descriptor)

    def send_model(self, system: System, descriptor) -> None:
        descriptor.publishedMs = descriptor.publishedMs or int(time.time() * 1000)
        self.producer.produce(system.models_topic, key=descriptor.dataType.encode(),
                              value=descriptor.SerializeToString())
        self.producer.flush(30)

    def next_trial(self, what: str) -> str:
        self.trial_counter += 1
        return f"t{self.trial_counter}{what}"

    def trial(self, system: System, model_type: str, count: int, rate: float,
              scored: bool = True) -> workload.Trial:
        """One trial; with ``scored``, a result that is not SCORED fails the measurement (a
        model that did not load must not pass for a fast system)."""
        template = RecordTemplate(system.data_types(model_type), self.rows)
        meter = cpu.Meter(system.pids()).start()
        sent = produce(self.producer, system.data_topic, template, self.next_trial(model_type[:2]),
                       max(count, 40), rate)
        timeout = max(5.0, self.plan.trial_s)
        trial = wait_for_trial(system.collector, sent, timeout)
        meter.stop()
        trial.cpu_s, trial.wall_s = meter.cpu_s, meter.wall_s
        if scored and trial.unscored and system.name != PASS_THROUGH:
            raise RuntimeError(f"{trial.unscored} of {trial.received} results were not scored "
                               f"(no model serving): see {system.log_path.parent}")
        return trial

    def warm_up(self, system: System, model_type: str) -> None:
        """Until a trial comes back whole and scored: model loaded, Python workers warm."""
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            system.check_alive()
            trial = self.trial(system, model_type, 300, 300, scored=False)
            if trial.complete and (trial.unscored == 0 or system.name == PASS_THROUGH):
                return
            log.info("%s %s: warming up (%d/%d results)", system.name, model_type,
                     trial.received, trial.sent.count)
        raise RuntimeError(f"{system.name} returned no complete trial for {model_type} in 240 s")

    def soak(self, system: System, model_type: str) -> None:
        """Flat-out load for ``plan.soak_s`` before any figure is taken. A job's JVM keeps
        JIT-compiling for a minute or more under load (its throughput still climbs after
        60 s), so a figure taken right after the first whole trial measures the compiler."""
        started, count = time.monotonic(), PROBE_RECORDS
        while time.monotonic() - started < self.plan.soak_s:
            system.check_alive()
            trial = self.trial(system, model_type, count, 0)
            # about two seconds of output per trial, so a slow system is not flooded
            count = max(PROBE_RECORDS, int(2 * (trial.output_rate() or 0)))
        log.info("%s: soaked %.0f s under load", system.name, time.monotonic() - started)

    def measure(self, system: System, model_type: str, runs: int) -> dict:
        plan = self.plan
        probe = self.trial(system, model_type, PROBE_RECORDS, 0)
        capacity = probe.output_rate() or 500.0
        # the short probe only sizes the long one: a system that answers in clumps (a
        # checkpoint's worth at once) shows a short burst's output rate far off its capacity
        probe = self.trial(system, model_type, max(int(capacity * plan.probe_s), 4 * PROBE_RECORDS), 0)
        capacity = probe.output_rate() or capacity
        producer_bound = probe.sent.achieved_rate < 1.2 * capacity
        per_run = []
        for run in range(runs):
            rate, sustained, cpu_us, cores = 0.9 * capacity, None, None, None
            for attempt in range(5):
                sampler = None
                if (run == 0 and attempt == 0 and model_type in self.profile_formats
                        and not system.overrides):  # profiles of the systems, not of experiments
                    sampler = self.sampler(system, model_type)
                trial = self.trial(system, model_type, int(rate * plan.trial_s), rate)
                if sampler is not None:
                    for summary in sampler.finish():
                        self.profiles.append({"system": system.name, "model_type": model_type,
                                              "rate_rps": rate, **summary})
                output = trial.output_rate()
                if (trial.complete and output and output >= 0.9 * min(rate, trial.sent.achieved_rate)
                        and not trial.latency_grows()):
                    # never more than came in: clumped output can outpace its input in a short trial
                    sustained = min(output, trial.sent.achieved_rate)
                    cpu_us, cores = trial.cpu_per_record_us(), trial.cpu_cores()
                    break
                # next try: a quarter less, or just under what came out, whichever is lower
                rate = min(rate * 0.75, 0.95 * output) if output else rate * 0.75
            half = self.trial(system, model_type, int(rate / 2 * plan.trial_s), rate / 2)
            per_run.append({"throughput_rps": sustained, "rate_rps": rate,
                            "cpu_us_per_record": cpu_us, "cpu_cores": cores,
                            "p50_ms": half.percentile(50), "p95_ms": half.percentile(95),
                            "p99_ms": half.percentile(99), "complete": half.complete})
        entry = {"system": system.name, "model_type": model_type,
                 "throughput_rps": median(r["throughput_rps"] for r in per_run),
                 "p50_ms": median(r["p50_ms"] for r in per_run),
                 "p95_ms": median(r["p95_ms"] for r in per_run),
                 "p99_ms": median(r["p99_ms"] for r in per_run),
                 "latency_rate_rps": (median(r["rate_rps"] for r in per_run) or 0) / 2,
                 "cpu_us_per_record": median(r["cpu_us_per_record"] for r in per_run),
                 "cpu_cores": median(r["cpu_cores"] for r in per_run),
                 "probe_rps": capacity, "runs": per_run,
                 "limited_by": "producer" if producer_bound else None, "note": ""}
        log.info("%s %s: %s rec/s, p50/p95/p99 %s/%s/%s ms, CPU %s us/record (%s cores)",
                 system.name, model_type, _fmt(entry["throughput_rps"]), _fmt(entry["p50_ms"]),
                 _fmt(entry["p95_ms"]), _fmt(entry["p99_ms"]), _fmt(entry["cpu_us_per_record"]),
                 _fmt(entry["cpu_cores"]))
        return entry

    def sampler(self, system: System, model_type: str):
        from modelserving.bench import profiling

        if isinstance(system.process, PeerProcesses):
            pids = system.process.pids()
        else:
            pids = profiling.python_workers(system.process.process.pid)
        seconds = max(2, int(self.plan.trial_s) - 1)
        return profiling.Sampler(pids, seconds, self.out_dir / "profiles",
                                 f"{system.name}-{model_type.lower()}")

    def model_switch(self, system: System, model_type: str) -> dict:
        """Publish versions 2, 3, ... while records flow; time to the first result of each."""
        data_type = data_type_of(model_type)
        template = RecordTemplate(data_type, self.rows)
        stop = threading.Event()
        trial = self.next_trial("sw")

        def flow():
            producer = new_producer(self.kafka_settings)
            i = 0
            while not stop.is_set():
                produce(producer, system.data_topic, template, f"{trial}x{i}", 20, self.plan.switch_rate)
                i += 1
            producer.flush(10)

        feeder = threading.Thread(target=flow, daemon=True)
        feeder.start()
        time.sleep(1.0)
        times = []
        try:
            for n in range(self.plan.switches):
                version = str(1000 * self.trial_counter + n + 2)
                descriptor = descriptor_for(self.models[model_type], data_type=data_type)
                descriptor.version = version
                system.collector.take()
                published = time.time() * 1000
                descriptor.publishedMs = int(published)
                self.send_model(system, descriptor)
                times.append(self.first_result_of(system, data_type, version, published))
        finally:
            stop.set()
            feeder.join(10)
        log.info("%s %s: model switch %s ms", system.name, model_type, times)
        return {"system": system.name, "model_type": model_type,
                "model_switch_ms": median(times), "runs_ms": times}

    @staticmethod
    def first_result_of(system: System, data_type: str, version: str, published_ms: float,
                        timeout_s: float = 60) -> float | None:
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            firsts = [appended for appended, raw in system.collector.take()
                      for result in [ServingResult.FromString(raw)]
                      if result.dataType == data_type and result.modelVersion == version]
            if firsts:
                return float(min(firsts) - published_ms)
            time.sleep(0.02)
        return None

    # -- the ceiling -----------------------------------------------------------------------

    def in_process(self, model_type: str) -> dict:
        """Parse, score and serialize in this process in batches of 512: no Kafka, no Flink."""
        from udfs.serving import ModelServer

        server = ModelServer(model_dirs=[self.models_dir], max_model_bytes=1 << 30,
                             data_topic="-", models_topic="-")
        model = server.build(descriptor_for(self.models[model_type],
                                            data_type=data_type_of(model_type)).SerializeToString())
        template = RecordTemplate(data_type_of(model_type), self.rows)
        raws = [template.encode(i, f"r{i}", 0) for i in range(20_000 if not self.plan.quick else 8_000)]
        server.serve(raws[:512], model)  # warm-up
        runs = []
        for _ in range(self.plan.runs):
            started, cpu_started = time.perf_counter(), time.process_time()
            for start in range(0, len(raws), 512):
                server.serve(raws[start:start + 512], model)
            wall, cpu_s = time.perf_counter() - started, time.process_time() - cpu_started
            runs.append({"throughput_rps": len(raws) / wall,
                         "cpu_us_per_record": cpu.per_record_us(cpu_s, len(raws)),
                         "cpu_cores": cpu.cores(cpu_s, wall)})
        server.close()
        entry = {"system": "in-process", "model_type": model_type,
                 **{key: median(run[key] for run in runs)
                    for key in ("throughput_rps", "cpu_us_per_record", "cpu_cores")},
                 "p50_ms": None, "p95_ms": None, "p99_ms": None, "runs": runs,
                 "limited_by": None, "note": "batches of 512, no Kafka"}
        log.info("in-process %s: %s rec/s, CPU %s us/record", model_type,
                 _fmt(entry["throughput_rps"]), _fmt(entry["cpu_us_per_record"]))
        return entry

    # -- tuning ----------------------------------------------------------------------------

    def experiments(self, baseline_entries) -> list[dict]:
        rows = []
        for experiment in EXPERIMENTS:
            label = f"x-{experiment.setting}-{experiment.value}".replace("_", "-")
            entries, _ = self.measure_system("keyed", {experiment.setting: experiment.value}, label,
                                             formats=("ONNX",), switches=False, runs=1)
            for entry in entries:
                rows.append({"setting": experiment.setting, "value": experiment.value,
                             "system": "keyed", "model_type": entry["model_type"],
                             "throughput_rps": entry["throughput_rps"], "p50_ms": entry["p50_ms"],
                             "p99_ms": entry["p99_ms"], "note": entry.get("note") or experiment.note})
        return rows


def _fmt(value) -> str:
    return "-" if value is None else f"{value:,.1f}"


def run_bench(out_dir: Path, work_dir: Path, quick: bool, settings: Settings, systems=SYSTEMS,
              formats=FORMATS, experiments: bool = False, profile: tuple[str, ...] = ()) -> dict:
    from modelserving.bench.report import write_report

    plan = Plan.quick_plan() if quick else Plan()
    # a terminated benchmark still stops the jobs and the broker it started (finally blocks)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    results = Bench(out_dir, work_dir, plan, settings, systems, formats, experiments,
                    profile).run()
    paths = write_report(results, Path(out_dir))
    for kind, path in paths.items():
        log.info("wrote %s: %s", kind, path)
    return results
