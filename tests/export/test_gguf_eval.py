"""`tunery eval RUN --gguf FILE...` and the table `tunery export` prints: exported GGUF files scored through
llama.cpp on the run's held-out rows beside the fine-tuned torch model (loss, exact match, ROUGE-L, replies
identical to torch's).

    HF_HUB_OFFLINE=1 .venv/bin/pytest tests/export/test_gguf_eval.py -q
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import SPEC, TRAIN_ROWS, date_rows

pytestmark = pytest.mark.slow


def _cli(*args: str, home: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TUNERY_HOME": str(home), "COLUMNS": "200"}
    proc = subprocess.run([sys.executable, "-m", "tunery.cli.app", *args], capture_output=True, text=True, env=env,
                          timeout=600)
    if check:
        assert proc.returncode == 0, f"tunery {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A run on a tiny Qwen2 (every weight trained, to learn the task in seconds; 20 held-out rows), exported by
    the CLI to f16 and q4_k_m."""
    from tunery.models.tiny import TinySpec, build_tiny_model, corpus_of

    root = tmp_path_factory.mktemp("gguf-eval")
    rows = date_rows()[:TRAIN_ROWS]
    data = root / "dates.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = build_tiny_model(root / "base", corpus_of(rows), TinySpec(family="qwen2", **SPEC))
    home = root / "home"
    _cli("train", "--model", str(model), "--data", str(data), "--output-dir", str(root / "runs"), "--name", "r",
         "--method", "full", "--max-seq-len", "64", "--batch-size", "16", "--lr", "3e-3", "--max-steps", "150",
         "--eval-samples", "0", "--max-new-tokens", "16", home=home)
    run = root / "runs" / "r"
    proc = _cli("export", str(run), "--gguf", "f16", "--gguf", "q4_k_m", home=home)
    return {"run": run, "home": home, "export_output": proc.stdout}


def test_export_prints_the_table_for_what_it_wrote(exported):
    out = exported["export_output"]
    for text in ("torch vs llama.cpp", "r-f16.gguf", "r-q4_k_m.gguf", "exact_match", "identical_to_torch"):
        assert text in out, out
    report = json.loads((exported["run"] / "eval" / "gguf_report.json").read_text())
    assert list(report["rows"]) == ["torch", "r-f16.gguf", "r-q4_k_m.gguf"]
    assert report["generated"] == report["eval_examples"] == 20


def test_eval_gguf_scores_the_file_beside_torch(exported):
    run = exported["run"]
    proc = _cli("eval", str(run), "--gguf", str(run / "export" / "r-f16.gguf"), home=exported["home"])
    assert "r-f16.gguf" in proc.stdout and "torch" in proc.stdout
    report = json.loads((run / "eval" / "gguf_report.json").read_text())
    torch_row, f16 = report["rows"]["torch"], report["rows"]["r-f16.gguf"]
    # this tiny model learns the layout of the answers in seconds (ROUGE-L), not yet the exact dates: the demo's
    # model does (tests/e2e/test_demo.py)
    assert torch_row["rouge_l"] >= 0.3
    assert f16["exact_match"] == torch_row["exact_match"] and f16["rouge_l"] == pytest.approx(torch_row["rouge_l"])
    assert f16["identical_to_torch"] >= 0.9
    assert abs(f16["loss"] - torch_row["loss"]) < 0.01  # llama.cpp's logits give the same held-out loss
    assert (run / "eval" / "gguf_report.md").read_text().count("| exact_match |") == 1
    assert all({"torch", "r-f16.gguf", "reference"} <= set(ex) for ex in report["examples"])


def test_a_missing_file_is_a_clear_error(exported):
    proc = _cli("eval", str(exported["run"]), "--gguf", str(exported["run"] / "nope.gguf"), home=exported["home"],
                check=False)
    assert proc.returncode != 0
    assert "no such GGUF file" in proc.stdout + proc.stderr and "Traceback" not in proc.stdout + proc.stderr
