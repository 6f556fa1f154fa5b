"""Canary and shadow serving of a candidate model beside the primary one (blue-green).

Canary: a share of the records goes to the candidate. Which ones is decided by a hash of the
record's id (BLAKE2b, not Python's ``hash``, which is salted per process), so a record goes
the same way on every subtask, after every restart and on every replay, and raising the
share only moves records from the primary to the candidate, never back.

Shadow: the candidate scores every record beside the primary, only the primary's answer is
a result; ``ShadowComparison`` counts how often the two agree and how far apart they score.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

from udfs.runtimes.base import Prediction

#: |score difference| within which two regressors agree, by default.
DEFAULT_TOLERANCE = 1e-6
_SCALE = float(1 << 64)


def route_point(key: str | bytes, salt: str = "") -> float:
    """Where ``key`` (a record id; the record's bytes when it has none) falls in [0, 1):
    uniform, and the same in every process. ``salt`` (e.g. the candidate's version) draws
    another sample of records for another canary."""
    data = key.encode() if isinstance(key, str) else bytes(key)
    digest = hashlib.blake2b(salt.encode() + b"\0" + data, digest_size=8, person=b"ms-canary")
    return int.from_bytes(digest.digest(), "big") / _SCALE


def goes_to_candidate(key: str | bytes, share: float, salt: str = "") -> bool:
    """True when the record of ``key`` is one of the candidate's ``share`` (in [0, 1])."""
    _check_share(share)
    return share >= 1.0 or (share > 0.0 and route_point(key, salt) < share)


def split(keys: Sequence[str | bytes], share: float,
          salt: str = "") -> tuple[list[int], list[int]]:
    """Positions of ``keys`` for the primary and for the candidate, each in input order."""
    _check_share(share)
    primary, candidate = [], []
    for position, key in enumerate(keys):
        (candidate if goes_to_candidate(key, share, salt) else primary).append(position)
    return primary, candidate


def _check_share(share: float) -> None:
    if not (isinstance(share, (int, float)) and 0.0 <= share <= 1.0):
        raise ValueError(f"a canary share lies in [0, 1], not {share!r}")


def score_difference(primary: Prediction, candidate: Prediction) -> float:
    """How much higher the candidate scores a record than the primary: for classifiers
    with the same class labels, the difference in the probability each gives to the
    primary's label (a class index is no scale); otherwise the difference of the values."""
    if (primary.probabilities and candidate.probabilities and primary.label
            and primary.class_labels == candidate.class_labels
            and primary.label in primary.class_labels):
        index = primary.class_labels.index(primary.label)
        return candidate.probabilities[index] - primary.probabilities[index]
    return candidate.value - primary.value


def agree(primary: Prediction, candidate: Prediction, tolerance: float = DEFAULT_TOLERANCE) -> bool:
    """Same label for classifiers; |score difference| within ``tolerance`` for regressors."""
    if primary.label or candidate.label:
        return primary.label == candidate.label
    return abs(candidate.value - primary.value) <= tolerance


@dataclass
class ShadowComparison:
    """Agreement and score difference of a candidate against the primary, record by record.

    Bounded: sums and counts only. ``snapshot``/``restore``/``merge`` for state and for
    adding up parallel instances."""

    tolerance: float = DEFAULT_TOLERANCE
    compared: int = 0
    agreed: int = 0
    difference_sum: float = 0.0
    abs_difference_sum: float = 0.0

    def add(self, primary: Prediction, candidate: Prediction) -> None:
        difference = score_difference(primary, candidate)
        self.compared += 1
        self.agreed += agree(primary, candidate, self.tolerance)
        if math.isfinite(difference):
            self.difference_sum += difference
            self.abs_difference_sum += abs(difference)

    def add_all(self, primaries: Iterable[Prediction], candidates: Iterable[Prediction]) -> None:
        """Compare two models' predictions of the same records, in the same order."""
        primaries, candidates = list(primaries), list(candidates)
        if len(primaries) != len(candidates):
            raise ValueError(f"{len(primaries)} primary predictions against {len(candidates)} "
                             f"of the candidate")
        for primary, candidate in zip(primaries, candidates):
            self.add(primary, candidate)

    @property
    def agreement_rate(self) -> float | None:
        """Share of compared records on which they agree; None before any."""
        return self.agreed / self.compared if self.compared else None

    @property
    def mean_score_difference(self) -> float | None:
        """Mean of candidate minus primary (``score_difference``); None before any."""
        return self.difference_sum / self.compared if self.compared else None

    @property
    def mean_abs_score_difference(self) -> float | None:
        return self.abs_difference_sum / self.compared if self.compared else None

    def snapshot(self) -> dict:
        return {"compared": self.compared, "agreed": self.agreed,
                "differenceSum": self.difference_sum, "absDifferenceSum": self.abs_difference_sum}

    def restore(self, snapshot: Mapping, add: bool = False) -> None:
        """Take the figures of ``snapshot``; ``add`` adds them to the current ones."""
        keep = 1 if add else 0
        self.compared = self.compared * keep + int(snapshot.get("compared", 0))
        self.agreed = self.agreed * keep + int(snapshot.get("agreed", 0))
        self.difference_sum = self.difference_sum * keep + float(snapshot.get("differenceSum", 0.0))
        self.abs_difference_sum = (self.abs_difference_sum * keep
                                   + float(snapshot.get("absDifferenceSum", 0.0)))

    def merge(self, other: "ShadowComparison") -> None:
        self.restore(other.snapshot(), add=True)

    def describe(self) -> str:
        if not self.compared:
            return "no record compared yet"
        return (f"agreement {self.agreement_rate:.1%} over {self.compared} records, mean score "
                f"difference {self.mean_score_difference:+.4g} (mean |difference| "
                f"{self.mean_abs_score_difference:.4g})")
