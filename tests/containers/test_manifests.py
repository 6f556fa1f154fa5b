"""The Kubernetes manifests (docker/k8s) against their schemas, with no cluster: Kubernetes'
own (kubernetes-validate), the Flink operator's CRD (from its API jar on Maven Central,
fetched and checksummed into build/k8s-schemas) and the prometheus-operator's models; and
the FlinkDeployments' Flink configuration against flink-conf/config.yaml, so the two
cannot drift apart. The validator runs in .venv-containers (./dev setup)."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from modelserving.local import jars
from modelserving.local.flink_config import flink_home, read_flat
from modelserving.paths import PROJECT_ROOT
from podman_tools import CONTAINERS_VENV

K8S = PROJECT_ROOT / "docker" / "k8s"
DEPLOYMENTS = ("keyed-job.yaml", "broadcast-job.yaml")
#: flink-conf/config.yaml keys a pod sets otherwise: addresses and ports (the operator's),
#: memory (the FlinkDeployment's resources), storage (the state volume) and the reporter's
#: port (one per pod, not a range).
DIFFERENT_ON_KUBERNETES = {
    "jobmanager.rpc.address", "jobmanager.rpc.port", "jobmanager.bind-host",
    "taskmanager.bind-host", "taskmanager.host", "rest.address", "rest.bind-address",
    "rest.port", "jobmanager.memory.process.size", "taskmanager.memory.process.size",
    "execution.checkpointing.dir", "execution.checkpointing.savepoint-dir",
    "metrics.reporter.prom.port", "parallelism.default"}


@pytest.fixture(scope="module")
def operator_api_jar() -> Path:
    target = PROJECT_ROOT / "build" / "k8s-schemas"
    jars.fetch(("operator-api",), jars_dir=target, lock_file=K8S / "schemas.lock.json", quiet=True)
    (jar,) = (target / "operator-api").glob("*.jar")
    return jar


def validate(jar: Path, *files: Path) -> subprocess.CompletedProcess:
    python = CONTAINERS_VENV / "bin" / "python"
    if not python.exists():
        pytest.skip(f"{CONTAINERS_VENV} is missing: ./dev setup makes it")
    return subprocess.run([str(python), str(K8S / "validate.py"), "--operator-api-jar", str(jar),
                           *map(str, files)], capture_output=True, text=True, timeout=300)


def test_every_manifest_is_valid(operator_api_jar):
    files = sorted(K8S.glob("*.yaml"))
    done = validate(operator_api_jar, *files)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == len(files)   # one document a file
    assert "ok keyed-job.yaml FlinkDeployment/modelserving-keyed (operator CRD" in done.stdout
    assert "ok podmonitor.yaml PodMonitor/modelserving (prometheus-operator" in done.stdout
    assert "ok settings.yaml ConfigMap/modelserving-settings (Kubernetes 1." in done.stdout


#: (file, (text, replaced by), what the validator must say): each a manifest made invalid once
BROKEN = [
    ("keyed-job.yaml", ("    upgradeMode: savepoint", "    upgradeMode: sometimes"),
     "spec.job.upgradeMode: 'sometimes' is not one of"),
    ("keyed-job.yaml", ("flinkVersion: v2_2", "flinkVersion: v2_9"), "spec.flinkVersion: 'v2_9' is not one of"),
    ("keyed-job.yaml", ("    parallelism: 2", "    paralelism: 2"), "'paralelism' was unexpected"),
    ("keyed-job.yaml", ("            - configMapRef:", "            - configMapReference:"),
     "'configMapReference' was unexpected"),
    ("keyed-job.yaml", ("      memory: 2560m", "      memory: [2560m]"), "spec.taskManager.resource.memory"),
    ("podmonitor.yaml", ("interval: 15s", "interval: 15 seconds"), "interval"),
    ("podmonitor.yaml", ("- port: metrics", "- prot: metrics"), "podMetricsEndpoints[0].prot: unknown field"),
    ("settings.yaml", ("\ndata:", "\ndta:"), "'dta' was unexpected"),
    ("state.yaml", ("accessModes: [ReadWriteMany]", "accessModes: ReadWriteMany"), "spec.accessModes"),
]


@pytest.fixture(scope="module")
def broken_results(operator_api_jar, tmp_path_factory) -> list[str]:
    """The validator's lines for every BROKEN manifest, in one run (file i is broken-i-...)."""
    out = tmp_path_factory.mktemp("broken")
    files = []
    for i, (name, (old, new), _) in enumerate(BROKEN):
        text = (K8S / name).read_text()
        assert text.count(old) == 1, (name, old)
        files.append(out / f"broken-{i}-{name}")
        files[-1].write_text(text.replace(old, new))
    done = validate(operator_api_jar, *files)
    assert done.returncode == 1, done.stdout + done.stderr
    return done.stdout.splitlines()


@pytest.mark.parametrize("case", range(len(BROKEN)), ids=[f"{b[0]}:{b[1][1].strip()}" for b in BROKEN])
def test_a_broken_manifest_is_refused(broken_results, case):
    name, _, error = BROKEN[case]
    lines = [line for line in broken_results if f" broken-{case}-{name} " in line]
    assert lines and all(line.startswith("FAIL") for line in lines), broken_results
    assert any(error in line for line in lines), lines


@pytest.mark.parametrize("file", DEPLOYMENTS)
def test_the_flink_configuration_is_the_projects(file):
    spec = yaml.safe_load((K8S / file).read_text())["spec"]
    given = spec["flinkConfiguration"]
    project = read_flat(PROJECT_ROOT / "flink-conf" / "config.yaml")
    for key, value in project.items():
        if key not in DIFFERENT_ON_KUBERNETES:
            assert key in given, f"{file} lacks {key} (flink-conf/config.yaml: {value})"
            assert normalized(given[key]) == normalized(value), key
    # the Java 17 options of the distribution, which the operator's configuration replaces
    dist = read_flat(flink_home() / "conf" / "config.yaml")
    assert given["env.java.opts.all"] == dist["env.java.opts.all"]
    # the job's module, installed in the image
    job = file.split("-")[0]
    assert spec["job"]["args"] == ["-pym", f"jobs.{job}_job"]
    assert spec["job"]["upgradeMode"] == "savepoint"
    assert given["execution.checkpointing.savepoint-dir"].endswith(f"modelserving-{job}")
    assert spec["job"]["jarURI"].endswith(f"flink-python-{flink_version()}.jar")


def normalized(value) -> str:
    text = str(value).strip()
    try:
        return repr(float(text))
    except ValueError:
        return text


def flink_version() -> str:
    (jar,) = (flink_home() / "opt").glob("flink-python-*.jar")
    return jar.stem.removeprefix("flink-python-")
