"""The one interface every model format implements: load, score a batch, close.

A runtime is built from a validated ``ModelDescriptor`` (inline bytes already checked against
the size limit, a location already resolved inside the configured model directories) and
scores a ``FeatureBatch``: a float64 matrix whose columns are ``runtime.input_names``.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class Prediction:
    """One scored record. ``value`` is the regression output, or the predicted class index."""

    value: float
    label: str = ""
    probabilities: tuple[float, ...] = ()
    class_labels: tuple[str, ...] = ()


@dataclass(frozen=True)
class FeatureBatch:
    """Rows to score; ``values[i, j]`` is feature ``names[j]`` of row ``i``."""

    names: tuple[str, ...]
    values: np.ndarray  # shape (rows, len(names)), float64

    def __len__(self) -> int:
        return self.values.shape[0]


@dataclass(frozen=True)
class LoadRequest:
    """What a runtime needs from a descriptor; built by ``udfs.models.validate_descriptor``."""

    name: str
    version: str
    data_type: str
    model_type: int
    data: bytes | None = None        # inline model bytes
    location: Path | None = None     # resolved, confined model location
    input_features: tuple[str, ...] = ()
    signature: str = ""
    class_labels: tuple[str, ...] = ()
    extra: dict = field(default_factory=dict)


class ModelRuntime(abc.ABC):
    """A loaded model. Not thread-safe; one instance per Flink subtask."""

    #: Feature names the model reads, in the column order ``score`` expects.
    input_names: tuple[str, ...]

    @classmethod
    @abc.abstractmethod
    def load(cls, request: LoadRequest) -> "ModelRuntime":
        """Build the model; raise ``udfs.errors.ModelLoadError`` with a readable reason."""

    @abc.abstractmethod
    def score(self, batch: FeatureBatch) -> Sequence[Prediction]:
        """Score every row; ``batch.names`` equals ``self.input_names``."""

    def close(self) -> None:
        """Release native resources; called when a newer model replaces this one."""
