"""`tunery demo` as the README runs it: offline, and fine-tuning visibly helps on held-out rows; then its run
exported to GGUF and scored there (`tunery eval RUN --gguf`), on the same demo run (one demo per session)."""

from __future__ import annotations

import json

import pytest

from .conftest import run_cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("demo")
    proc = run_cli("demo", "--out", str(root / "demo"), home=root / "home")
    (run,) = (root / "demo" / "runs").glob("demo-*")
    return {"proc": proc, "run": run, "home": root / "home"}


def test_demo_lifts_exact_match_from_near_zero_to_well_above_half(demo):
    proc = demo["proc"]
    assert "exact_match" in proc.stdout + proc.stderr
    report = json.loads((demo["run"] / "eval" / "report.json").read_text())
    assert report["generated"] >= 40
    assert report["base"]["exact_match"] <= 0.05
    assert report["fine_tuned"]["exact_match"] >= 0.6


def test_the_demo_run_exported_to_f16_scores_like_torch(demo):
    """`tunery export` to f16 and q8_0, then `tunery eval RUN --gguf`: on the demo's held-out rows the f16 file's
    exact match is the torch model's (tests/export/test_gguf_eval.py covers the rest of eval --gguf)."""
    run, home = demo["run"], demo["home"]
    run_cli("export", str(run), "--gguf", "f16", "--gguf", "q8_0", "--no-score", home=home)
    proc = run_cli("eval", str(run), "--gguf", str(run / "export" / f"{run.name}-f16.gguf"),
                   "--gguf", str(run / "export" / f"{run.name}-q8_0.gguf"), home=home)
    assert f"{run.name}-f16.gguf" in proc.stdout
    rows = json.loads((run / "eval" / "gguf_report.json").read_text())["rows"]
    assert rows["torch"]["exact_match"] >= 0.6
    assert rows[f"{run.name}-f16.gguf"]["exact_match"] == rows["torch"]["exact_match"]
    assert rows[f"{run.name}-q8_0.gguf"]["exact_match"] >= rows["torch"]["exact_match"] - 0.05
