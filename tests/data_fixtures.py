"""Fixtures shared by the data-layer tests."""
from __future__ import annotations

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_shared = pytest.mark.skipif(not (SHARED_DATA / "README.md").is_file(), reason="../shared/data not present")


@pytest.fixture
def smoke_cfg(tmp_path, monkeypatch):
    """The smoke profile with a fresh cache root and, unless a test changes it, an empty data root."""
    from ctrlgen.config import load_profile

    monkeypatch.setenv("CTRLGEN_CACHE_ROOT", str(tmp_path / "cache"))
    monkeypatch.setenv("CTRLGEN_DATA_ROOT", str(tmp_path / "no-data"))
    return load_profile("smoke")
