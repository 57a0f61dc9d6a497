"""The run page's long actions (eval, export, Hub push) as background processes that run the CLI's own verb
(`tunery eval RUN`, `tunery export RUN ...`): a request never waits for one, the console's memory never holds the
models they load, and what they print goes to a log under TUNERY_HOME/tasks that the page shows while they run.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from tunery.errors import TuneryError


@dataclass
class Task:
    id: str
    kind: str  # eval, export or push
    label: str  # what it does, in words
    run: Path
    argv: list[str]
    log: Path
    proc: subprocess.Popen
    started: float

    @property
    def state(self) -> str:
        code = self.proc.poll()
        return "running" if code is None else "succeeded" if code == 0 else "failed"

    @property
    def elapsed(self) -> float:
        return time.time() - self.started

    def tail(self, limit: int = 6000) -> str:
        try:
            with open(self.log, "rb") as fh:
                size = fh.seek(0, os.SEEK_END)
                fh.seek(max(0, size - limit))
                return fh.read().decode("utf-8", errors="replace")
        except FileNotFoundError:
            return ""


class Tasks:
    """The tasks this console started, one at a time per run folder."""

    def __init__(self, home: Path):
        self.folder = home / "tasks"
        self._tasks: dict[str, Task] = {}
        self._lock = threading.Lock()

    def start(self, kind: str, label: str, run: Path, args: list[str]) -> Task:
        """Run `tunery ARGS` in the background for `run`; refused while another task runs for it."""
        with self._lock:
            busy = self.running(run)
            if busy:
                raise TuneryError(f"{busy.label} is still running for this run; wait for it to finish")
            self.folder.mkdir(parents=True, exist_ok=True)
            task_id = f"{kind}-{secrets.token_hex(4)}"
            log = self.folder / f"{task_id}.log"
            argv = [sys.executable, "-m", "tunery.cli.app", *args]
            with open(log, "w", encoding="utf-8") as out:
                out.write(f"$ tunery {' '.join(args)}\n")
                out.flush()
                proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        start_new_session=True, env={**os.environ, "COLUMNS": "120"})
            task = Task(task_id, kind, label, run, argv, log, proc, time.time())
            self._tasks[task_id] = task
            return task

    def running(self, run: Path) -> Task | None:
        return next((t for t in self._tasks.values() if t.run == run and t.state == "running"), None)

    def latest(self, run: Path, kinds: tuple[str, ...]) -> Task | None:
        found = [t for t in self._tasks.values() if t.run == run and t.kind in kinds]
        return max(found, key=lambda t: t.started) if found else None
