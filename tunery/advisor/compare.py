"""`tunery compare --models A B C --data FILE`: one job per model on the same held-out rows, seed and settings.

The data is split once (seeded, on the file's rows, before any tokenizer sees them) into train.jsonl and
heldout.jsonl in the comparison's folder; every job trains on the first and is evaluated on the second
(`eval_data`), so the runs are measured on exactly the same rows whatever their tokenizers. compare.json there
lists the runs and jobs; `tunery compare FOLDER` ranks them once they finished.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from tunery.config import RunConfig
from tunery.errors import RunError, TuneryError

COMPARE_FILE = "compare.json"


def split_once(data: str, folder: Path, eval_split: float, seed: int, sheet: str | None = None,
               columns: list[str] | None = None) -> tuple[Path, Path, int, int]:
    """(train file, held-out file, train rows, held-out rows): the data's rows split by `seed`."""
    from tunery.data.dataset import split_indices
    from tunery.data.load import BAD_ROW, load_rows

    rows = [r for r in load_rows(data, sheet, columns) if BAD_ROW not in r]
    if not 0 < eval_split < 1:
        raise TuneryError("compare needs held-out rows: --eval-split between 0 and 1")
    train_idx, eval_idx = split_indices(len(rows), eval_split, seed)
    if not eval_idx:
        raise TuneryError(f"{data}: too few rows to hold any out")
    folder.mkdir(parents=True, exist_ok=True)
    paths = folder / "train.jsonl", folder / "heldout.jsonl"
    for path, idx in zip(paths, (train_idx, eval_idx)):
        path.write_text("".join(json.dumps(rows[i], ensure_ascii=False, default=str) + "\n" for i in idx))
    return paths[0], paths[1], len(train_idx), len(eval_idx)


def queue_models(models: list[str], base: RunConfig, folder: Path, *, flavor: str, backend: str,
                 start_worker: bool = True) -> list:
    """Queue one job per model, each trained on the same split with `base`'s settings; writes compare.json."""
    from tunery.jobs import control, submit

    if len(models) < 2:
        raise TuneryError("compare needs two or more models")
    base.require("data")
    if (folder / COMPARE_FILE).exists():
        raise TuneryError(f"{folder} already holds a comparison; pick another --out")
    created = not folder.exists()
    try:
        train, held, n_train, n_held = split_once(base.data, folder, base.eval_split, base.seed, base.sheet,
                                                  base.columns)
        prepared = []
        for model in models:  # every job checked (data gate, memory) before any is queued
            name = f"{folder.name}-{Path(model.rstrip('/')).name.lower()}"
            values = {**base.to_dict(), "model": model, "data": str(train), "eval_data": str(held), "name": name,
                      "eval_split": 0.0, "columns": [], "sheet": None}  # the split files hold tunery's own fields
            prepared.append(submit.prepare(RunConfig.from_dict(values), flavor, backend))
    except BaseException:
        if created:  # a comparison refused before any job was queued leaves nothing behind
            shutil.rmtree(folder, ignore_errors=True)
        raise
    jobs = []
    for cfg, run_dir, est in prepared:
        job, _ = control.launch(cfg, run_dir, est, flavor=flavor, backend=backend, timeout_s=None, budget_usd=None,
                                secrets=[], start_worker=start_worker)
        jobs.append(job)
    (folder / COMPARE_FILE).write_text(json.dumps(
        {"models": models, "runs": [j.run_dir for j in jobs], "jobs": [j.id for j in jobs], "seed": base.seed,
         "train_rows": n_train, "held_out_rows": n_held, "held_out": str(held)}, indent=2))
    return jobs


def runs_of(args: list[str]) -> list[str]:
    """Run folders from the arguments: a comparison folder (its compare.json) stands for its runs."""
    runs = []
    for arg in args:
        listing = Path(arg) / COMPARE_FILE
        if listing.is_file():
            runs += json.loads(listing.read_text())["runs"]
        else:
            runs.append(arg)
    if len(runs) < 2:
        raise RunError("compare needs two or more runs (or a folder `tunery compare --models` wrote)")
    return runs


def wait_for(job_ids: list[str], poll_s: float = 2.0, on_change=None) -> dict[str, str]:
    """Wait until every job has finished; {job id: final state}."""
    from tunery.jobs.control import open_store
    from tunery.jobs.store import FINAL

    seen: dict[str, str] = {}
    while True:
        store = open_store()
        states = {j: store.get(j).state for j in job_ids}
        for j, state in states.items():
            if on_change and seen.get(j) != state:
                on_change(j, state)
        seen = states
        if all(s in FINAL for s in states.values()):
            return states
        time.sleep(poll_s)
