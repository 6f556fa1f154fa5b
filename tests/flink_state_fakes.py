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
