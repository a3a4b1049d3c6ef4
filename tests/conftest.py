"""Shared fixtures: one tiny lab per test session, built where every test process can read it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture(scope="session")
def lab_cache(tmp_path_factory) -> Path:
    """DSFORGET_CACHE for the session: the tiny lab is built into it once, on first use."""
    return tmp_path_factory.mktemp("dsforget_cache")
