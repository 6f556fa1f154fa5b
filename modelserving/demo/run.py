"""The demo: the whole product on one machine, stopped by Ctrl-C.

Starts a local Kafka broker (KRaft), runs the keyed job on a local Flink with its web UI,
trains the demo models, publishes them one after another while streaming demo records, and
prints results as they arrive: every model switch is announced when the first record scored
by the new model comes back. A bad record and a bad model show the dead-letter path.
"""
from __future__ import annotations

import shutil
import signal
import threading
import time
from collections import Counter
from pathlib import Path

from jobs import JOB_MODULES
from jobs.settings import Settings
from modelserving.kafka import clients as client
from modelserving.kafka.admin import create_topics
from modelserving.local import processes
from modelserving.local.job_process import JobProcess
from modelserving.paths import var_dir
from protos import DeadLetter, ModelDescriptor, ModelType, ServingResult, SpeculativeSet


def demo_dir() -> Path:
    """Where the demo keeps its broker, logs and job output (under the var dir)."""
    return var_dir() / "demo"


def say(message: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {message}", flush=True)


class Follower(client.OutputFollower):
    """Prints switches, dead letters and a sample of results, and counts them."""

    def __init__(self, settings: Settings, sample_every: int = 10):
        super().__init__(settings)
        self.sample_every = sample_every
        self.counts: Counter = Counter()
        self.current_model = None

    def handle(self, message) -> None:
        if isinstance(message, DeadLetter):
            self.counts["dead letters"] += 1
            say(client.describe_message(message))
            return
        if message.status == ServingResult.NO_MODEL:
            self.counts["no model"] += 1
            if self.counts["no model"] % self.sample_every == 1:
                say(client.describe_message(message))
            return
        model = (ModelType.Name(message.modelType), message.modelName, message.modelVersion)
        self.counts[f"{model[0]} {model[1]} v{model[2]}"] += 1
        # a speculative set is one way of serving, whichever of its models wins a record
        decided = message.speculative if message.HasField("speculative") else None
        serving = ("speculative", SpeculativeSet.Decider.Name(decided.decider).lower(),
                   "+".join(decided.answered)) if decided else model
        if serving != self.current_model:
            self.current_model = serving
            how = (f"speculatively: {serving[1]} of {serving[2]}" if decided else
                   f"{model[0]} model '{model[1]}' v{model[2]}")
            say(f"==> now serving {how} (first result "
                f"{max(0, message.servedMs - message.recordTs)} ms after its record was sent)")
            say(client.describe_message(message))
        elif sum(self.counts.values()) % self.sample_every == 0:
            say(client.describe_message(message))


def run_demo(duration_s: float = 0, rest_port: int = 8081, kafka_port: int = 9092,
             rate: float = 20.0, switch_every_s: float = 20.0) -> int:
    from modelserving.local.kafka_broker import LocalKafka
    from modelserving.demo.training import DEMO_DATA_TYPE, demo_rows, descriptor_for, load_manifest, train_all

    workdir = demo_dir()
    workdir.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(workdir / "kafka", ignore_errors=True)  # every demo starts from empty topics
    if not processes.port_is_free(kafka_port):
        kafka_port = processes.free_port()
    if not processes.port_is_free(rest_port):
        raise SystemExit(f"port {rest_port} is taken; pass --rest-port for the Flink web UI")
    broker = LocalKafka(workdir / "kafka", port=kafka_port, controller_port=processes.free_port())
    job = None
    follower = None
    state_service = None
    interrupted = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: interrupted.set())
    try:
        say(f"starting Kafka (KRaft) on {broker.bootstrap} ...")
        broker.start()
        models_dir = var_dir() / "models"
        try:
            models = load_manifest(models_dir)
        except (FileNotFoundError, ValueError):
            say(f"training the demo models into {models_dir} ...")
            models = train_all(models_dir)
        settings = broker.client_settings(Settings.from_sources(
            [], model_dirs=(str(models_dir.resolve()),), parallelism=2, rest_port=rest_port,
            checkpoint_interval_ms=5000)).for_job("keyed")
        create_topics(settings)
        say("starting the keyed job on a local Flink ...")
        job = JobProcess(JOB_MODULES["keyed"], settings, workdir / "job.log")
        job.start(timeout_s=240)
        say(f"job running; Flink web UI: http://localhost:{rest_port}/#/job/running/{job.job_id}/overview "
            f"(logs: {job.log_path}, {job.flink_log_dir})")
        follower = Follower(settings)
        follower.start()
        from modelserving.state.service import StateService
        state_service = StateService(settings,
                                     port=5500 if processes.port_is_free(5500) else 0).start()
        say(f"live model state: {state_service.url}/ (JSON: {state_service.url}/models); the "
            f"model repository: {state_service.url}/repository, or `./dev models list "
            f"--bootstrap-servers {settings.bootstrap_servers}`")

        kafka = client.producer(settings)
        rows = demo_rows()
        publisher = threading.Thread(
            target=lambda: client.publish_records(kafka, settings.data_topic, rows, rate=rate,
                                                  loop=True, count=int(rate * duration_s) if duration_s else 0),
            daemon=True)
        publisher.start()
        say(f"streaming {DEMO_DATA_TYPE} records at {rate:g}/s; Ctrl-C stops everything")
        started = time.monotonic()
        next_switch, next_status, index, versions = started, started + 5, 0, 0
        while not interrupted.is_set():
            now = time.monotonic()
            if duration_s and now - started >= duration_s:
                break
            if now >= next_switch:
                if index == len(models):   # after one round of switches, a speculative one
                    start_speculation(kafka, settings, models)
                elif index == len(models) + 1:
                    end_speculation(kafka, settings)
                else:
                    model = models[index % len(models)]
                    # each switch a version of its own: the model repository knows the data
                    # type's models by version (`modelserving models history wine-cultivar`)
                    versions += 1
                    descriptor = descriptor_for(model)
                    descriptor.version = str(versions)
                    client.publish_model(kafka, settings.models_topic, descriptor)
                    say(f"published {ModelType.Name(model.model_type)} model '{model.name}' "
                        f"v{descriptor.version}")
                if index == 1:
                    show_dead_letters(kafka, settings)
                index += 1
                next_switch = now + switch_every_s
            if now >= next_status:
                say("results so far: " + ", ".join(f"{k}: {v}" for k, v in sorted(follower.counts.items())))
                next_status = now + 5
            interrupted.wait(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        say("stopping ...")
        if follower is not None:
            follower.stop()
            say("results: " + ", ".join(f"{k}: {v}" for k, v in sorted(follower.counts.items())))
        if state_service is not None:
            state_service.stop()
        if job is not None:
            job.stop()
        broker.stop()
        say("stopped Flink and Kafka")
    return 0


def show_dead_letters(kafka, settings: Settings) -> None:
    """One bad record and one bad model: both come back as dead letters, serving goes on."""
    kafka.send(settings.data_topic, value=b"\x08\x96\x01 not a record").get(10)
    from modelserving.demo.training import DEMO_DATA_TYPE

    bad = ModelDescriptor(name="broken", version="0", dataType=DEMO_DATA_TYPE,
                          modeltype=ModelType.ONNX, data=b"these are not ONNX bytes")
    client.publish_model(kafka, settings.models_topic, bad)
    say("published a corrupt record and a corrupt model (watch for dead letters)")


#: The demo's speculative set: three formats vote on each record within 100 ms.
SPECULATIVE_MODELS = (ModelType.ONNX, ModelType.TENSORFLOW, ModelType.PMML)
SPECULATIVE_BUDGET_MS = 100


def start_speculation(kafka, settings: Settings, models) -> None:
    """Publish three of the demo models under model ids of their own, then a CONSENSUS set
    of them: from then on every record is scored by all three and the majority answers."""
    from modelserving.demo.training import DEMO_DATA_TYPE, descriptor_for

    names = []
    for model in models:
        if model.model_type in SPECULATIVE_MODELS:
            descriptor = descriptor_for(model)
            descriptor.modelId = ModelType.Name(model.model_type).lower()
            client.publish_model(kafka, settings.models_topic, descriptor)
            names.append(descriptor.modelId)
    chosen = ModelDescriptor(name="demo-consensus", dataType=DEMO_DATA_TYPE)
    chosen.speculative.CopyFrom(SpeculativeSet(models=names, budgetMs=SPECULATIVE_BUDGET_MS,
                                               decider=SpeculativeSet.CONSENSUS))
    client.publish_model(kafka, settings.models_topic, chosen)
    say(f"published a speculative set: consensus of {', '.join(names)} within "
        f"{SPECULATIVE_BUDGET_MS} ms")


def end_speculation(kafka, settings: Settings) -> None:
    from modelserving.demo.training import DEMO_DATA_TYPE

    ended = ModelDescriptor(name="demo-consensus", dataType=DEMO_DATA_TYPE, withdraw=True)
    ended.speculative.SetInParent()
    client.publish_model(kafka, settings.models_topic, ended)
    say("ended the speculative set: the latest model serves alone again")
