"""A small error hierarchy: every message names what a person needs to find the culprit.

Errors are turned into dead letters (raw bytes + reason) by the serving core; none of them
ever stops a job.
"""
from __future__ import annotations


class ServingError(Exception):
    """Base of every error the serving path turns into a dead letter."""


class RecordError(ServingError):
    """A data record that cannot be scored (unparsable, missing or NaN features...)."""


class ModelError(ServingError):
    """A model that cannot be served; the previous model of its data type keeps serving."""

    #: SHA-256 of the model when it was computed before the refusal (a model that loaded and
    #: then missed its validation gate), for the model repository; "" otherwise.
    digest: str = ""

    def __init__(self, reason: str, *, name: str = "", version: str = "", data_type: str = ""):
        self.reason = reason
        self.name = name
        self.version = version
        self.data_type = data_type
        super().__init__(self._describe())

    def _describe(self) -> str:
        who = []
        if self.name:
            who.append(f"model '{self.name}'" + (f" version '{self.version}'" if self.version else ""))
        if self.data_type:
            who.append(f"data type '{self.data_type}'")
        return f"{self.reason} ({', '.join(who)})" if who else self.reason


class UnknownModelType(ModelError):
    """The descriptor names a model type no runtime is registered for."""


class ModelRejected(ModelError):
    """The descriptor breaks a policy: too large, a location outside the model dirs, DOCTYPE..."""


class ModelLoadError(ModelError):
    """The model library could not build a model from the bytes or location."""


class OutputError(ValueError):
    """A model's outputs cannot be read as class probabilities, class labels or a regression
    value; raised while a runtime is built, where it becomes a ``ModelLoadError``."""


class ResultTooLarge(RecordError):
    """A result bigger than ``max_result_bytes`` (a model with a huge output)."""


class RecordTooLarge(RecordError):
    """A record bigger than ``max_record_bytes``: refused on arrival, before it waits for its
    batch in Flink state (a checkpoint would carry it)."""


class ModelUnavailable(RecordError):
    """An EXTERNAL model's server gave no usable answer for a batch (down, slower than the
    timeout, an error status, an unreadable answer, circuit open). The records are fine:
    their dead letters say so (kind MODEL_UNAVAILABLE), and they are not scored again one
    by one, since the server, not a record, failed."""


class ValidationFailed(ModelRejected):
    """A model that missed its descriptor's validation gate (``udfs.lifecycle.validation``):
    refused like any bad model, so the old one keeps serving; the reason carries the measured
    figures and ``outcome`` all of them."""

    def __init__(self, reason: str, *, outcome=None, **who):
        self.outcome = outcome
        super().__init__(reason, **who)
