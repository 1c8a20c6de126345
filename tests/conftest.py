"""Shared fixtures. Tests that need real data skip with a reason when it is absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """The shared real-data folder: $LESSONS_SHARED_DATA, else <repo root>/../shared/data."""
    path = Path(os.environ.get("LESSONS_SHARED_DATA") or REPO_ROOT.parent / "shared" / "data")
    if not path.is_dir():
        pytest.skip(f"shared data folder {path} is absent (set LESSONS_SHARED_DATA to its location)")
    return path
