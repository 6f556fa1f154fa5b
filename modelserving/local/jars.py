"""Pinned Java artifacts: the Flink Kafka connector and a runnable Kafka broker.

``jars.lock.json`` (next to this file) pins every jar by Maven coordinates and SHA-256,
in two groups:

* ``flink``: the Flink SQL Kafka connector (one self-contained jar).
* ``kafka``: an Apache Kafka broker (KRaft) with its full runtime closure and a log4j2
  backend, runnable with ``java -cp <kafka_classpath()> kafka.Kafka server.properties``.

``fetch()`` makes ``<jars dir>/<group>/`` hold exactly-verified copies of the locked jars.
It is idempotent and cheap when nothing is missing (no Maven start, checksums cached by
size+mtime in a stamp file).  Missing jars are obtained by coordinates with the ``mvn``
client in ONE Maven run (``dependency:copy-dependencies`` on a throwaway pom), so the
machine's Maven configuration (mirrors, proxies, local repository) applies; nothing is
downloaded by URL here.

``lock()`` (``python -m modelserving.local.jars lock``) is the maintainer's way to refresh the
pins: it resolves ``ROOTS`` once with Maven and rewrites the lock file.

Layout: the jars directory is ``modelserving.paths.jars_dir()``: ``<project root>/build/jars``
unless the ``MODELSERVING_JARS_DIR`` environment variable moves it (read at each call).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from xml.sax.saxutils import escape

from modelserving.errors import JarsError
from modelserving.paths import jars_dir as default_jars_dir

PACKAGE_DIR = Path(__file__).resolve().parent
LOCK_FILE = PACKAGE_DIR / "jars.lock.json"

GROUPS = ("flink", "kafka")

# What ``lock()`` resolves.  Edit the versions here, then run ``python -m modelserving.local.jars lock``.
KAFKA_VERSION = "4.4.0"
LOG4J_VERSION = "2.25.5"  # the log4j2 version kafka-server itself depends on
ROOTS: dict[str, dict] = {
    "flink": {
        "transitive": False,
        "artifacts": ["org.apache.flink:flink-sql-connector-kafka:5.0.0-2.2"],
    },
    "kafka": {
        "transitive": True,
        "artifacts": [
            f"org.apache.kafka:kafka_2.13:{KAFKA_VERSION}",
            # Kafka 4.x logs through slf4j 1.7 (slf4j-api 1.7.36 is in its closure) into
            # log4j2; the slf4j-1.x -> log4j2 binding is log4j-slf4j-impl (not *-slf4j2-impl).
            f"org.apache.logging.log4j:log4j-slf4j-impl:{LOG4J_VERSION}",
            f"org.apache.logging.log4j:log4j-core:{LOG4J_VERSION}",
            f"org.apache.logging.log4j:log4j-api:{LOG4J_VERSION}",
        ],
    },
}

# The Maven plugin doing the work, pinned so resolution behaves the same everywhere.
DEPENDENCY_PLUGIN_VERSION = "3.8.1"
STAMP_NAME = ".verified.json"


# ---------------------------------------------------------------------------- lock file

def load_lock(path: Path | None = None) -> dict:
    """The parsed lock file: ``{"groups": {group: [entry, ...]}, ...}``."""
    path = Path(path) if path else LOCK_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise JarsError(f"lock file {path} is missing; run `python -m modelserving.local.jars lock`") from None
    if not isinstance(data.get("groups"), dict):
        raise JarsError(f"lock file {path} has no 'groups' object")
    return data


def _split_coords(coords: str) -> dict:
    """``g:a:v`` or ``g:a:type:classifier:v`` -> dict of Maven fields."""
    parts = coords.split(":")
    if len(parts) == 3:
        g, a, v = parts
        return {"groupId": g, "artifactId": a, "version": v, "type": "jar", "classifier": ""}
    if len(parts) == 5:
        g, a, t, c, v = parts
        return {"groupId": g, "artifactId": a, "version": v, "type": t, "classifier": c}
    raise JarsError(f"bad Maven coordinates {coords!r}")


def _file_name(coords: str) -> str:
    f = _split_coords(coords)
    classifier = f"-{f['classifier']}" if f["classifier"] else ""
    return f"{f['artifactId']}-{f['version']}{classifier}.{f['type']}"


# ---------------------------------------------------------------------------- checksums

def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _load_stamp(jars_dir: Path) -> dict:
    try:
        data = json.loads((jars_dir / STAMP_NAME).read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _save_stamp(jars_dir: Path, stamp: dict) -> None:
    tmp = jars_dir / f"{STAMP_NAME}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(stamp, indent=1, sort_keys=True))
    os.replace(tmp, jars_dir / STAMP_NAME)


def _is_valid(path: Path, entry: dict, stamp: dict, rel: str) -> bool:
    """True when ``path`` exists with the locked sha256 (cached by size + mtime)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        stamp.pop(rel, None)
        return False
    key = [st.st_size, st.st_mtime_ns, entry["sha256"]]
    if stamp.get(rel) == key:
        return True
    if "size" in entry and st.st_size != entry["size"]:
        stamp.pop(rel, None)
        return False
    if sha256_file(path) != entry["sha256"]:
        stamp.pop(rel, None)
        return False
    stamp[rel] = key
    return True


def verify_file(path: Path, entry: dict) -> None:
    """Raise ``JarsError`` (after deleting ``path``) unless its sha256 matches ``entry``."""
    actual = sha256_file(path)
    if actual != entry["sha256"]:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        raise JarsError(
            f"checksum mismatch for {entry['coords']} ({path.name}): expected sha256 "
            f"{entry['sha256']}, got {actual}; the file was deleted. If the pin is meant to "
            f"change, refresh it with `python -m modelserving.local.jars lock`.")


# ---------------------------------------------------------------------------- maven

def _mvn() -> str:
    mvn = shutil.which("mvn")
    if not mvn:
        raise JarsError("Maven (`mvn`) is required to fetch the pinned jars: apt-get install maven")
    return mvn


def _dependency_xml(coords: str, transitive: bool) -> str:
    f = _split_coords(coords)
    lines = [
        "    <dependency>",
        f"      <groupId>{escape(f['groupId'])}</groupId>",
        f"      <artifactId>{escape(f['artifactId'])}</artifactId>",
        f"      <version>{escape(f['version'])}</version>",
    ]
    if f["type"] != "jar":
        lines.append(f"      <type>{escape(f['type'])}</type>")
    if f["classifier"]:
        lines.append(f"      <classifier>{escape(f['classifier'])}</classifier>")
    if not transitive:
        lines.append("      <exclusions><exclusion><groupId>*</groupId><artifactId>*</artifactId>"
                     "</exclusion></exclusions>")
    lines.append("    </dependency>")
    return "\n".join(lines)


def _pom(artifact_id: str, dependencies: list[str], packaging: str = "jar", modules: list[str] = ()) -> str:
    mods = ""
    if modules:
        mods = "  <modules>\n" + "".join(f"    <module>{m}</module>\n" for m in modules) + "  </modules>\n"
    deps = ""
    if dependencies:
        deps = "  <dependencies>\n" + "\n".join(dependencies) + "\n  </dependencies>\n"
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<!-- Throwaway pom generated by modelserving.local.jars; never committed. -->
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>modelserving.local.jars</groupId>
  <artifactId>{artifact_id}</artifactId>
  <version>0</version>
  <packaging>{packaging}</packaging>
{mods}{deps}  <build>
    <pluginManagement>
      <plugins>
        <plugin>
          <groupId>org.apache.maven.plugins</groupId>
          <artifactId>maven-dependency-plugin</artifactId>
          <version>{DEPENDENCY_PLUGIN_VERSION}</version>
        </plugin>
      </plugins>
    </pluginManagement>
  </build>
</project>
"""


def _run_mvn(args: list[str], cwd: Path) -> None:
    cmd = [_mvn(), "-q", "-B", *args]
    proc = subprocess.run(cmd, cwd=cwd, stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.strip().splitlines()[-40:])
        raise JarsError(f"`{' '.join(cmd)}` failed in {cwd} (exit {proc.returncode}):\n{tail}")


# ---------------------------------------------------------------------------- fetch

@contextlib.contextmanager
def _dir_lock(jars_dir: Path):
    """Serialize concurrent fetches (e.g. the CLI and a test run) on one jars dir."""
    import fcntl

    jars_dir.mkdir(parents=True, exist_ok=True)
    with open(jars_dir / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _entries(lock: dict, groups) -> list[tuple[str, dict]]:
    out = []
    for group in groups:
        if group not in lock["groups"]:
            raise JarsError(f"unknown jar group {group!r}; known: {sorted(lock['groups'])}")
        out.extend((group, e) for e in lock["groups"][group])
    return out


def fetch(groups=GROUPS, *, jars_dir: Path | None = None, lock_file: Path | None = None,
          quiet: bool = False) -> None:
    """Make ``jars_dir/<group>/`` hold every locked jar of ``groups``, checksum-verified.

    Present and valid files are kept (no Maven start at all); missing or corrupt ones are
    obtained in one ``mvn dependency:copy-dependencies`` run, then verified.  A checksum
    mismatch deletes the file and raises ``JarsError``.
    """
    if isinstance(groups, str):
        groups = (groups,)
    jars_dir = Path(jars_dir) if jars_dir else default_jars_dir()
    started = time.monotonic()
    lock = load_lock(lock_file)
    entries = _entries(lock, groups)
    with _dir_lock(jars_dir):
        stamp = _load_stamp(jars_dir)
        missing = []
        for group, entry in entries:
            rel = f"{group}/{entry['file']}"
            path = jars_dir / rel
            if not _is_valid(path, entry, stamp, rel):
                if path.exists():  # present but wrong: never keep a file that fails its pin
                    path.unlink()
                missing.append((group, entry))
        fetched_bytes = 0
        if missing:
            try:
                fetched_bytes = _fetch_missing(jars_dir, missing, stamp)
            finally:
                _save_stamp(jars_dir, stamp)
        elif stamp != _load_stamp(jars_dir):
            _save_stamp(jars_dir, stamp)
    if not quiet:
        took = time.monotonic() - started
        where = _display(jars_dir)
        if missing:
            msg = (f"jars: fetched {len(missing)} of {len(entries)} pinned jars "
                   f"({fetched_bytes / 1e6:.1f} MB) with Maven into {where}, sha256 verified ({took:.1f}s)")
        else:
            msg = f"jars: all {len(entries)} pinned jars present and verified in {where} ({took:.2f}s)"
        print(msg, file=sys.stderr)


def _display(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _fetch_missing(jars_dir: Path, missing: list[tuple[str, dict]], stamp: dict) -> int:
    resolve = jars_dir / ".resolve"
    out = resolve / "out"
    shutil.rmtree(resolve, ignore_errors=True)
    out.mkdir(parents=True)
    deps, seen = [], set()
    for _, entry in missing:
        if entry["coords"] not in seen:
            seen.add(entry["coords"])
            deps.append(_dependency_xml(entry["coords"], transitive=False))
    (resolve / "pom.xml").write_text(_pom("fetch", deps))
    _run_mvn(["dependency:copy-dependencies", "-DexcludeTransitive=true",
              f"-DoutputDirectory={out}", "-Dmdep.copyPom=false"], cwd=resolve)
    total = 0
    errors = []
    for group, entry in missing:
        src = out / entry["file"]
        dest = jars_dir / group / entry["file"]
        dest.parent.mkdir(parents=True, exist_ok=True)
        if not src.exists():
            errors.append(f"Maven did not produce {entry['file']} for {entry['coords']}")
            continue
        tmp = dest.with_name(dest.name + ".part")
        shutil.copyfile(src, tmp)
        try:
            verify_file(tmp, entry)
        except JarsError as exc:
            errors.append(str(exc).replace(tmp.name, dest.name))
            continue
        os.replace(tmp, dest)
        st = dest.stat()
        stamp[f"{group}/{entry['file']}"] = [st.st_size, st.st_mtime_ns, entry["sha256"]]
        total += st.st_size
    shutil.rmtree(resolve, ignore_errors=True)
    if errors:
        raise JarsError("could not obtain the pinned jars:\n  " + "\n  ".join(errors))
    return total


def group_jars(group: str, *, jars_dir: Path | None = None, fetch_missing: bool = True) -> list[Path]:
    """Paths of the locked jars of ``group`` (fetched first if any is missing)."""
    jars_dir = Path(jars_dir) if jars_dir else default_jars_dir()
    entries = load_lock()["groups"].get(group)
    if entries is None:
        raise JarsError(f"unknown jar group {group!r}")
    paths = [jars_dir / group / e["file"] for e in entries]
    if fetch_missing and not all(p.is_file() for p in paths):
        fetch((group,), jars_dir=jars_dir)
    return paths


def connector_jar() -> Path:
    """The Flink SQL Kafka connector jar (fetched if missing)."""
    (path,) = [p for p in group_jars("flink") if p.name.startswith("flink-sql-connector-kafka-")]
    return path


def kafka_classpath() -> str:
    """Colon-joined classpath of the Kafka broker jars (fetched if missing)."""
    return os.pathsep.join(str(p) for p in group_jars("kafka"))


# ---------------------------------------------------------------------------- lock

_LIST_LINE = re.compile(r"^\s*([^:\s]+):([^:\s]+):([^:\s]+):(?:([^:\s]+):)?([^:\s]+):(compile|runtime):(/.+?)(?:\s+--.*)?$")


def lock(lock_file: Path | None = None) -> dict:
    """Resolve ``ROOTS`` once with Maven and write the pinned lock file (sorted, stable)."""
    lock_file = Path(lock_file) if lock_file else LOCK_FILE
    with tempfile.TemporaryDirectory(prefix="modelserving-lock-") as tmp:
        root = Path(tmp)
        # One reactor, one module per group: each group is resolved on its own (its own
        # version mediation), yet Maven starts only once.
        for group, spec in ROOTS.items():
            (root / group).mkdir()
            deps = [_dependency_xml(c, spec["transitive"]) for c in spec["artifacts"]]
            (root / group / "pom.xml").write_text(_pom(f"group-{group}", deps))
        (root / "pom.xml").write_text(_pom("lock", [], packaging="pom", modules=list(ROOTS)))
        _run_mvn(["dependency:list", "-DincludeScope=runtime", "-DexcludeTypes=pom",
                  "-DoutputAbsoluteArtifactFilename=true", "-DoutputFile=deps.txt",
                  "-DappendOutput=false"], cwd=root)
        groups = {}
        for group in ROOTS:
            entries = {}
            for line in (root / group / "deps.txt").read_text().splitlines():
                m = _LIST_LINE.match(line)
                if not m:
                    continue
                g, a, t, classifier, v, _scope, path = m.groups()
                coords = f"{g}:{a}:{t}:{classifier}:{v}" if classifier or t != "jar" else f"{g}:{a}:{v}"
                file = Path(path.strip())
                entries[coords] = {
                    "coords": coords,
                    "file": _file_name(coords),
                    "sha256": sha256_file(file),
                    "size": file.stat().st_size,
                }
            if not entries:
                raise JarsError(f"Maven resolved nothing for group {group!r}; see {root / group / 'deps.txt'}")
            names = [e["file"] for e in entries.values()]
            if len(set(names)) != len(names):
                raise JarsError(f"file name clash in group {group!r}: {sorted(names)}")
            groups[group] = [entries[k] for k in sorted(entries)]
    data = {
        "comment": "Pinned jars; refresh with `python -m modelserving.local.jars lock`, fetch with "
                   "`python -m modelserving.local.jars fetch`. Edit ROOTS in jars.py, not this file.",
        "roots": {g: spec["artifacts"] for g, spec in ROOTS.items()},
        "groups": groups,
    }
    lock_file.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    n = sum(len(v) for v in groups.values())
    size = sum(e["size"] for v in groups.values() for e in v)
    print(f"jars: locked {n} jars ({size / 1e6:.1f} MB) in {_display(lock_file)}", file=sys.stderr)
    return data


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m modelserving.local.jars", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_fetch = sub.add_parser("fetch", help="obtain and verify the pinned jars (idempotent)")
    p_fetch.add_argument("groups", nargs="*", metavar="GROUP",
                         help=f"groups to fetch, of {', '.join(GROUPS)} (default: all)")
    sub.add_parser("lock", help="re-resolve ROOTS with Maven and rewrite the lock file")
    sub.add_parser("classpath", help="print the Kafka broker classpath")
    sub.add_parser("connector", help="print the path of the Flink Kafka connector jar")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "fetch":
            fetch(tuple(args.groups) or GROUPS)
        elif args.cmd == "lock":
            lock()
        elif args.cmd == "classpath":
            print(kafka_classpath())
        elif args.cmd == "connector":
            print(connector_jar())
    except JarsError as exc:
        print(f"jars: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
