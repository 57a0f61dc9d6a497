"""The run folder (tunery/run.py): created atomically, reused only until it has trained, locked while training."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tunery.config import RunConfig
from tunery.errors import RunError
from tunery.run import RunLock, create_run_dir, new_run_dir, started


def test_a_run_folder_is_reused_only_until_it_has_trained(tmp_path):
    cfg = RunConfig(model="m", data="d", output_dir=str(tmp_path), name="r")
    run = new_run_dir(cfg)
    (run / "config.yaml").write_text("model: m\n")
    (run / "train.log").write_text("")  # a run that stopped before training (a wrong setting)
    assert new_run_dir(cfg) == run and not started(run)
    (run / "manifest.json").write_text("{}")  # written right before the first step
    assert started(run)
    with pytest.raises(RunError, match="already exists.*--resume"):
        new_run_dir(cfg)


def test_generated_names_never_collide_and_given_ones_are_refused_twice(tmp_path):
    made = {create_run_dir(tmp_path, None, "org/My-Model") for _ in range(50)}
    assert len(made) == 50 and all(p.name.startswith("My-Model-") for p in made)
    create_run_dir(tmp_path, "mine", "m")
    with pytest.raises(RunError, match="already exists"):
        create_run_dir(tmp_path, "mine", "m")


def test_a_folder_being_trained_is_locked_against_a_second_process(tmp_path):
    holder = ("import sys, time; from tunery.run import RunLock\n"
              "with RunLock(sys.argv[1]):\n    print('held', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", holder, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(RunError, match=f"being trained by pid {proc.pid}"):
            RunLock(tmp_path).__enter__()
    finally:
        proc.kill()
        proc.wait()
    with RunLock(tmp_path):  # the OS let go when the holder died
        pass


def test_an_output_dir_that_is_a_file_is_named(tmp_path):
    (tmp_path / "runs").write_text("")
    with pytest.raises(RunError, match="output_dir .*runs is a file, not a folder"):
        create_run_dir(tmp_path / "runs", "r", "m")
