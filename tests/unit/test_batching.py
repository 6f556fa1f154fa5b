"""Micro-batching: when pending records are scored, driven the way Flink drives it, no JVM.

A fake parallel instance plays Flink's part: a current key that scopes the list state,
processing time that only moves when the test says so, timers kept per key and fired in
time order, and the final watermark of a bounded input. A restore is a new instance over
the list state a checkpoint kept, with the timers Flink keeps alongside it.
"""
from __future__ import annotations

from types import SimpleNamespace

from udfs.flink.batching import END_OF_INPUT, MicroBatcher


class KeyedListState:
    """Flink's keyed list state: one list per key, the key being the current key."""

    def __init__(self, lists: dict | None = None):
        self.lists = {key: list(values) for key, values in (lists or {}).items()}
        self.key = None
        self.reads: dict = {}

    def get(self):
        self.reads[self.key] = self.reads.get(self.key, 0) + 1
        return list(self.lists.get(self.key, ()))

    def add(self, value):
        self.lists.setdefault(self.key, []).append(value)

    def clear(self):
        self.lists.pop(self.key, None)


class Timers:
    """A timer service of the current key; Flink keeps one timer per (key, time)."""

    def __init__(self, now: int = 0):
        self.now = now
        self.key = None
        self.processing: set = set()
        self.event: set = set()
        self.registrations: list = []

    def current_processing_time(self) -> int:
        return self.now

    def register_processing_time_timer(self, timestamp: int) -> None:
        self.processing.add((self.key, timestamp))
        self.registrations.append(("processing", self.key, timestamp))

    def register_event_time_timer(self, timestamp: int) -> None:
        self.event.add((self.key, timestamp))
        self.registrations.append(("event", self.key, timestamp))


class Instance:
    """One parallel instance of a join: what it scored, batch by batch, as (key, records)."""

    def __init__(self, max_size: int = 3, max_wait_ms: int = 100, state: KeyedListState | None = None,
                 timers: Timers | None = None):
        self.state = state or KeyedListState()
        self.timers = timers or Timers()
        self.batcher = MicroBatcher(self.state, max_size, max_wait_ms)
        self.scored: list[tuple[str, list[bytes]]] = []

    def _on(self, key) -> None:
        self.state.key = self.timers.key = key

    def _score(self, key, raws: list[bytes]) -> None:
        if raws:
            self.scored.append((key, raws))

    def record(self, key, raw: bytes) -> None:
        self._on(key)
        self._score(key, self.batcher.add(key, raw, self.timers))

    def take(self, key) -> None:
        """What a keyed join does before it installs a new model of ``key``."""
        self._on(key)
        self._score(key, self.batcher.take(key))

    def advance(self, ms: int) -> None:
        """Let processing time pass; due timers fire in time order."""
        self.timers.now += ms
        for key, timestamp in sorted(t for t in self.timers.processing if t[1] <= self.timers.now):
            self.timers.processing.discard((key, timestamp))
            self.fire(key, timestamp)

    def fire(self, key, timestamp: int) -> None:
        self._on(key)
        self._score(key, self.batcher.on_processing_timer(key, timestamp))

    def end_of_input(self) -> None:
        """The final watermark of a bounded input: every event-time timer fires."""
        for key, timestamp in sorted(self.timers.event):
            assert timestamp == END_OF_INPUT
            self._on(key)
            self._score(key, self.batcher.on_end_of_input(key))
        self.timers.event.clear()


def records(prefix: str, n: int) -> list[bytes]:
    return [f"{prefix}{i}".encode() for i in range(1, n + 1)]


def test_a_batch_is_scored_as_soon_as_it_is_full():
    instance = Instance(max_size=3)
    a1, a2, a3, a4 = records("a", 4)
    b1, = records("b", 1)
    for key, raw in [("a", a1), ("b", b1), ("a", a2)]:
        instance.record(key, raw)
    assert instance.scored == []
    instance.record("a", a3)
    assert instance.scored == [("a", [a1, a2, a3])]
    assert "a" not in instance.state.lists and instance.state.lists["b"] == [b1]
    instance.record("a", a4)   # a new batch starts
    assert instance.scored == [("a", [a1, a2, a3])] and instance.state.lists["a"] == [a4]


def test_the_wait_timer_scores_a_partial_batch():
    instance = Instance(max_size=10, max_wait_ms=100)
    r1, r2, r3 = records("r", 3)
    instance.record("k", r1)
    instance.advance(60)
    instance.record("k", r2)    # joins the waiting batch: its wait counts from r1
    assert [t for t in instance.timers.registrations if t[0] == "processing"] == [("processing", "k", 100)]
    instance.advance(39)
    assert instance.scored == []
    instance.advance(1)
    assert instance.scored == [("k", [r1, r2])] and "k" not in instance.state.lists
    instance.record("k", r3)    # the next batch has a timer of its own
    assert ("k", 200) in instance.timers.processing
    instance.advance(100)
    assert instance.scored == [("k", [r1, r2]), ("k", [r3])]


def test_other_timers_of_the_key_do_not_score_a_batch_early():
    """The statistics timer of the same key fires through the same callback."""
    instance = Instance(max_size=10, max_wait_ms=100)
    r1, = records("r", 1)
    instance.record("k", r1)
    instance.fire("k", 30)       # a timer registered before the batch's, now due
    instance.fire("other", 100)  # another key's timer
    assert instance.scored == []
    instance.advance(100)
    assert instance.scored == [("k", [r1])]


def test_the_timer_of_a_batch_scored_when_full_serves_the_next_batch():
    """After a full batch the old timer stays registered: the next batch is scored by it, so
    no record ever waits longer than the wait."""
    instance = Instance(max_size=2, max_wait_ms=100)
    r1, r2, r3 = records("r", 3)
    instance.record("k", r1)
    instance.record("k", r2)     # full: scored, its timer (100) still registered
    instance.advance(30)
    instance.record("k", r3)
    instance.advance(70)
    assert instance.scored == [("k", [r1, r2]), ("k", [r3])]
    assert [t for t in instance.timers.registrations if t[0] == "processing"] == [("processing", "k", 100)]


def test_a_batch_is_scored_before_a_model_change():
    instance = Instance(max_size=10)
    r1, r2, r3 = records("r", 3)
    instance.record("k", r1)
    instance.record("k", r2)
    instance.take("k")           # the keyed join, before installing the new model
    instance.take("k")           # nothing left: no empty batch
    instance.record("k", r3)
    instance.advance(100)
    assert instance.scored == [("k", [r1, r2]), ("k", [r3])]


def test_the_end_of_a_bounded_input_scores_every_waiting_batch():
    instance = Instance(max_size=10, max_wait_ms=10_000)
    a1, a2 = records("a", 2)
    b1, = records("b", 1)
    for key, raw in [("a", a1), ("b", b1), ("a", a2)]:
        instance.record(key, raw)
    assert sorted(t for t in instance.timers.registrations if t[0] == "event") == [
        ("event", "a", END_OF_INPUT), ("event", "b", END_OF_INPUT)]   # once per key
    instance.end_of_input()
    assert sorted(instance.scored) == [("a", [a1, a2]), ("b", [b1])]
    assert instance.state.lists == {}


def test_after_a_restore_the_restored_records_are_scored_once():
    before = Instance(max_size=3, max_wait_ms=100)
    a1, a2, a3, a4 = records("a", 4)
    b1, = records("b", 1)
    c1, = records("c", 1)
    for key, raw in [("a", a1), ("b", b1), ("a", a2), ("c", c1)]:
        before.record(key, raw)
    assert before.scored == []
    # a checkpoint keeps the list state and the timers; the in-memory copy is lost
    state = KeyedListState(before.state.lists)
    timers = Timers(now=50)
    timers.processing = set(before.timers.processing)
    timers.event = set(before.timers.event)
    after = Instance(max_size=3, max_wait_ms=100, state=state, timers=timers)

    after.record("a", a3)                     # fills the restored batch of "a"
    assert after.scored == [("a", [a1, a2, a3])]
    after.record("a", a4)
    after.fire("b", 100)                      # "b"'s restored timer
    assert after.scored == [("a", [a1, a2, a3]), ("b", [b1])]
    after.end_of_input()                      # "c" was never touched since the restore
    scored = [raw for _, batch in after.scored for raw in batch]
    assert sorted(scored) == sorted([a1, a2, a3, a4, b1, c1])   # none lost, none twice
    assert state.lists == {}
    assert state.reads == {"a": 1, "b": 1, "c": 1}   # each key's state read once


def test_batches_are_per_data_type_in_arrival_order_and_never_over_the_size():
    """A broadcast join's key holds records of any data type; a restore under a smaller
    batch_max_size can bring more records than a batch holds."""
    batcher = MicroBatcher(KeyedListState(), max_size=2, max_wait_ms=5)
    raws = [b"x1", b"y1", b"x2", b"x3", b"y2"]
    assert list(batcher.batches(raws, lambda raw: raw[:1].decode())) == [
        ("x", [b"x1", b"x2"]), ("x", [b"x3"]), ("y", [b"y1", b"y2"])]


# -- the keyed join around the batcher ---------------------------------------------------


class FakeState:
    def __init__(self):
        self.by_key: dict = {}
        self.key = None

    def value(self):
        return self.by_key.get(self.key)

    def update(self, value):
        self.by_key[self.key] = value

    def clear(self):
        self.by_key.pop(self.key, None)


class FakeMapState(FakeState):
    def get(self, name):
        return (self.value() or {}).get(name)

    def put(self, name, value):
        self.by_key.setdefault(self.key, {})[name] = value

    def items(self):
        return list((self.value() or {}).items())


class FakeGroup:
    def add_group(self, *names):
        return self

    def gauge(self, name, read):
        pass


class FakeRuntime:
    """The RuntimeContext of a keyed operator: every state follows the current key."""

    def __init__(self):
        self.states: list = []

    def _keyed(self, state):
        self.states.append(state)
        return state

    def get_index_of_this_subtask(self):
        return 0

    def get_metrics_group(self):
        return FakeGroup()

    def get_state(self, descriptor):
        return self._keyed(FakeState())

    def get_map_state(self, descriptor):
        return self._keyed(FakeMapState())

    def get_list_state(self, descriptor):
        return self._keyed(KeyedListState())

    def at(self, key, timers, time_domain=None):
        """The context of an element (or a timer of ``time_domain``) of ``key``."""
        for state in self.states:
            state.key = key
        timers.key = key
        return SimpleNamespace(get_current_key=lambda: key, timer_service=lambda: timers,
                               time_domain=lambda: time_domain)


def test_the_keyed_join_scores_waiting_records_by_the_model_they_arrived_under(trained_models, tmp_path):
    from pyflink.datastream import TimeDomain

    from jobs.settings import Settings
    from modelserving.demo.training import DEMO_DATA_TYPE, descriptor_for
    from modelserving.demo.training import demo_rows
    from modelserving.kafka.clients import encode_record
    from protos import ModelType, ServingResult
    from udfs.flink.joins import DEAD_LETTERS, KeyedServing

    model_dir = next(m.path for m in trained_models.values() if not m.inline).parent
    settings = Settings.from_sources([], environ={}, model_dirs=(str(model_dir),), state_topic="",
                                     batch_max_size=4, batch_max_wait_ms=100,
                                     max_model_bytes=5_000_000).for_job("keyed")
    join = KeyedServing(settings, {})
    runtime, timers = FakeRuntime(), Timers()
    join.open(runtime)
    rows = demo_rows()[:5]
    raws = [encode_record(row) for row in rows]
    onnx = descriptor_for(trained_models[ModelType.ONNX]).SerializeToString()

    def results(outputs):
        assert not any(isinstance(o, tuple) and o[0] is DEAD_LETTERS for o in outputs)
        return [(r.recordId, r.status) for r in map(ServingResult.FromString, outputs)]

    ctx = runtime.at(DEMO_DATA_TYPE, timers)
    before = [out for raw in raws[:2] for out in join.process_element1(raw, ctx)]
    at_change = list(join.process_element2(onnx, ctx))
    after = [out for raw in raws[2:] for out in join.process_element1(raw, ctx)]
    assert before == [] and after == []   # still waiting for a full batch or the timer
    timers.now = 100
    end = list(join.on_timer(100, runtime.at(DEMO_DATA_TYPE, timers, TimeDomain.PROCESSING_TIME)))

    assert results(at_change) == [(rows[0].record_id, ServingResult.NO_MODEL),
                                  (rows[1].record_id, ServingResult.NO_MODEL)]
    assert results(end) == [(row.record_id, ServingResult.SCORED) for row in rows[2:]]
    join.close()


def test_a_forgotten_flush_timer_is_registered_again_by_the_next_record():
    """When flushing fails, the join takes the batch itself and forgets the key's timer, so
    the next record does not wait for a full batch."""
    instance = Instance(max_size=10, max_wait_ms=100)
    r1, r2 = records("r", 2)
    instance.record("k", r1)
    instance.take("k")
    instance.batcher.forget_timer("k")
    instance.record("k", r2)
    assert [t for t in instance.timers.registrations if t[0] == "processing"] == \
        [("processing", "k", 100), ("processing", "k", 100)]
    instance.advance(100)
    assert instance.scored == [("k", [r1]), ("k", [r2])]
