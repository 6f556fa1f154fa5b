"""Fixtures shared by every test tier."""
from __future__ import annotations

from pathlib import Path

import pytest

TUTORIAL_DIR = Path(__file__).resolve().parents[2] / "shared" / "tutorial"


@pytest.fixture(scope="session")
def tutorial_dir() -> Path:
    if not (TUTORIAL_DIR / "winequality_red.csv").exists():
        pytest.skip(f"the original tutorial's artifacts are not at {TUTORIAL_DIR}")
    return TUTORIAL_DIR


@pytest.fixture(scope="session")
def trained_models(tmp_path_factory):
    """The project's own demo models, one per format, trained once per test session."""
    from modelserving.demo.training import train_all

    out = tmp_path_factory.mktemp("models")
    return {model.model_type: model for model in train_all(out)}
