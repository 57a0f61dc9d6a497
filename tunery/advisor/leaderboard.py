"""Several finished runs side by side (`tunery compare RUN...` and the console's compare page): held-out loss,
exact match, ROUGE-L, sample answers, train time, cost, adapter and GGUF size, ranked by one metric, and
whether they were measured on the same held-out rows.

    board = leaderboard([run_a, run_b], metric="exact_match")   # -> Leaderboard
    write_report(board, folder)                                    # report.md + loss.png
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, field
from pathlib import Path

from tunery.errors import RunError
from tunery.run import open_run

# metric -> (label, higher is better)
METRICS = {"exact_match": ("exact match", True), "rouge_l": ("ROUGE-L", True), "loss": ("held-out loss", False)}


@dataclass
class Entry:
    name: str
    run: str
    model: str
    method: str
    loss: float | None  # held-out loss of the fine-tuned model (eval report, else result.json)
    exact_match: float | None
    rouge_l: float | None
    base: dict  # the base model's metrics on the same rows (eval report)
    train_s: float | None
    cost_usd: float | None  # None: not run as a job (a local run costs nothing)
    adapter_mb: float | None
    gguf_mb: float | None
    held_out: str | None  # sha256 of the held-out rows (eval report), None when not evaluated
    held_out_rows: int | None
    curve: list[dict] = field(default_factory=list)  # {"step", "loss", "eval_loss"} a logged step
    samples: list[dict] = field(default_factory=list)  # {"prompt", "reference", "answer", "correct"}

    def value(self, metric: str) -> float | None:
        return getattr(self, metric)


@dataclass
class Leaderboard:
    metric: str
    entries: list[Entry]  # ranked, best first; runs without the metric last

    @property
    def same_held_out(self) -> bool:
        """Every run was evaluated, on the same held-out rows."""
        hashes = {e.held_out for e in self.entries}
        return len(hashes) == 1 and None not in hashes

    def held_out_note(self) -> str:
        if self.same_held_out:
            return (f"all runs evaluated on the same {self.entries[0].held_out_rows:,} held-out rows "
                    f"(sha256 {self.entries[0].held_out[:12]})")
        missing = [e.name for e in self.entries if e.held_out is None]
        if missing:
            return f"not evaluated: {', '.join(missing)} (`tunery eval RUN`); their metrics are missing"
        return ("the runs were evaluated on different held-out rows: their metrics do not compare (train them with "
                "the same --eval-data, or with `tunery compare --models`)")

    def samples(self, limit: int = 5) -> list[dict]:
        """Prompts answered by every run: {"prompt", "reference", "answers": [answer per entry]}."""
        by_prompt = [{s["prompt"]: s for s in e.samples} for e in self.entries]
        rows = []
        for s in (self.entries[0].samples if self.entries else []):
            if all(s["prompt"] in b for b in by_prompt):
                rows.append({"prompt": s["prompt"], "reference": s["reference"],
                             "answers": [b[s["prompt"]]["answer"] for b in by_prompt]})
        return rows[:limit]


def leaderboard(runs: list[str | Path], metric: str = "exact_match") -> Leaderboard:
    if metric not in METRICS:
        raise RunError(f"rank by one of {', '.join(METRICS)}, not {metric!r}")
    entries = [entry(run) for run in runs]
    higher = METRICS[metric][1]

    def key(e: Entry):
        value = e.value(metric)
        loss = e.loss if e.loss is not None else float("inf")
        return (value is None, -(value or 0) if higher else (value or 0), loss)

    return Leaderboard(metric, sorted(entries, key=key))


def entry(run: str | Path) -> Entry:
    run, cfg = open_run(run)
    result = _json(run / "result.json")
    report = _json(run / "eval" / "report.json")
    tuned = report.get("fine_tuned", {})
    samples = [{"prompt": ex["prompt"], "reference": ex["reference"], "answer": ex["fine_tuned"],
                "correct": ex["fine_tuned_correct"]} for ex in report.get("examples", [])]
    train_s, cost = _time_and_cost(run, result)
    return Entry(run.name, str(run), cfg.model, cfg.method, tuned.get("loss", result.get("eval_loss")),
                 tuned.get("exact_match"), tuned.get("rouge_l"), report.get("base", {}), train_s, cost,
                 _size_mb([run / "adapter", run / "model"]), _gguf_mb(run), report.get("held_out_sha256"),
                 report.get("eval_examples"), _curve(run), samples)


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _curve(run: Path) -> list[dict]:
    path, out = run / "metrics.jsonl", []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                m = json.loads(line)
            except ValueError:
                continue
            out.append({k: m.get(k) for k in ("step", "loss", "eval_loss")})
    return out


def _time_and_cost(run: Path, result: dict) -> tuple[float | None, float | None]:
    """(training seconds, dollars): the job's running time and cost when it ran as one, else from the manifest's
    start to result.json (no cost: it ran here)."""
    from tunery.jobs.store import JobStore

    try:
        job = next((j for j in JobStore().list(limit=1000) if Path(j.run_dir).resolve() == run.resolve()), None)
    except Exception:  # noqa: BLE001 - no job store (a fresh TUNERY_HOME, another machine's run): no job
        job = None
    if job is not None and job.elapsed:
        return job.elapsed, job.cost_so_far
    created = _json(run / "manifest.json").get("created")
    if not created or not result:
        return None, None
    start = dt.datetime.fromisoformat(created).timestamp()
    return max(0.0, (run / "result.json").stat().st_mtime - start), None


def _size_mb(folders: list[Path]) -> float | None:
    for folder in folders:
        weights = [p for p in folder.glob("*.safetensors")] if folder.is_dir() else []
        if weights:
            return sum(p.stat().st_size for p in weights) / 1e6
    return None


def _gguf_mb(run: Path) -> float | None:
    """The smallest GGUF `tunery export` wrote for the run (None: not exported)."""
    files = list((run / "export").glob("*.gguf"))
    return min(p.stat().st_size for p in files) / 1e6 if files else None


def table_rows(board: Leaderboard) -> list[list[str]]:
    """The leaderboard as text cells: rank, run, model, method, loss, exact match, ROUGE-L, time, cost, sizes."""
    from tunery.jobs.flavors import money

    def num(v, fmt):
        return "-" if v is None else format(v, fmt)

    return [[str(i), e.name, e.model.rstrip("/").rsplit("/", 1)[-1], e.method, num(e.loss, ".4f"),
             num(e.exact_match, ".1%"), num(e.rouge_l, ".3f"),
             "-" if e.train_s is None else f"{e.train_s / 60:.1f} min",
             "local" if e.cost_usd is None and e.train_s is not None else money(e.cost_usd or 0),
             num(e.adapter_mb, ".1f"), num(e.gguf_mb, ".1f")] for i, e in enumerate(board.entries, 1)]


HEADER = ["#", "run", "model", "method", "held-out loss", "exact match", "ROUGE-L", "train time", "cost",
          "adapter MB", "GGUF MB"]


def write_report(board: Leaderboard, folder: Path) -> Path:
    """report.md (the leaderboard, the held-out check, sample answers side by side) and loss.png beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    label = METRICS[board.metric][0]
    lines = ["# Leaderboard", "", f"Ranked by {label}; {board.held_out_note()}.", "",
             "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(board)]
    samples = board.samples()
    if samples:
        lines += ["", "## Sample answers", "", "| prompt | reference | " + " | ".join(e.name for e in board.entries)
                  + " |", "|" + "---|" * (2 + len(board.entries))]
        for s in samples:
            cells = [s["prompt"], s["reference"], *s["answers"]]
            lines.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ")[:160] for c in cells) + " |")
    png = plot_curves(board, folder / "loss.png")
    if png:
        lines += ["", "## Loss curves", "", "![loss curves](loss.png)"]
    else:
        lines += ["", "(no loss.png: `pip install 'tunery[plot]'` installs matplotlib, which draws it)"]
    report = folder / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report


def plot_curves(board: Leaderboard, path: Path) -> Path | None:
    """Training loss (lines) and held-out loss (dots) of every run, one colour each; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    for e in board.entries:
        steps = [m["step"] for m in e.curve if m.get("loss") is not None]
        (line,) = ax.plot(steps, [m["loss"] for m in e.curve if m.get("loss") is not None], label=e.name)
        held = [(m["step"], m["eval_loss"]) for m in e.curve if m.get("eval_loss") is not None]
        if held:
            ax.plot(*zip(*held), "o--", color=line.get_color(), label=f"{e.name} (held-out)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
