"""CPU per record: the arithmetic of two samples, and a real process tree measured."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from modelserving.bench import cpu
from modelserving.bench.workload import Sent, Trial


def test_used_counts_differences_newcomers_and_not_the_departed():
    before = {(10, 1.0): 5.0, (11, 1.0): 2.0, (12, 1.0): 7.0}
    after = {(10, 1.0): 5.5, (11, 1.0): 2.25, (13, 9.0): 0.75}   # 12 ended, 13 was born
    assert cpu.used(before, after) == pytest.approx(0.5 + 0.25 + 0.75)


def test_used_tells_a_reused_pid_from_the_process_it_replaced():
    before = {(10, 1.0): 30.0}
    after = {(10, 2.0): 0.5}   # same pid, started later: a new process, all of its time counts
    assert cpu.used(before, after) == pytest.approx(0.5)


def test_used_never_goes_negative():
    assert cpu.used({(10, 1.0): 3.0}, {(10, 1.0): 2.9}) == 0.0


def test_per_record_and_cores():
    assert cpu.per_record_us(0.5, 25_000) == pytest.approx(20.0)
    assert cpu.per_record_us(0.5, 0) is None and cpu.per_record_us(None, 10) is None
    assert cpu.cores(3.0, 2.0) == pytest.approx(1.5)
    assert cpu.cores(3.0, 0) is None and cpu.cores(None, 2.0) is None


def test_trial_charges_its_cpu_to_the_records_that_came_back():
    trial = Trial(Sent("t1", 1000, 0.0, 1.0, 1000.0), received=800, cpu_s=0.4, wall_s=2.0)
    assert trial.cpu_per_record_us() == pytest.approx(500.0)
    assert trial.cpu_cores() == pytest.approx(0.2)
    assert Trial(Sent("t2", 10, 0.0, 1.0, 10.0)).cpu_per_record_us() is None


def test_meter_sees_a_child_process_burn_cpu():
    """A parent that sleeps and its child that spins, then sleeps: the tree's CPU is the child's."""
    spin = ("import time\nend = time.process_time() + 0.6\nwhile time.process_time() < end: pass\n"
            "time.sleep(5)\n")
    parent = subprocess.Popen([sys.executable, "-c",
                               f"import subprocess, sys, time; time.sleep(0.3); "
                               f"subprocess.run([sys.executable, '-c', {spin!r}])"])
    try:
        meter = cpu.Meter([parent.pid]).start()
        time.sleep(0.2)   # the child is not born yet: its whole time must still count
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            meter.stop()
            if meter.cpu_s >= 0.6:
                break
            time.sleep(0.1)
        # the child's 0.6 s, plus its and the parent's interpreter start-up, and no more
        assert 0.6 <= meter.cpu_s < 2.0
        assert meter.wall_s >= 0.6
    finally:
        for pid, _ in cpu.sample([parent.pid]):   # the child first: the parent would wait for it
            if pid != parent.pid:
                os.kill(pid, signal.SIGKILL)
        parent.kill()
        parent.wait()


def test_sample_of_gone_processes_is_empty():
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    assert cpu.sample([process.pid]) == {}
