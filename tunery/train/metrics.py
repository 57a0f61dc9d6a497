"""metrics.jsonl (one JSON object per logged step) and the live training display."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from rich.progress import TextColumn

from tunery.progress import console, make_progress


class MetricsFile:
    """Append-only JSON lines (and the optional trackers); on resume, lines past the checkpoint go first."""

    def __init__(self, path: Path, keep_through_step: int | None = None, reporters=None):
        self.path, self.reporters = path, reporters
        if keep_through_step is not None and path.exists():
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= keep_through_step]
            # a new file renamed over the old: readers (the job worker) see one or the other, never a mix
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, path)
        self._fh = open(path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self._fh.write(json.dumps(record) + "\n")
        self._fh.flush()
        if self.reporters:
            self.reporters.log(record)

    def close(self) -> None:
        self._fh.close()
        if self.reporters:
            self.reporters.close()


def read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class TrainDisplay:
    """A rich bar (loss, lr, tokens/s, ETA) on a terminal; a plain line every ~5% of steps otherwise."""

    def __init__(self, total: int, start: int):
        self.total, self.interactive = total, sys.stderr.isatty()
        self._every = max(1, total // 20)
        self._t0 = time.time()
        if self.interactive:
            self._progress = make_progress(TextColumn("{task.fields[stats]}"))
            self._progress.start()
            self._task = self._progress.add_task("training", total=total, completed=start, stats="")

    def update(self, step: int, stats: dict) -> None:
        rate = stats.get("tokens_per_s_recent", stats["tokens_per_s"])  # the last steps' rate, past the warm-up
        text = (f"loss {stats['loss']:.4f}  lr {stats['lr']:.2e}  {rate:.0f} tok/s"
                + (f"  eval {stats['eval_loss']:.4f}" if "eval_loss" in stats else ""))
        if self.interactive:
            self._progress.update(self._task, completed=step, stats=text)
        elif step % self._every == 0 or step == self.total or "eval_loss" in stats:
            console.print(f"step {step}/{self.total}  {text}  ({time.time() - self._t0:.0f}s)")

    def subtask(self, description: str, total: int):
        """A second bar under the training one (the final held-out loss): returns its `advance()`. Off a
        terminal, one line now; the training line that follows says when it is done."""
        if self.interactive:
            task = self._progress.add_task(description, total=total, stats="")
            return lambda n=1: self._progress.advance(task, n)
        console.print(f"{description}: {total} batches")
        return lambda n=1: None

    def close(self) -> None:
        if self.interactive:
            self._progress.stop()
