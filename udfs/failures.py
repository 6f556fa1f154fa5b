"""Failures of the project's own code while serving: logged, never raised into Flink.

A bug that fails on every record would write a stack trace per record; ``FailureLog`` logs
at most one stack trace per kind of failure (where it happened and the exception type) per
window, and says how many of the same kind it left out since the last one it wrote.
"""
from __future__ import annotations

import logging
import time
from typing import Callable


class FailureLog:
    WINDOW_SECONDS = 60.0

    def __init__(self, logger: logging.Logger, window_seconds: float = WINDOW_SECONDS,
                 clock: Callable[[], float] = time.monotonic):
        self.logger = logger
        self.window_seconds = window_seconds
        self.clock = clock
        self._last: dict[tuple[str, str], float] = {}
        self._suppressed: dict[tuple[str, str], int] = {}

    def failed(self, where: str, exc: BaseException) -> bool:
        """Log ``exc`` at ERROR with its stack trace, unless one of the same kind was logged
        within the window (then only count it). True when it was logged."""
        try:
            kind = (where, type(exc).__name__)
            now = self.clock()
            last = self._last.get(kind)
            if last is not None and now - last < self.window_seconds:
                self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
                return False
            suppressed = self._suppressed.pop(kind, 0)
            self._last[kind] = now
            more = (f" ({suppressed} more like it in the last {now - last:.0f} s were not logged)"
                    if suppressed and last is not None else "")
            self.logger.error("internal error %s: %s%s", where, describe(exc), more,
                              exc_info=(type(exc), exc, exc.__traceback__))
            return True
        except Exception:   # logging must never be the failure that stops serving
            return False


def describe(exc: BaseException) -> str:
    """"Type: message", as a dead letter's reason states an internal error. Never raises: an
    exception whose message cannot be read (a broken ``__str__``) says so instead."""
    try:
        message = str(exc)
    except Exception:
        message = "(its message could not be read)"
    return f"{type(exc).__name__}: {message}"
