"""How the joins keep bytes in Flink state in each Python execution mode: thread mode as
latin-1 strings (PyFlink 2.2 breaks byte[] state there), exact for every byte value."""
from __future__ import annotations

from pyflink.common.typeinfo import BasicTypeInfo, PrimitiveArrayTypeInfo

from flink_state_fakes import DictMapState
from jobs.settings import Settings
from udfs.flink.state_bytes import StateBytes, broadcast_states

EVERY_BYTE = bytes(range(256)) * 3


class ThreadModeEmptyValueState:
    """PyFlink 2.2 thread mode's empty byte[] ValueState: ``value()`` raises TypeError."""

    def __init__(self):
        self.stored = None

    def value(self):
        if self.stored is None:
            raise TypeError("'NoneType' object is not iterable")
        return self.stored

    def update(self, value):
        self.stored = value

    def clear(self):
        self.stored = None


def test_thread_mode_stores_strings_that_give_back_every_byte():
    coding = StateBytes.of(Settings(python_execution_mode="thread"))
    assert isinstance(coding.type_info, BasicTypeInfo)
    state = DictMapState()
    wrapped = coding.map(state)
    wrapped.put("wine", EVERY_BYTE)
    assert isinstance(state.stored["wine"], str) and len(state.stored["wine"]) == len(EVERY_BYTE)
    assert wrapped.contains("wine") and wrapped.get("wine") == EVERY_BYTE
    assert list(wrapped.keys()) == ["wine"] and list(wrapped.items()) == [("wine", EVERY_BYTE)]
    wrapped.remove("wine")
    assert not wrapped.contains("wine")


def test_process_mode_stores_the_bytes_themselves():
    coding = StateBytes.of(Settings())
    assert isinstance(coding.type_info, PrimitiveArrayTypeInfo)
    state = DictMapState()
    coding.map(state).put("wine", EVERY_BYTE)
    assert state.stored["wine"] is EVERY_BYTE


def test_an_empty_value_reads_as_none_and_a_stored_one_round_trips():
    for mode in ("thread", "process"):
        value = StateBytes.of(Settings(python_execution_mode=mode)).value(ThreadModeEmptyValueState())
        assert value.value() is None
        value.update(b"\x00\xff descriptor")
        assert value.value() == b"\x00\xff descriptor"
        value.clear()
        assert value.value() is None


def test_broadcast_state_names_do_not_depend_on_the_mode():
    """A pipeline and its join must name the broadcast state alike; only the type differs."""
    names = lambda mode: [d.name for d in broadcast_states(StateBytes(mode))]
    assert names(True) == names(False) == [
        "model-descriptors", "model-ids", "model-slots", "model-slot-ids", "speculative-sets",
        "repository-entries", "candidate-slots"]
