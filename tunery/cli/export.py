"""`tunery export RUN [--merged OUT] [--gguf q4_k_m ...] [--gguf-adapter] [--ollama NAME] [--push-to-hub REPO
[--dry-run]]`."""

from __future__ import annotations

from pathlib import Path

import typer

from tunery.progress import console


def export_command(
    run: Path = typer.Argument(..., help="Run folder written by `tunery train`."),
    merged: Path | None = typer.Option(None, "--merged", help="Write merged safetensors + tokenizer here."),
    gguf: list[str] = typer.Option([], "--gguf", help="GGUF type, repeatable: f16, q8_0, q4_k_m, q5_k_m, q6_k."),
    gguf_adapter: bool = typer.Option(False, "--gguf-adapter",
                                      help="Write the LoRA adapter alone as a LoRA GGUF, with the base model's "
                                           "f16 GGUF it loads over."),
    ollama: str | None = typer.Option(None, "--ollama", help="Write an Ollama Modelfile for this model name."),
    push_to_hub: str | None = typer.Option(None, "--push-to-hub", help="Upload to this Hub repo (OWNER/NAME)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="With --push-to-hub: print the upload plan only."),
    public: bool = typer.Option(False, "--public", help="With --push-to-hub: make the repo public."),
    out: Path | None = typer.Option(None, "--out", help="Folder for GGUF files and the Modelfile [RUN/export]."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the --merged folder if it exists."),
    score: bool = typer.Option(True, "--score/--no-score",
                               help="Score the GGUF files written on the run's held-out data beside the torch "
                                    "model (as `tunery eval RUN --gguf FILE`)."),
) -> None:
    """Export a trained run: merged weights, verified GGUF files, an Ollama Modelfile, a Hub upload."""
    from tunery.export.pipeline import export_run

    if merged is None and not gguf and not gguf_adapter and not push_to_hub:
        raise typer.BadParameter("say what to export: --merged OUT, --gguf TYPE, --gguf-adapter and/or "
                                 "--push-to-hub REPO")
    result = export_run(run, merged=merged, gguf=gguf, ollama=ollama, push_to_hub=push_to_hub, dry_run=dry_run,
                        public=public, out=out, overwrite=overwrite, gguf_adapter=gguf_adapter, score=score)
    if merged is not None:
        console.print(f"[green]merged model written to {merged}[/] (AutoModelForCausalLM.from_pretrained('{merged}'))")
    for kind, path in result["gguf"].items():
        console.print(f"GGUF {kind}: {path}")
    for kind, path in (result["gguf_adapter"] or {}).items():
        console.print(f"GGUF {kind}: {path}")
    if result["scores"]:
        from tunery.cli.evaluate import show_gguf_report

        show_gguf_report(result["scores"])
