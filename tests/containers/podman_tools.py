"""Podman on this machine, for the container test: everything machine-specific lives here,
never in docker/ (the files users run).

This machine has no Docker engine and no image registry, and podman needs care here:

- podman, buildah, runc and debootstrap come from Debian (installed with apt-get when
  missing and we are root; else the test skips and says why);
- crun fails (``setrlimit RLIMIT_NOFILE: Operation not permitted``, hybrid cgroups), so
  podman runs with ``runc`` through a wrapper runtime (``RUNC_WRAPPER`` below) that drops
  ``process.rlimits``, ``linux.cgroupsPath`` and ``linux.resources`` from the bundle's
  ``config.json`` (and ``rlimits`` from an exec's process spec), with
  ``--cgroup-manager cgroupfs``: no resource limits apply;
- the base image is Debian bookworm made with ``debootstrap --variant=minbase`` and imported
  (``localhost/modelserving-bookworm:minbase``), since no ``python:3.11-slim`` can be pulled;
- this machine's HTTPS traffic goes through a proxy whose certificate authority only the
  host trusts (``/usr/local/share/ca-certificates``); the images are built on
  ``SITE_BASE_IMAGE``, the Debian base plus those certificates, so that pip and Maven in
  the build (and the Debian packages' trust stores) accept it;
- the third-party images of the compose stack cannot be pulled either; stand-ins are built
  from Debian packages and the project's pinned jars (``STAND_INS``): Kafka (the pinned
  Apache Kafka 4.4 jars, configured from ``KAFKA_*`` variables like the apache/kafka image)
  and Prometheus (Debian's). Grafana has none: it is not started here.

``Podman.compose(...)`` runs podman-compose (``.venv-containers``) with a ``podman`` on its
path that is this wrapper.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from modelserving.paths import PROJECT_ROOT

WORK = PROJECT_ROOT / "build" / "containers"
BASE_IMAGE = "localhost/modelserving-bookworm:minbase"
SITE_BASE_IMAGE = "localhost/modelserving-bookworm:site"
HOST_CA_DIR = Path("/usr/local/share/ca-certificates")
JOB_IMAGE = "localhost/modelserving-job:test"
KAFKA_IMAGE = "localhost/modelserving-kafka-standin:test"
PROMETHEUS_IMAGE = "localhost/modelserving-prometheus-standin:test"
CONTAINERS_VENV = Path(os.environ.get("MODELSERVING_CONTAINERS_VENV", PROJECT_ROOT / ".venv-containers"))
DEBIAN_PACKAGES = ("podman", "buildah", "runc", "debootstrap")

RUNC_WRAPPER = """#!/usr/bin/env python3
# podman's OCI runtime on this machine: runc, minus what this sandbox refuses (rlimits,
# cgroups): from a container's bundle (create/run) and from an exec's process spec
import json, os, sys
args = sys.argv[1:]
bundle = process = None
for i, arg in enumerate(args):
    if arg in ("--bundle", "-b") and i + 1 < len(args):
        bundle = args[i + 1]
    elif arg.startswith("--bundle="):
        bundle = arg.split("=", 1)[1]
    elif arg in ("--process", "-p") and "exec" in args and i + 1 < len(args):
        process = args[i + 1]
    elif arg.startswith("--process="):
        process = arg.split("=", 1)[1]
if bundle is None and ("create" in args or "run" in args):
    bundle = os.getcwd()

def edit(path, change):
    if path and os.path.exists(path):
        with open(path) as f:
            spec = json.load(f)
        change(spec)
        with open(path, "w") as f:
            json.dump(spec, f)

def container(spec):
    spec.get("process", {}).pop("rlimits", None)
    spec.get("linux", {}).pop("cgroupsPath", None)
    spec.get("linux", {}).pop("resources", None)

edit(os.path.join(bundle, "config.json") if bundle else "", container)
edit(process, lambda spec: spec.pop("rlimits", None))
os.execvp("runc", ["runc", *args])
"""

PODMAN_SHIM = """#!/bin/sh
exec {podman} --runtime {wrapper} --cgroup-manager cgroupfs "$@"
"""

# The stand-ins: what the compose file's KAFKA_IMAGE and PROMETHEUS_IMAGE are here.
KAFKA_RUN = r"""#!/bin/bash
# apache/kafka's convention: KAFKA_FOO_BAR=x is foo.bar=x (__ is _, ___ is -)
set -euo pipefail
props=/tmp/server.properties
echo "log.dirs=/var/lib/kafka/data" > "$props"
for var in $(compgen -e); do
  case "$var" in
    KAFKA_*) key=$(printf '%s' "${var#KAFKA_}" | tr 'A-Z' 'a-z' | sed 's/___/-/g; s/__/@/g; s/_/./g; s/@/_/g')
             echo "$key=${!var}" >> "$props" ;;
  esac
done
cp="/opt/kafka/libs/*"
java -cp "$cp" kafka.tools.StorageTool format --cluster-id "${CLUSTER_ID:-5L6g3nShT-eMCtK--X86sw}" \
  --config "$props" --ignore-formatted
exec java -Xmx512m -XX:+UseG1GC -cp "$cp" kafka.Kafka "$props"
"""
STAND_INS = {
    KAFKA_IMAGE: f"""FROM {JOB_IMAGE}
USER root
COPY kafka/ /opt/kafka/libs/
COPY kafka-run /opt/kafka/run
RUN mkdir -p /var/lib/kafka/data && chown -R flink /var/lib/kafka && chmod 755 /opt/kafka/run
USER flink
ENTRYPOINT ["/opt/kafka/run"]
""",
    PROMETHEUS_IMAGE: f"""FROM {SITE_BASE_IMAGE}
RUN apt-get update && apt-get install -y --no-install-recommends prometheus \
    && rm -rf /var/lib/apt/lists/* && mkdir -p /prometheus && chown nobody /prometheus
USER nobody
ENTRYPOINT ["/usr/bin/prometheus"]
""",
}


def _run(cmd, timeout: float, **kwargs) -> subprocess.CompletedProcess:
    kwargs.setdefault("stdin", subprocess.DEVNULL)
    return subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=timeout, **kwargs)


def _install_debian_packages() -> str | None:
    """Install what is missing; the reason it cannot be, or None."""
    missing = [p for p in DEBIAN_PACKAGES if not shutil.which(p)]
    if not missing:
        return None
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return f"{', '.join(missing)} missing and not root with apt-get to install them"
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *missing]):
        done = _run(cmd, 900, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        if done.returncode != 0:
            return f"`{' '.join(cmd)}` failed: {done.stdout[-500:]}"
    return None


class Podman:
    """podman with this machine's runtime wrapper; ``skip`` (pytest) when it cannot run."""

    def __init__(self, work: Path = WORK):
        self.work = work
        self.bin = work / "bin"
        self.timings: dict[str, float] = {}

    @classmethod
    def usable(cls) -> "Podman":
        reason = _install_debian_packages()
        if reason:
            pytest.skip(f"podman cannot be used here: {reason}")
        podman = cls()
        podman._write_shims()
        done = podman.run(["info"], timeout=120, check=False)
        if done.returncode != 0:
            pytest.skip(f"podman cannot run here (`podman info` failed): {done.stdout[-800:]}")
        if not CONTAINERS_VENV.joinpath("bin", "podman-compose").exists():
            pytest.skip(f"podman-compose is not installed in {CONTAINERS_VENV} (./dev setup makes it)")
        podman.ensure_base_image()
        done = podman.run(["run", "--rm", BASE_IMAGE, "true"], timeout=120, check=False)
        if done.returncode != 0:
            pytest.skip(f"podman cannot run a container here: {done.stdout[-800:]}")
        return podman

    def _write_shims(self) -> None:
        self.bin.mkdir(parents=True, exist_ok=True)
        wrapper = self.work / "runc-wrapper"
        wrapper.write_text(RUNC_WRAPPER)
        wrapper.chmod(0o755)
        shim = self.bin / "podman"
        shim.write_text(PODMAN_SHIM.format(podman=shutil.which("podman"), wrapper=wrapper))
        shim.chmod(0o755)

    def run(self, args: list[str], timeout: float = 600, check: bool = True,
            **kwargs) -> subprocess.CompletedProcess:
        done = _run([str(self.bin / "podman"), *args], timeout, **kwargs)
        if check and done.returncode != 0:
            raise AssertionError(f"podman {' '.join(args[:3])} failed ({done.returncode}):\n"
                                 + "\n".join(done.stdout.splitlines()[-60:]))
        return done

    def has_image(self, name: str) -> bool:
        return self.run(["image", "exists", name], check=False).returncode == 0

    def image_size(self, name: str) -> int:
        return int(self.run(["image", "inspect", "--format", "{{.Size}}", name]).stdout.strip())

    def _timed(self, what: str, fn):
        started = time.monotonic()
        result = fn()
        self.timings[what] = round(time.monotonic() - started, 1)
        return result

    def ensure_base_image(self) -> None:
        """Debian bookworm (minbase) as a local image, made once per machine, and the
        machine's certificate authorities on it (``SITE_BASE_IMAGE``)."""
        if not self.has_image(BASE_IMAGE):
            self._debootstrap_base_image()
        context = self.work / "site-base"
        shutil.rmtree(context, ignore_errors=True)
        (context / "ca").mkdir(parents=True)
        for cert in sorted(HOST_CA_DIR.glob("*.crt")) if HOST_CA_DIR.is_dir() else ():
            shutil.copy2(cert, context / "ca" / cert.name)
        (context / "Dockerfile").write_text(
            f"FROM {BASE_IMAGE}\nCOPY ca/ /usr/local/share/ca-certificates/\n")
        self.run(["build", "-t", SITE_BASE_IMAGE, str(context)], timeout=600)

    def _debootstrap_base_image(self) -> None:
        rootfs = self.work / "rootfs"
        shutil.rmtree(rootfs, ignore_errors=True)

        def make():
            done = _run(["debootstrap", "--variant=minbase", "bookworm", str(rootfs)], 900)
            if done.returncode != 0:
                pytest.skip(f"debootstrap cannot make the Debian base here: {done.stdout[-800:]}")
            tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
            self.run(["import", "-", BASE_IMAGE], stdin=tar.stdout, timeout=600)
            tar.wait()
            shutil.rmtree(rootfs, ignore_errors=True)
        self._timed("base image (debootstrap + import)", make)

    def build_images(self) -> None:
        """The job image from docker/Dockerfile on the Debian base, then the stand-ins.
        podman's layer cache (and the Dockerfile's pip and Maven cache mounts) make a build
        with unchanged inputs a matter of seconds."""
        built = self._timed("job image build", lambda: self.run(
            ["build", "--network=host", "-f", "docker/Dockerfile", "--build-arg",
             f"BASE={SITE_BASE_IMAGE}", "-t", JOB_IMAGE, "."], timeout=3600, cwd=PROJECT_ROOT))
        # which steps came from the cache, for whoever wonders why a build took long
        (self.work / "job-image-build.log").write_text(built.stdout)
        context = self.work / "stand-ins"
        shutil.rmtree(context, ignore_errors=True)
        context.mkdir(parents=True)
        from modelserving.local.jars import group_jars
        (context / "kafka").mkdir()
        for jar in group_jars("kafka"):
            shutil.copy2(jar, context / "kafka" / jar.name)
        (context / "kafka-run").write_text(KAFKA_RUN)
        for image, dockerfile in STAND_INS.items():
            (context / "Dockerfile").write_text(dockerfile)
            self._timed(f"stand-in {image} build", lambda: self.run(
                ["build", "--network=host", "-t", image, str(context)], timeout=1800))

    def compose(self, project: str, env: dict[str, str], *args: str,
                timeout: float = 900, check: bool = True) -> subprocess.CompletedProcess:
        """podman-compose on docker/compose.yaml as project ``project``."""
        cmd = [str(CONTAINERS_VENV / "bin" / "podman-compose"), "--podman-path",
               str(self.bin / "podman"), "-p", project, "-f",
               str(PROJECT_ROOT / "docker" / "compose.yaml"), *args]
        done = _run(cmd, timeout, env={**os.environ, **env,
                                       "PATH": f"{self.bin}:{os.environ['PATH']}"},
                    cwd=PROJECT_ROOT)
        if check and done.returncode != 0:
            raise AssertionError(f"podman-compose {' '.join(args)} failed ({done.returncode}):\n"
                                 + "\n".join(done.stdout.splitlines()[-80:]))
        return done

    def logs(self, container: str, lines: int = 80) -> str:
        return self.run(["logs", "--tail", str(lines), container], check=False).stdout
