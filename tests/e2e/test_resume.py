"""A run SIGKILLed after a checkpoint and resumed ends on the same loss curve as an uninterrupted one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from .conftest import metrics, run_cli, train_args

pytestmark = pytest.mark.slow

STEPS, EVERY = "150", "20"


def test_resume_after_sigkill_matches_uninterrupted_run(workspace):
    common = ("--max-steps", STEPS, "--save-every", EVERY, "--lora-dropout", "0.1", "--eval-every", "50")
    run_cli(*train_args(workspace, "straight", *common), home=workspace["home"])
    straight = workspace["root"] / "runs" / "straight"

    run = workspace["root"] / "runs" / "killed"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TUNERY_HOME": str(workspace["home"])}
    proc = subprocess.Popen([sys.executable, "-m", "tunery.cli.app", *train_args(workspace, "killed", *common)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = run / "checkpoints" / "step-0000020"
    deadline = time.time() + 300
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (run / "result.json").exists() and not (run / "adapter").exists()
    killed_at = max(m["step"] for m in metrics(run))
    assert killed_at < int(STEPS)

    run_cli("train", "--resume", str(run), home=workspace["home"])
    a, b = metrics(straight), metrics(run)
    assert [m["step"] for m in a] == [m["step"] for m in b]
    for x, y in zip(a, b):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-4), x["step"]
    ra, rb = (json.loads((r / "result.json").read_text()) for r in (straight, run))
    assert rb["final_loss"] == pytest.approx(ra["final_loss"], rel=1e-4)
    assert rb["eval_loss"] == pytest.approx(ra["eval_loss"], rel=1e-4)
