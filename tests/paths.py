"""Where things are, stated once so a test file can move between the test folders without
counting `parents[...]`."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
"""The repository root (pyproject.toml, docker/, docs/, the packages)."""

DATA = REPO / "tests" / "data"
"""The real-text samples the tests ship (sources and licences in its README)."""
