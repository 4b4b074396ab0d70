"""Process setup (core/openmp.py, called first by cli/app.py): OpenMP's spin-wait is shortened unless the user chose a setting."""

from __future__ import annotations

import os

import pytest

from llm_torch.core.openmp import tune_openmp


@pytest.mark.parametrize(
    "given,expected",
    [({}, "1000"), ({"GOMP_SPINCOUNT": "50"}, "50"), ({"OMP_WAIT_POLICY": "ACTIVE"}, None)],
)
def test_openmp_spin_count(monkeypatch, given, expected):
    for name in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY"):
        monkeypatch.delenv(name, raising=False)
    for name, value in given.items():
        monkeypatch.setenv(name, value)
    tune_openmp()
    assert os.environ.get("GOMP_SPINCOUNT") == expected
