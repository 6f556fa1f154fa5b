"""The container tests: their tooling (podman_tools) and the end-to-end helpers
(tests/e2e/jobrunner.py) are imported by name."""
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
for path in (HERE, HERE.parent / "e2e"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
