"""`tunery export` end to end on a trained tiny run: verified GGUFs, an Ollama Modelfile, a Hub upload plan."""

from __future__ import annotations

import re

import pytest

from .conftest import run_cli, train_args

pytestmark = pytest.mark.slow


def test_export_writes_verified_ggufs_a_modelfile_and_a_dry_run_plan(workspace, tmp_path):
    run_cli(*train_args(workspace, "to-export", "--max-steps", "80"), home=workspace["home"])
    run = workspace["root"] / "runs" / "to-export"
    out = tmp_path / "export"
    proc = run_cli("export", str(run), "--gguf", "f16", "--gguf", "q4_k_m", "--ollama", "tiny-dates",
                   "--push-to-hub", "someone/tiny-dates", "--dry-run", "--out", str(out), home=workspace["home"])
    log = proc.stdout + proc.stderr
    for kind in ("f16", "q4_k_m"):
        assert (out / f"to-export-{kind}.gguf").stat().st_size > 0
    # f16 generates what torch does, token for token, except where torch's own two best logits nearly tie
    f16 = re.search(r"to-export-f16\.gguf: top-1 agreement (\d+)%, identical greedy generations (\d+)%"
                    r"( \(prompts \[[\d, ]+\] part at a near tie)?", log.replace("\n", " "))
    assert f16 and f16[1] == "100" and (f16[2] == "100" or f16[3]), log
    modelfile = (out / "Modelfile").read_text()
    assert "FROM ./to-export-q4_k_m.gguf" in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile
    assert "ollama create tiny-dates -f" in log
    assert "would push to https://huggingface.co/someone/tiny-dates" in proc.stdout
    assert "to-export-q4_k_m.gguf" in proc.stdout and "Modelfile" in proc.stdout and "library_name: peft" in proc.stdout

    offline = run_cli("export", str(run), "--push-to-hub", "someone/tiny-dates", home=workspace["home"],
                      check=False)
    assert offline.returncode == 2 and "HF_HUB_OFFLINE" in offline.stderr and "Traceback" not in offline.stderr
