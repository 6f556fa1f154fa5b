"""The one way the tooling waits for something: poll a condition until a deadline."""
from __future__ import annotations

import time
from typing import Callable, TypeVar

from modelserving.errors import DeadlineExceeded

T = TypeVar("T")


def wait_until(condition: Callable[[], T], timeout_s: float, what: str, *,
               interval_s: float = 0.2, details: Callable[[], str] | None = None) -> T:
    """Call ``condition`` until it returns something truthy, and return that.

    At the deadline raise ``DeadlineExceeded`` naming ``what`` was awaited, followed by
    ``details()`` (a log tail, say) when given. ``condition`` may itself raise to give up
    early (a process that exited, for instance)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            message = f"{what}: not done after {timeout_s:g} s"
            extra = details() if details else ""
            raise DeadlineExceeded(message + (f"\n{extra}" if extra else ""))
        time.sleep(interval_s)
