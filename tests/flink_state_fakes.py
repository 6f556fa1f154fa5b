"""Flink keyed state in memory, for unit tests of code that reads and writes state through
PyFlink's ``ValueState``/``MapState`` calls (no JVM)."""
from __future__ import annotations


class DictMapState:
    """A ``MapState`` on a dict (``stored``, given or new), holding what Flink would store."""

    def __init__(self, stored: dict | None = None):
        self.stored = {} if stored is None else stored

    def contains(self, key):
        return key in self.stored

    def get(self, key):
        return self.stored[key]

    def put(self, key, value):
        self.stored[key] = value

    def remove(self, key):
        del self.stored[key]

    def keys(self):
        return list(self.stored)

    def items(self):
        return list(self.stored.items())

    def clear(self):
        self.stored.clear()


class Metrics:
    """A metric group: its gauges go into ``gauges`` by their full dotted name."""

    def __init__(self, gauges: dict, prefix: str = ""):
        self.gauges, self.prefix = gauges, prefix

    def add_group(self, name, value=None):
        return Metrics(self.gauges, f"{self.prefix}{name}." + (f"{value}." if value is not None else ""))

    def gauge(self, name, read):
        self.gauges[self.prefix + name] = read


class Value:
    def __init__(self, store, name):
        self.store, self.name = store, name

    def value(self):
        return self.store.get(self.name)

    def update(self, value):
        self.store[self.name] = value

    def clear(self):
        self.store.pop(self.name, None)


class KeyedContext:
    """Runtime, element and timer context of one key; ``state`` is the key's whole state."""

    def __init__(self, state=None, key="wine-cultivar"):
        self.state = {} if state is None else state
        self.key = key
        self.processing_timers, self.event_timers = set(), set()
        self.gauges: dict = {}

    def get_metrics_group(self):
        return Metrics(self.gauges)

    def gauge(self, suffix: str):
        """The value of the one gauge whose name ends with ``suffix``."""
        [read] = [read for name, read in self.gauges.items() if name.endswith(suffix)]
        return read()

    def get_index_of_this_subtask(self):
        return 0

    def get_state(self, descriptor):
        return Value(self.state, descriptor.name)

    def get_map_state(self, descriptor):
        return DictMapState(self.state.setdefault(descriptor.name, {}))

    def get_current_key(self):
        return self.key

    def timer_service(self):
        return self

    def current_processing_time(self):
        return 1_000

    def register_processing_time_timer(self, t):
        self.processing_timers.add(t)

    def register_event_time_timer(self, t):
        self.event_timers.add(t)
