"""Expected failures of the tooling: each says in one line what went wrong and what to do.

The CLI's entry point prints ``modelserving: <message>`` and exits non-zero for these;
anything else is a bug and keeps its traceback.
"""
from __future__ import annotations


class ToolError(Exception):
    """A failure a user can act on (a broker that does not answer, a port in use...)."""

    exit_code = 1


class UsageError(ToolError):
    """A command or setting that cannot be right (wrong value, unknown name)."""

    exit_code = 2


class KafkaToolError(ToolError):
    """Kafka refused or did not answer: topics, producing, consuming, authentication."""


class LocalKafkaError(ToolError):
    """The local broker could not be started or stopped."""


class FlinkClusterError(ToolError):
    """The local Flink cluster, or a job on it, did not do what was asked."""


class JarsError(ToolError):
    """A pinned jar could not be fetched or failed its checksum."""


class DeadlineExceeded(ToolError):
    """Something awaited did not happen in time."""
