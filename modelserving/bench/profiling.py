"""Where a system's Python time goes: py-spy samples of its Python workers under load.

py-spy attaches from outside (no change to the job, no restart) and samples without pausing
the process (``--nonblocking``), so the profile shows the job as it runs in the benchmark.
"""
from __future__ import annotations

import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path

_FRAME = re.compile(r"^(?P<function>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


def descendants(root_pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [root_pid]
    while todo:
        pid = todo.pop()
        for child in children.get(pid, []):
            found.append(child)
            todo.append(child)
    return found


def python_workers(root_pid: int) -> list[int]:
    """PyFlink's Python worker processes under ``root_pid`` (process mode)."""
    workers = []
    for pid in descendants(root_pid):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "pyflink.fn_execution" in cmdline and "python" in cmdline.split(" ", 1)[0]:
            workers.append(pid)
    return workers


class Sampler:
    """py-spy record of some processes for ``seconds``, in py-spy's raw (collapsed) format."""

    def __init__(self, pids: list[int], seconds: float, out_dir: Path, label: str):
        self.outputs: list[tuple[int, Path]] = []
        self.processes: list[subprocess.Popen] = []
        spy = shutil.which("py-spy") or str(Path(__import__("sys").executable).with_name("py-spy"))
        out_dir.mkdir(parents=True, exist_ok=True)
        for pid in pids:
            out = out_dir / f"{label}-{pid}.txt"
            self.outputs.append((pid, out))
            self.processes.append(subprocess.Popen(
                [spy, "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", "200",
                 "--nonblocking", "--format", "raw", "--output", str(out)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))

    def finish(self, timeout_s: float = 60) -> list[dict]:
        summaries = []
        for (pid, out), process in zip(self.outputs, self.processes):
            try:
                process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
            if out.exists():
                summary = summarize(out.read_text())
                summary.update(pid=pid, file=out.name)
                summaries.append(summary)
        return summaries


def _frames(stack: str) -> list[tuple[str, str]]:
    frames = []
    for frame in stack.split(";"):
        match = _FRAME.match(frame.strip())
        if match:
            file = match["file"]
            for marker in ("site-packages/", "/work/main/"):
                if marker in file:
                    file = file.split(marker, 1)[1]
            frames.append((match["function"], file))
        else:
            frames.append((frame.strip(), ""))
    return frames


def summarize(raw: str, top: int = 12) -> dict:
    """Self time (the frame on top of the stack) and inclusive time (anywhere in the stack)
    per function, as shares of all samples, plus the share of samples in the project's code
    (udfs/, jobs/, bench/) and in the model libraries."""
    own, inclusive, areas = Counter(), Counter(), Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        samples = int(count)
        total += samples
        frames = _frames(stack)
        if not frames:
            continue
        function, file = frames[-1]
        own[f"{function} ({file})"] += samples
        for name in {f"{f} ({p})" for f, p in frames}:
            inclusive[name] += samples
        areas[_area(frames)] += samples
    share = (lambda n: round(100.0 * n / total, 1)) if total else (lambda n: 0.0)
    return {"samples": total,
            "self": [[name, share(n)] for name, n in own.most_common(top)],
            "inclusive": [[name, share(n)] for name, n in inclusive.most_common(top)],
            "areas": {name: share(n) for name, n in areas.most_common()}}


#: Innermost frames of a thread that waits (py-spy cannot always tell it is idle), or that
#: runs in C without Python frames of its own (gRPC's polling threads).
_WAITING = {"Condition.wait", "Event.wait", "Thread._wait_for_tstate_lock", "Thread.run",
            "EpollSelector.select", "_run_channel_spin_thread.<locals>.channel_spin",
            "_UnaryUnaryMultiCallable._blocking"}


def _area(frames: list[tuple[str, str]]) -> str:
    """What a sample was doing, from its innermost recognisable frame."""
    if frames[-1][0] in _WAITING:
        return "waiting (idle threads, gRPC polling)"
    for function, file in reversed(frames):
        if file.startswith(("onnxruntime", "tensorflow", "pypmml", "py4j", "numpy")):
            return "model library (" + file.split("/", 1)[0] + ")"
        if file.startswith(("udfs/", "jobs/", "bench/", "protos/")):
            return "project code (parse, state, serialize)"
        if file.startswith(("google/protobuf", "google/_upb")):
            return "protobuf"
        if file.startswith("pyflink/fn_execution") and "state" in file:
            return "PyFlink state and timers"
        if file.startswith(("pyflink/", "apache_beam/", "grpc/")):
            return "PyFlink/Beam runtime (coders, bundles, gRPC)"
        if file.startswith("kafka/"):
            return "kafka-python"
    return "other / idle"
