"""Merge a run's LoRA adapter into its base weights and save a plain `transformers` model folder."""

from __future__ import annotations

import shutil
from pathlib import Path

from tunery.errors import RunError
from tunery.progress import console
from tunery.run import load_trained, open_run


def export_merged(run: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Write merged safetensors + tokenizer to `out`, loadable by AutoModelForCausalLM.from_pretrained."""
    run, _ = open_run(run)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise RunError(f"{out} already exists and is not empty; choose another folder or pass --overwrite")
        shutil.rmtree(out)
    with console.status("loading base model and adapter"):
        _, tuned, tokenizer = load_trained(run, "cpu")
    with console.status("merging LoRA weights into the base"):
        merged = tuned.merge_and_unload() if hasattr(tuned, "merge_and_unload") else tuned
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with console.status(f"writing {out}"):
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    tmp.rename(out)
    return out
