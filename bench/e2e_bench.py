"""Time to train on variable-length data, end to end: `tunery train` against Unsloth (FastLanguageModel + TRL's
SFTTrainer, configured as Unsloth's notebooks do) on the same file, one after the other in one process tree.

Each run is a fresh process timed from its start to its exit (the adapter saved); the training loop's own time,
the time to the first step and where the time before it went (imports, data, weights, adapters), steady-state
tokens/s (the second half of the steps), the padding share, compiles,
CUDA graphs and the peak GPU memory come from the run itself (tunery's result.json, a callback in Unsloth's).
Datasets are written here, seeded: text rows of random words of a word-level tokenizer (one token each), with
log-normal lengths per profile. Models are random-init from the public configs (bench/lora_bench.py's folders).

On the GPU machine (reference stacks unpacked: `. bench/gpu_env.sh`):
    python bench/e2e_bench.py --models llama-1b --profiles mixed --rows 500 --out /tmp/e2e.jsonl
    python bench/e2e_bench.py --table /tmp/e2e.jsonl          # the markdown table of what a run wrote
Stacks (--stacks): tunery (its defaults: on CUDA, token budgets, packing where the model packs, and
torch.compile where the run is long enough to repay it),
tunery-compiled (its defaults with --fast-compile: torch.compile even where tunery judges the run too
short to repay it), tunery-examples (--no-packing --micro-batch-tokens 0: batch_size examples a micro-batch, padded),
tunery-tokens (--no-packing --micro-batch-tokens N), tunery-packed (--packing --micro-batch-tokens N; on LFM2
with its convolutions bounded at each example, which its defaults do not pack yet), tunery-8bit (its defaults
with --optimizer adamw_8bit: the optimizer Unsloth's notebooks use, for the peak memory at the same settings),
unsloth. Each tunery stack has a TUNERY_HOME of its own, empty at first (cold: nothing compiled yet);
tunery-compiled (or else the first tunery stack) runs again with it, on each model's first profile and row count
(warm).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PROFILES = {  # name: (median tokens, log-normal sigma, cap = max_seq_len)
    "short": (150, 0.6, 1024),
    "mixed": (300, 0.8, 2000),
    "long": (1500, 0.6, 8192),
}
STACKS = ("tunery", "tunery-compiled", "tunery-examples", "tunery-tokens", "tunery-packed", "tunery-8bit", "unsloth")
BATCH = {"llama-1b": 8, "lfm2-1.2b": 8, "llama-8b": 4}  # examples per step (the issue's rows: 8 and 4)


def lengths_of(profile: str, rows: int, seed: int = 0) -> list[int]:
    median, sigma, cap = PROFILES[profile]
    rng = random.Random(seed)
    return [min(cap - 1, max(8, int(rng.lognormvariate(math.log(median), sigma)))) for _ in range(rows)]


def write_data(path: Path, profile: str, rows: int, vocab: int, seed: int = 0) -> list[int]:
    """JSONL text rows of random words t<i> (one token each under the bench tokenizer); returns their lengths.
    One short of the cap, so the end-of-text token each stack appends still fits."""
    rng = random.Random(seed + 1)
    lengths = lengths_of(profile, rows, seed)
    with open(path, "w") as f:
        for n in lengths:
            f.write(json.dumps({"text": " ".join(f"t{rng.randrange(vocab - 3)}" for _ in range(n))}) + "\n")
    return lengths


def budget_for(profile: str, batch: int) -> int:
    """The token budget of the tunery-tokens stacks: the cap, at least 4,096 tokens (a micro-batch of short rows
    then holds about as many tokens as an Unsloth padding-free batch of long ones)."""
    return max(PROFILES[profile][2], 4096)


def run_tunery(model_dir: str, data: Path, profile: str, batch: int, stack: str, home: Path, out: Path,
               name: str, extra: tuple[str, ...] = ()) -> dict:
    cap = PROFILES[profile][2]
    args = [sys.executable, "-m", "tunery.cli.app", "train", "--model", model_dir, "--data", str(data),
            "--max-seq-len", str(cap), "--batch-size", str(batch), "--epochs", "1", "--eval-split", "0",
            "--gradient-checkpointing", "--lora-r", "16", "--lora-alpha", "32", "--output-dir", str(out),
            "--name", name, "--save-every", "0"]
    if stack in ("tunery-tokens", "tunery-packed"):
        args += ["--micro-batch-tokens", str(budget_for(profile, batch))]
    args += {"tunery-packed": ["--packing"], "tunery-tokens": ["--no-packing"],
             "tunery-examples": ["--no-packing", "--micro-batch-tokens", "0"],
             "tunery-compiled": ["--fast-compile"],
             "tunery-8bit": ["--optimizer", "adamw_8bit"]}.get(stack, []) + list(extra)
    env = {**os.environ, "TUNERY_HOME": str(home)}
    t0 = time.time()
    proc = subprocess.run(args, env=env, capture_output=True, text=True)
    wall = time.time() - t0
    if proc.returncode:
        return {"error": (proc.stdout + proc.stderr)[-3000:]}
    result = json.loads((out / name / "result.json").read_text())
    timing = result["timing"]
    return {"wall_s": wall, "loop_s": timing["loop_s"], "first_step_s": timing["first_step_s"],
            "tokens": timing["tokens"], "tokens_per_s": timing["tokens_per_s"],
            "steady_tokens_per_s": timing["steady_tokens_per_s"], "padding_share": timing["padding_share"],
            "compiled_graphs": timing.get("compiled_graphs"), "cuda_graphs": timing.get("cuda_graphs"),
            "peak_gib": timing.get("peak_gib"), "setup": timing.get("setup"), "save_s": timing.get("save_s"),
            "steps": result["steps"], "engine": result["engine"]["steps"], "batching": result["engine"]["batching"]}


def run_unsloth(model_dir: str, data: Path, profile: str, batch: int, arch: str, out: Path) -> dict:
    spec = {"model_dir": model_dir, "data": str(data), "cap": PROFILES[profile][2], "batch": batch, "arch": arch,
            "out": str(out)}
    t0 = time.time()
    proc = subprocess.run([sys.executable, __file__, "--unsloth-worker", json.dumps(spec)], capture_output=True,
                          text=True)
    wall = time.time() - t0
    line = next((x for x in reversed(proc.stdout.splitlines()) if x.startswith("{")), None)
    if proc.returncode or line is None:
        return {"error": (proc.stdout + proc.stderr)[-3000:]}
    return {"wall_s": wall, **json.loads(line)}


def unsloth_worker(spec: dict) -> None:
    """One Unsloth run as its notebooks set it up: FastLanguageModel (bf16, no 4-bit), get_peft_model on every
    linear layer with Unsloth's checkpointing, TRL's SFTTrainer with SFTConfig on the text field, adamw_8bit,
    linear schedule; whether to pad or run padding-free is Unsloth's own default choice (reported)."""
    started = time.time()
    import torch
    import unsloth  # noqa: F401  (patches transformers before it loads a model)
    from datasets import load_dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer
    from unsloth import FastLanguageModel

    from bench.lora_bench import targets

    setup = {"imports_s": time.time() - started}
    model, tok = FastLanguageModel.from_pretrained(model_name=spec["model_dir"], max_seq_length=spec["cap"],
                                                   dtype=torch.bfloat16, load_in_4bit=False)
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=32, lora_dropout=0,
                                             target_modules=targets(spec["arch"]), bias="none",
                                             use_gradient_checkpointing="unsloth", random_state=3407)
    setup["load_s"] = time.time() - started - sum(setup.values())
    ds = load_dataset("json", data_files=spec["data"], split="train")
    marks: list[float] = []

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            torch.cuda.synchronize()
            marks.append(time.time())

        def on_step_end(self, args, state, control, **kw):
            marks.append(time.time())  # the Trainer reads the loss back each step: the GPU is done with it

    trainer = SFTTrainer(
        model=model, processing_class=tok, train_dataset=ds, callbacks=[Clock()],
        args=SFTConfig(dataset_text_field="text", max_length=spec["cap"], per_device_train_batch_size=spec["batch"],
                       gradient_accumulation_steps=1, num_train_epochs=1, learning_rate=2e-4, warmup_steps=5,
                       logging_steps=10, optim="adamw_8bit", weight_decay=0.01, lr_scheduler_type="linear",
                       seed=3407, output_dir=spec["out"], report_to="none", save_strategy="no", bf16=True))
    setup["data_s"] = time.time() - started - sum(setup.values())  # SFTTrainer tokenizes the rows
    padding_free, packing = bool(getattr(trainer.args, "padding_free", False)), bool(trainer.args.packing)
    tokens = sum(len(r) for r in trainer.train_dataset["input_ids"])
    trainer.train()
    torch.cuda.synchronize()
    saving = time.time()
    model.save_pretrained(spec["out"] + "/adapter")
    steps = len(marks) - 1
    half = marks[len(marks) // 2] if steps > 4 else marks[0]
    steady_steps = len(marks) - 1 - (len(marks) // 2 if steps > 4 else 0)
    print(json.dumps({
        "loop_s": marks[-1] - marks[0], "first_step_s": marks[1] - started if steps else None, "tokens": tokens,
        "tokens_per_s": tokens / (marks[-1] - marks[0]),
        # tokens per step taken as the run's mean: Unsloth does not report each step's
        "steady_tokens_per_s": tokens / steps * steady_steps / max(marks[-1] - half, 1e-9) if steps else None,
        "padding_share": None, "peak_gib": torch.cuda.max_memory_allocated() / 2**30, "steps": steps,
        "setup": {k: round(v, 3) for k, v in setup.items()}, "save_s": round(time.time() - saving, 3),
        "engine": f"padding_free={padding_free} packing={packing}"}))


def table(records: list[dict]) -> str:
    out = ["| model | profile | rows | stack | wall s | loop s | first step s | tok/s (loop) | steady tok/s | "
           "padding | compiles | captures | peak GiB | steps | wall vs Unsloth | loop vs Unsloth |", "|" + "---|" * 16]
    for r in records:
        if "error" in r:
            out.append(f"| {r['model']} | {r['profile']} | {r['rows']} | {r['stack']} | failed: "
                       f"{r['error'].strip().splitlines()[-1][:120]} |" + " |" * 11)
            continue
        ref = next((x for x in records if x["stack"] == "unsloth" and "error" not in x and
                    (x["model"], x["profile"], x["rows"]) == (r["model"], r["profile"], r["rows"])), None)

        def f(v, spec=".1f"):
            return "-" if v is None else format(v, spec)

        vs_wall = f"{ref['wall_s'] / r['wall_s']:.2f}x" if ref and r is not ref else ""
        vs_loop = f"{ref['loop_s'] / r['loop_s']:.2f}x" if ref and r is not ref else ""
        out.append(f"| {r['model']} | {r['profile']} | {r['rows']} | {r['stack']}{' (warm)' if r.get('warm') else ''}"
                   f" | {f(r['wall_s'])} | {f(r['loop_s'])} | {f(r['first_step_s'])} | {f(r['tokens_per_s'], ',.0f')}"
                   f" | {f(r['steady_tokens_per_s'], ',.0f')} | {f(r.get('padding_share'), '.0%')}"
                   f" | {r.get('compiled_graphs', '-')} | {r.get('cuda_graphs', '-')} | {f(r.get('peak_gib'), '.2f')}"
                   f" | {r['steps']} | {vs_wall}"
                   f" | {vs_loop} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["llama-1b"])
    ap.add_argument("--profiles", nargs="+", default=["mixed"], choices=list(PROFILES))
    ap.add_argument("--rows", nargs="+", type=int, default=[500])
    ap.add_argument("--stacks", nargs="+", default=list(STACKS), choices=STACKS)
    ap.add_argument("--work", default="/tmp/e2e-bench", help="datasets, TUNERY_HOMEs and run folders")
    ap.add_argument("--out", default="/tmp/e2e.jsonl", help="one JSON line per run, appended as each ends")
    ap.add_argument("--deadline", type=float, default=0, help="seconds: start no run after this much time")
    ap.add_argument("--no-warm", action="store_true", help="skip the warm rerun of the first tunery stack")
    ap.add_argument("--table", help="print the table of a results file and exit")
    ap.add_argument("--tunery-args", default="", help="more `tunery train` flags for the tunery stacks, e.g. "
                                                      "'--no-fast-compile' (the table names them)")
    ap.add_argument("--unsloth-worker", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.unsloth_worker:
        return unsloth_worker(json.loads(a.unsloth_worker))
    if a.table:
        print(table([json.loads(x) for x in Path(a.table).read_text().splitlines() if x.strip()]))
        return
    from bench.lora_bench import ARCHS, model_dir
    from tunery.models.catalog import bench_shapes, family_of

    t0, work = time.time(), Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%H%M%S")  # this invocation's TUNERY_HOMEs (cold compile caches) and run folders
    records = []
    # the stack run again warm: the one that compiles if it is asked for (a rerun of it starts from the cache)
    warm_stack = "tunery-compiled" if "tunery-compiled" in a.stacks else next(
        (x for x in a.stacks if x.startswith("tunery")), None)
    for arch in a.models:
        folder = model_dir(arch)
        vocab = ARCHS[arch][1]["vocab_size"]
        packs = family_of(bench_shapes()[arch][0]).packing  # every family tunery trains packed
        first_tunery = True
        for profile in a.profiles:
            for rows in a.rows:
                data = work / f"{profile}-{rows}-{vocab}.jsonl"
                if not data.exists():
                    write_data(data, profile, rows, vocab)
                for stack in a.stacks:
                    if stack == "tunery-packed" and not packs:
                        continue
                    cold_first = stack == warm_stack and first_tunery and not a.no_warm
                    repeats = [False, True] if cold_first else [False]
                    for warm in repeats:
                        if a.deadline and time.time() - t0 > a.deadline:
                            print(table(records))
                            print(f"deadline of {a.deadline:.0f} s reached")
                            return
                        name = f"{arch}-{profile}-{rows}-{stack}{'-warm' if warm else ''}"
                        print(f"[{time.time() - t0:.0f}s] {name}", flush=True)
                        if stack == "unsloth":
                            r = run_unsloth(folder, data, profile, BATCH.get(arch, 8), arch,
                                            work / f"unsloth-{stamp}" / name)
                        else:
                            r = run_tunery(folder, data, profile, BATCH.get(arch, 8), stack,
                                           work / f"home-{arch}-{stack}-{stamp}", work / f"runs-{stamp}", name,
                                           tuple(a.tunery_args.split()))
                        label = f"{stack} {a.tunery_args}" if a.tunery_args and stack != "unsloth" else stack
                        r.update(model=arch, profile=profile, rows=rows, stack=label, warm=warm)
                        records.append(r)
                        with open(a.out, "a") as f:
                            f.write(json.dumps(r) + "\n")
                        print(json.dumps(r)[:600], flush=True)
                    if stack == warm_stack:
                        first_tunery = False
    print(table(records))


if __name__ == "__main__":
    main()
