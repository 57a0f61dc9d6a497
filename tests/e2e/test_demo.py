"""`tunery demo` as the README runs it: offline, and fine-tuning visibly helps on held-out rows."""

from __future__ import annotations

import json

import pytest

from .conftest import run_cli

pytestmark = pytest.mark.slow


def test_demo_lifts_exact_match_from_near_zero_to_well_above_half(tmp_path):
    proc = run_cli("demo", "--out", str(tmp_path / "demo"), home=tmp_path / "home")
    assert "exact_match" in proc.stdout + proc.stderr
    (report_path,) = (tmp_path / "demo" / "runs").glob("demo-*/eval/report.json")
    report = json.loads(report_path.read_text())
    assert report["generated"] >= 40
    assert report["base"]["exact_match"] <= 0.05
    assert report["fine_tuned"]["exact_match"] >= 0.6
