"""`tunery demo`: the whole loop offline on the bundled date task, in a few minutes on a CPU."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from tunery.progress import console

DATA = Path(__file__).resolve().parent.parent / "assets" / "dates.jsonl"


def demo_settings(model: Path, out: Path, steps: int) -> dict:
    """RunConfig values for the demo: LoRA on a tiny random-init model, tuned to learn the task on 2 cores."""
    return dict(model=str(model), data=str(DATA), output_dir=str(out / "runs"),
                name=f"demo-{time.strftime('%Y%m%d-%H%M%S')}",
                lora_r=32, lora_alpha=64, lora_dropout=0.0, lr=2e-3, scheduler="linear", warmup_ratio=0.05,
                batch_size=16, max_steps=steps, max_seq_len=64, save_every=steps // 4, eval_every=steps // 4,
                eval_samples=0, max_new_tokens=16)


def demo_command(
    out: Path = typer.Option(Path("tunery-demo"), "--out", help="Folder for the tiny model and the run."),
    steps: int = typer.Option(600, "--steps", help="Training steps (fewer = faster, less accurate)."),
) -> None:
    """Build a tiny model offline, fine-tune it on bundled data, and show before/after on held-out rows."""
    from tunery.cli.evaluate import show_report
    from tunery.config import RunConfig
    from tunery.data.load import load_rows
    from tunery.eval.evaluate import evaluate_run
    from tunery.models.tiny import build_tiny_model, corpus_of
    from tunery.train import train

    t0 = time.time()
    model_dir = out / "tiny-model"
    with console.status("building a tiny Qwen2-architecture model and training its tokenizer"):
        build_tiny_model(model_dir, corpus_of(load_rows(DATA)))
    console.print(f"[bold]1/3[/] tiny model + tokenizer in {model_dir} ({time.time() - t0:.0f}s)")
    console.print(f"[bold]2/3[/] fine-tuning with LoRA on {DATA.name} (free-form dates -> YYYY-MM-DD)")
    run = train(RunConfig.from_dict(demo_settings(model_dir, out, steps), source="demo"))
    console.print("[bold]3/3[/] measuring base vs fine-tuned on the held-out split")
    report = evaluate_run(run)
    show_report(report)
    console.print(f"[green]demo finished in {time.time() - t0:.0f}s[/]; run folder: {run}\n"
                  f"next: tunery chat {run} -p 'Rewrite this date as YYYY-MM-DD: 4 July 1976'\n"
                  f"      tunery export {run} --merged {out / 'merged'}")
