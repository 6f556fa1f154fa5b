"""The CPU a system under test spends: user + system time of every process of its trees.

A system is its root processes (a job's launcher, a peer's processes) and everything they
started: for a Flink job that is the JVM running the local cluster (JobManager and
TaskManager) and the Python workers it launches; for a peer, its processes and their
children. Two samples around a trial give the CPU seconds spent in between; the harness
(load generator, result collector) and the broker are not part of any system.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterable

import psutil

#: A process is (pid, creation time): a pid reused between two samples is another process.
Sample = dict[tuple[int, float], float]


def sample(roots: Iterable[int]) -> Sample:
    """CPU seconds so far of every live process in the trees of ``roots``."""
    seen: Sample = {}
    for pid in roots:
        try:
            root = psutil.Process(pid)
            members = [root, *root.children(recursive=True)]
        except psutil.Error:
            continue
        for process in members:
            try:
                with process.oneshot():
                    times = process.cpu_times()
                    seen[(process.pid, process.create_time())] = times.user + times.system
            except psutil.Error:
                continue
    return seen


def used(before: Sample, after: Sample) -> float:
    """CPU seconds spent between two samples: a process in both counts its difference, one
    born in between all of its time; one that ended in between is lost (not counted)."""
    return sum(max(0.0, seconds - before.get(process, 0.0)) for process, seconds in after.items())


def per_record_us(cpu_s: float | None, records: int) -> float | None:
    """Microseconds of CPU per record (None without CPU or records)."""
    if cpu_s is None or records <= 0:
        return None
    return cpu_s * 1e6 / records


def cores(cpu_s: float | None, wall_s: float | None) -> float | None:
    """How many cores were busy on average."""
    if cpu_s is None or not wall_s or wall_s <= 0:
        return None
    return cpu_s / wall_s


@dataclass
class Meter:
    """CPU of ``roots``' trees from ``start()`` to ``stop()``, and the wall time between."""

    roots: list[int]
    cpu_s: float | None = None
    wall_s: float | None = None

    def start(self) -> "Meter":
        self._before = sample(self.roots)
        self._started = time.monotonic()
        return self

    def stop(self) -> "Meter":
        self.wall_s = time.monotonic() - self._started
        self.cpu_s = used(self._before, sample(self.roots))
        return self
