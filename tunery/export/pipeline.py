"""`tunery export RUN ...` as one function: merge -> GGUF (+ quantize) -> verify -> Modelfile -> Hub push; or the
LoRA adapter alone as a LoRA GGUF over the base model's GGUF (--gguf-adapter).

Every GGUF is loaded back with llama.cpp and compared with the merged torch model on held-out prompts of
the run before anything else uses it; a check that fails stops the export with the numbers.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path

from tunery.errors import ExportError
from tunery.progress import console
from tunery.run import open_run, trained_weights

DIRECT = ("f16", "q8_0")  # written by the gguf package; other kinds through llama.cpp's quantizer
SMALLEST_FIRST = ("q4_k_m", "q5_k_m", "q6_k", "q8_0", "f16")


def _prompts(run: Path, tokenizer_dir: Path, n: int = 20) -> list[list[dict]]:
    """Held-out prompts of the run (the conversation up to its last reply), or the verifier's defaults."""
    from transformers import AutoTokenizer

    from tunery.data.dataset import prepare_data
    from tunery.data.tokenize import prompt_and_reference

    _, cfg = open_run(run)
    data = prepare_data(cfg, AutoTokenizer.from_pretrained(tokenizer_dir))
    prompts = [pr[0] for pr in map(prompt_and_reference, data.eval_examples or []) if pr][:n]
    if not prompts:
        from tunery.export.verify import DEFAULT_PROMPTS

        prompts = DEFAULT_PROMPTS
    return prompts


def write_ggufs(run: Path, merged: Path, out: Path, kinds: list[str]) -> dict[str, Path]:
    """Each requested GGUF kind, verified; the f16 file is also the quantizer's input for k-quants."""
    from tunery.export.gguf import QUANT_FTYPES, quantize, write_gguf
    from tunery.export.verify import verify_gguf

    unknown = sorted(set(kinds) - set(DIRECT) - set(QUANT_FTYPES))
    if unknown:
        raise ExportError(f"unknown GGUF type(s) {unknown}; choose from {', '.join(SMALLEST_FIRST)}")
    out.mkdir(parents=True, exist_ok=True)
    prompts = _prompts(run, merged)
    written: dict[str, Path] = {}
    for kind in kinds:
        path = out / f"{run.name}-{kind}.gguf"
        if kind in DIRECT:
            write_gguf(merged, path, kind)
        else:
            f16 = out / f"{run.name}-f16.gguf"
            if not f16.exists():
                write_gguf(merged, f16, "f16")
            with console.status(f"quantizing to {kind} with llama.cpp"):
                quantize(f16, path, kind)
        with console.status(f"verifying {path.name} against the torch model"):
            report = verify_gguf(path, merged, prompts, quant=kind)
        console.print(f"[green]{path.name}[/]: {_describe(report)}")
        written[kind] = path
    return written


def base_model_dir(run: Path) -> Path:
    """The local folder of the run's base model (a Hub id resolves to its cached snapshot)."""
    _, cfg = open_run(run)
    folder = Path(cfg.model).expanduser()
    if folder.is_dir():
        return folder
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(cfg.model, revision=cfg.revision,
                                      allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    except Exception as e:  # offline without a cached copy, a gated repo, a removed revision
        raise ExportError(f"--gguf-adapter needs the base model {cfg.model} locally: {e}") from None


def write_adapter_ggufs(run: Path, out: Path) -> dict[str, Path]:
    """The run's LoRA adapter as a LoRA GGUF and the base model (with the run's tokenizer) as an f16 GGUF, checked
    together in llama.cpp against the torch adapter model."""
    from tunery.export.gguf import write_gguf
    from tunery.export.gguf_adapter import write_adapter_gguf
    from tunery.export.verify import verify_gguf

    kind, weights = trained_weights(run)
    if kind != "adapter":
        raise ExportError(f"{run} trained the full model (no LoRA adapter): export it with --gguf instead")
    base_dir = base_model_dir(run)
    out.mkdir(parents=True, exist_ok=True)
    adapter = write_adapter_gguf(weights, base_dir, out / f"{run.name}-adapter-f16.gguf")
    base = write_gguf(base_dir, out / f"{run.name}-base-f16.gguf", "f16", tokenizer_dir=weights)
    with console.status(f"verifying {base.name} + {adapter.name} against the torch adapter model"):
        report = verify_gguf(base, base_dir, _prompts(run, weights), quant="f16", torch_adapter=weights,
                             gguf_adapter=adapter)
    console.print(f"[green]{adapter.name}[/] ({adapter.stat().st_size / 2**20:.1f} MiB) over {base.name}: "
                  f"{_describe(report)}")
    return {"base": base, "adapter": adapter}


def score_exported(run: Path, ggufs: dict[str, Path], adapter: dict[str, Path] | None) -> dict | None:
    """`tunery eval RUN --gguf` on what the export wrote: the table's report, or None (said why) when the run has
    no held-out data to score on or its data changed."""
    from tunery.errors import DataError
    from tunery.eval.evaluate import evaluate_ggufs
    from tunery.eval.gguf import GgufModel

    models = [GgufModel(p) for p in ggufs.values()]
    if adapter:
        models.append(GgufModel(adapter["base"], adapter["adapter"]))
    try:
        return evaluate_ggufs(run, models)
    except DataError as e:
        console.print(f"[yellow]the GGUF files are not scored on held-out data:[/] {e}")
        return None


def _describe(r: dict) -> str:
    ties = [p["prompt"] for p in r["generation_partings"] if p["near_tie"]]
    tied = f" (prompts {ties} part at a near tie of torch's logits)" if ties else ""
    return (f"top-1 agreement {r['top1_agreement']:.0%}, identical greedy generations "
            f"{r['generations_identical']:.0%}{tied}, stopped at end of turn {r['gguf_stopped']}/{r['prompts']} "
            f"(torch {r['torch_stopped']}), max |logit diff| {r['max_abs_logit_diff']:.3g}")


def write_ollama(run: Path, merged: Path | None, ggufs: dict[str, Path], name: str, out: Path,
                 adapter: dict[str, Path] | None = None) -> Path:
    """A Modelfile beside the smallest GGUF, and with --gguf-adapter one FROM the base GGUF with ADAPTER the LoRA
    GGUF (Modelfile.adapter beside a merged one, else Modelfile); the `ollama create` commands, and the first run
    if ollama exists. Returns the first Modelfile."""
    from tunery.export.ollama import ollama_create_command, write_modelfile

    if not ggufs and not adapter:
        raise ExportError("--ollama needs a GGUF to point at: add --gguf q4_k_m (or f16/q8_0) or --gguf-adapter")
    _, cfg = open_run(run)
    modelfiles = []
    if ggufs:
        modelfiles.append(write_modelfile(merged, next(ggufs[k] for k in SMALLEST_FIRST if k in ggufs),
                                          out / "Modelfile", system=cfg.system_prompt))
    if adapter:
        modelfiles.append(write_modelfile(trained_weights(run)[1], adapter["base"],
                                          out / ("Modelfile.adapter" if ggufs else "Modelfile"),
                                          system=cfg.system_prompt, adapter=adapter["adapter"]))
    for modelfile in modelfiles:
        console.print(f"Modelfile: {modelfile}\nrun: {shlex.join(ollama_create_command(name, modelfile))}")
    if shutil.which("ollama"):
        subprocess.run(ollama_create_command(name, modelfiles[0]), check=True)
    return modelfiles[0]


def push_files(run: Path, merged: Path | None, ggufs: dict[str, Path], modelfile: Path | None) -> tuple[list, dict]:
    """(kinds, repo path -> local path) for the Hub: merged weights or the adapter at the root, GGUFs beside."""
    kind, weights = trained_weights(run)
    files: dict[str, Path] = {}
    if merged is not None:
        what, files[""] = ["merged"], merged
    else:
        what, files[""] = (["adapter"] if kind == "adapter" else ["merged"]), weights
    if ggufs:
        what.append("gguf")
        files.update({p.name: p for p in ggufs.values()})
        if modelfile:
            files["Modelfile"] = modelfile
    return what, files


def export_run(run: str | Path, *, merged: Path | None = None, gguf: list[str] | None = None,
               ollama: str | None = None, push_to_hub: str | None = None, dry_run: bool = False,
               public: bool = False, out: Path | None = None, overwrite: bool = False,
               gguf_adapter: bool = False, score: bool = True) -> dict:
    """Export a run (see the module docstring); with `score`, the GGUF files written are also scored on the run's
    held-out data beside the torch model (result["scores"], the report of tunery.eval.evaluate.evaluate_ggufs)."""
    from tunery.export.merge import export_merged

    run, _ = open_run(run)
    out = out or run / "export"
    kinds = list(dict.fromkeys(gguf or []))
    result: dict = {}
    merged_dir = merged
    if merged is not None or kinds:
        merged_dir = merged or out / "merged"
        export_merged(run, merged_dir, overwrite=overwrite or merged is None)
        result["merged"] = merged_dir
    ggufs = write_ggufs(run, merged_dir, out, kinds) if kinds else {}
    result["gguf"] = ggufs
    adapter = write_adapter_ggufs(run, out) if gguf_adapter else None
    result["gguf_adapter"] = adapter
    modelfile = write_ollama(run, merged_dir, ggufs, ollama, out, adapter) if ollama else None
    result["scores"] = score_exported(run, ggufs, adapter) if score and (ggufs or adapter) else None
    if push_to_hub:
        from tunery.export.hub import format_plan, plan_upload, push

        what, files = push_files(run, merged if merged is not None else (merged_dir if not kinds else None),
                                 {**ggufs, **(adapter or {})}, modelfile)  # the adapter's GGUFs go up too
        plan = plan_upload(run, push_to_hub, what, files, private=not public)
        if dry_run:
            print(format_plan(plan), end="")
        else:
            result["url"] = push(plan, token=os.environ.get("HF_TOKEN"))
            console.print(f"[green]pushed[/] {result['url']}")
    return result
