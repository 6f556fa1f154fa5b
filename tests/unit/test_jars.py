"""The jar lock file and checksum verification (no downloads here)."""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest

from modelserving.local import jars

COORDS = re.compile(r"^[\w.\-]+:[\w.\-]+:(?:[\w.\-]+:[\w.\-]+:)?[\w.\-]+$")


def test_lock_file_format():
    lock = jars.load_lock()
    assert set(lock["groups"]) == {"flink", "kafka"}
    for group, entries in lock["groups"].items():
        assert entries, group
        assert entries == sorted(entries, key=lambda e: e["coords"]), f"{group} is not sorted"
        files = [e["file"] for e in entries]
        assert len(set(files)) == len(files), f"duplicate file names in {group}"
        for entry in entries:
            assert COORDS.match(entry["coords"]), entry
            assert re.fullmatch(r"[0-9a-f]{64}", entry["sha256"]), entry
            assert entry["file"].endswith(".jar") and "/" not in entry["file"], entry
            assert entry["size"] > 0, entry
    # the lock file is written stably: re-serializing gives the same text
    assert jars.LOCK_FILE.read_text() == json.dumps(lock, indent=2, sort_keys=True) + "\n"


def test_lock_pins_connector_and_a_runnable_broker():
    lock = jars.load_lock()
    assert [e["coords"] for e in lock["groups"]["flink"]] == [
        "org.apache.flink:flink-sql-connector-kafka:5.0.0-2.2"]
    kafka = {e["coords"].rsplit(":", 1)[0]: e["coords"].rsplit(":", 1)[1] for e in lock["groups"]["kafka"]}
    assert kafka["org.apache.kafka:kafka_2.13"].startswith("4.")
    assert kafka["org.apache.kafka:kafka-clients"] == kafka["org.apache.kafka:kafka_2.13"]
    # a logging backend for the broker, in step with the log4j2 version Kafka depends on
    assert kafka["org.apache.logging.log4j:log4j-slf4j-impl"] == kafka["org.apache.logging.log4j:log4j-core"]
    assert "org.apache.logging.log4j:log4j-api" in kafka
    assert "org.slf4j:slf4j-api" in kafka
    # jars of the lock are what ROOTS resolve to
    for group, spec in jars.ROOTS.items():
        coords = {e["coords"] for e in lock["groups"][group]}
        assert set(spec["artifacts"]) <= coords


@pytest.fixture
def fake_lock(tmp_path, monkeypatch):
    """A lock with one tiny fake jar, a jars dir holding a good copy, and no Maven."""
    payload = b"PK\x03\x04 not really a jar"
    entry = {"coords": "org.example:fake:1.0", "file": "fake-1.0.jar",
             "sha256": hashlib.sha256(payload).hexdigest(), "size": len(payload)}
    lock_file = tmp_path / "jars.lock.json"
    lock_file.write_text(json.dumps({"groups": {"flink": [entry]}}))
    jars_dir = tmp_path / "jars"
    (jars_dir / "flink").mkdir(parents=True)
    (jars_dir / "flink" / entry["file"]).write_bytes(payload)

    calls = []

    def fake_mvn(args, cwd):  # stands in for the one Maven run: "downloads" the jar into out/
        calls.append((args, cwd))
        out = next(a.split("=", 1)[1] for a in args if a.startswith("-DoutputDirectory="))
        pom = (cwd / "pom.xml").read_text()
        assert "<artifactId>fake</artifactId>" in pom and "<version>1.0</version>" in pom
        (Path(out) / entry["file"]).write_bytes(fake_mvn.serves)

    fake_mvn.serves = payload
    monkeypatch.setattr(jars, "_run_mvn", fake_mvn)
    return {"lock_file": lock_file, "jars_dir": jars_dir, "entry": entry, "payload": payload,
            "calls": calls, "mvn": fake_mvn}


def test_valid_files_are_kept_without_maven(fake_lock, capsys):
    jars.fetch(("flink",), jars_dir=fake_lock["jars_dir"], lock_file=fake_lock["lock_file"])
    jars.fetch(("flink",), jars_dir=fake_lock["jars_dir"], lock_file=fake_lock["lock_file"])
    assert fake_lock["calls"] == []
    assert "present and verified" in capsys.readouterr().err
    stamp = json.loads((fake_lock["jars_dir"] / jars.STAMP_NAME).read_text())
    assert "flink/fake-1.0.jar" in stamp


def test_corrupted_copy_is_detected_and_refetched(fake_lock):
    path = fake_lock["jars_dir"] / "flink" / "fake-1.0.jar"
    jars.fetch(("flink",), jars_dir=fake_lock["jars_dir"], lock_file=fake_lock["lock_file"], quiet=True)
    # same size, different bytes, mtime changed: the stamp cache must not hide it
    path.write_bytes(fake_lock["payload"][::-1])
    jars.fetch(("flink",), jars_dir=fake_lock["jars_dir"], lock_file=fake_lock["lock_file"], quiet=True)
    assert len(fake_lock["calls"]) == 1  # one Maven run fetched the replacement
    assert path.read_bytes() == fake_lock["payload"]


def test_mismatching_download_is_deleted_and_rejected(fake_lock):
    path = fake_lock["jars_dir"] / "flink" / "fake-1.0.jar"
    path.unlink()
    fake_lock["mvn"].serves = b"tampered bytes"
    with pytest.raises(jars.JarsError, match="checksum mismatch.*org.example:fake:1.0"):
        jars.fetch(("flink",), jars_dir=fake_lock["jars_dir"], lock_file=fake_lock["lock_file"], quiet=True)
    assert not path.exists()
    assert not list((fake_lock["jars_dir"] / "flink").iterdir())  # no partial file left behind


def test_verify_file_rejects_and_deletes(tmp_path):
    good = tmp_path / "a.jar"
    good.write_bytes(b"abc")
    entry = {"coords": "g:a:1", "sha256": hashlib.sha256(b"abc").hexdigest()}
    jars.verify_file(good, entry)
    assert good.exists()
    with pytest.raises(jars.JarsError, match="checksum mismatch"):
        jars.verify_file(good, {**entry, "sha256": "0" * 64})
    assert not good.exists()
