"""`tunery eval RUN`: the base model and the fine-tuned one on the run's held-out data, side by side; with
`--gguf FILE...`, the fine-tuned torch model and the exported GGUF files (through llama.cpp) side by side.

Held-out loss and perplexity, greedy generations on held-out prompts, exact match and ROUGE-L against
the references; written to RUN/eval/report.json and report.md (GGUF: RUN/eval/gguf_report.json and .md).
"""

from __future__ import annotations

from pathlib import Path

from tunery.data.dataset import prepare_data
from tunery.data.tokenize import prompt_and_reference
from tunery.errors import DataError
from tunery.eval.generate import generate_replies
from tunery.eval.metrics import exact_match, score
from tunery.progress import progress_bar
from tunery.run import load_trained, open_run, write_json_atomic
from tunery.train import held_out_loss


def _measure(model, tokenizer, data, prompts, device: str, max_new_tokens: int, label: str) -> tuple[dict, list]:
    loss = held_out_loss(model, data.eval, tokenizer.pad_token_id, device)
    with progress_bar(f"generating ({label})", total=len(prompts)) as advance:
        replies = generate_replies(model, tokenizer, [p for p, _ in prompts], max_new_tokens, device,
                                   on_batch=advance)
    metrics = {"loss": loss["loss"], "perplexity": loss["perplexity"],
               **score(replies, [r for _, r in prompts])}
    return metrics, replies


def check_data_unchanged(run: Path) -> None:
    """The run's data files are the ones it trained on (the sha256 its manifest recorded): a changed file would
    be split differently, and its held-out rows could be rows the model trained on."""
    import json

    from tunery.data.load import content_hash, hub_dataset

    manifest = run / "manifest.json"
    recorded = json.loads(manifest.read_text()).get("data_sha256", {}) if manifest.is_file() else {}
    for path, digest in recorded.items():
        hub = hub_dataset(path)
        now = content_hash(path) if hub or Path(path).exists() else "missing"
        if hub and now != digest:
            pinned = digest.split("@", 1)[-1].split(":", 1)[0]
            raise DataError(f"dataset {hub.repo} is not at the revision the run trained on ({pinned}; recorded in "
                            f"{manifest}), so its held-out rows may differ. Evaluate that revision: data "
                            f"{hub.repo}@{pinned}:{hub.subset + ':' if hub.subset else ''}{hub.split}, or pass "
                            "--allow-changed-data to evaluate on the current one")
        if now != digest:
            what = "is missing" if now == "missing" else "has changed since the run trained on it"
            raise DataError(f"{path} {what} (sha256 recorded in {manifest}): its held-out rows may not be the ones "
                            "held out in training. Put the original file back, or pass --allow-changed-data to "
                            "evaluate on it anyway")


def _held_out(run: str | Path, samples: int | None, device: str | None, allow_changed_data: bool):
    """(run, cfg, device, base, tuned, tokenizer, data, [(prompt, reference)]) of a run's held-out split."""
    from tunery.models.load import pick_device

    run, cfg = open_run(run)
    if not allow_changed_data:
        check_data_unchanged(run)
    device = pick_device(device or cfg.device)
    base, tuned, tokenizer = load_trained(run, device)
    data = prepare_data(cfg, tokenizer)
    if not data.eval:
        raise DataError(f"{run}: the run has no held-out data (eval_split=0 and no eval_data); "
                        "train with --eval-split 0.1 or --eval-data FILE")
    limit = cfg.eval_samples if samples is None else samples
    prompts = [pr for pr in map(prompt_and_reference, data.eval_examples) if pr][: limit or None]
    return run, cfg, device, base, tuned, tokenizer, data, prompts


def evaluate_run(run: str | Path, samples: int | None = None, device: str | None = None,
                 allow_changed_data: bool = False) -> dict:
    """Measure base vs fine-tuned on the run's held-out split; write and return the report."""
    run, cfg, device, base, tuned, tokenizer, data, prompts = _held_out(run, samples, device, allow_changed_data)
    if hasattr(tuned, "disable_adapter"):
        with tuned.disable_adapter():
            before, base_replies = _measure(tuned, tokenizer, data, prompts, device, cfg.max_new_tokens, "base")
    else:
        before, base_replies = _measure(base, tokenizer, data, prompts, device, cfg.max_new_tokens, "base")
    after, tuned_replies = _measure(tuned, tokenizer, data, prompts, device, cfg.max_new_tokens, "fine-tuned")
    examples = [{"prompt": p[-1]["content"], "reference": ref, "base": b, "fine_tuned": f,
                 "base_correct": bool(exact_match(b, ref)), "fine_tuned_correct": bool(exact_match(f, ref))}
                for (p, ref), b, f in zip(prompts, base_replies, tuned_replies)]
    report = {"run": str(run), "model": cfg.model, "eval_examples": len(data.eval), "generated": len(prompts),
              "held_out_sha256": held_out_hash(data.eval_examples), "base": before, "fine_tuned": after,
              "examples": examples}
    _write_report(run / "eval", report)
    return report


def held_out_hash(examples: list[dict]) -> str:
    """sha256 of the held-out rows (normalised examples, in order): runs compared on the same rows share it,
    whatever their tokenizers (`tunery compare` checks it)."""
    import hashlib
    import json

    return hashlib.sha256(json.dumps(examples, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def _write_report(folder: Path, report: dict) -> None:
    folder.mkdir(exist_ok=True)
    write_json_atomic(folder / "report.json", report)
    lines = [f"# Evaluation of {report['run']}", "", f"Base model: `{report['model']}`; "
             f"{report['eval_examples']} held-out examples, {report['generated']} generated.", "",
             "| metric | base | fine-tuned |", "|---|---|---|"]
    for key in ("loss", "perplexity", "exact_match", "rouge_l"):
        lines.append(f"| {key} | {report['base'][key]:.4f} | {report['fine_tuned'][key]:.4f} |")
    lines += ["", "## Examples", "", "| prompt | reference | base | fine-tuned |", "|---|---|---|---|"]
    for ex in report["examples"][:20]:
        cells = [ex["prompt"], ex["reference"], ex["base"], ex["fine_tuned"]]
        lines.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ")[:200] for c in cells) + " |")
    (folder / "report.md").write_text("\n".join(lines) + "\n")


def evaluate_ggufs(run: str | Path, ggufs: list, samples: int | None = None, device: str | None = None,
                   allow_changed_data: bool = False) -> dict:
    """The fine-tuned torch model and each GGUF (a path, or tunery.eval.gguf.GgufModel for one with a LoRA GGUF)
    on the run's held-out split, with the same metrics plus the share of replies identical to torch's; written to
    RUN/eval/gguf_report.json and .md and returned."""
    from tunery.eval.gguf import GgufModel, measure_gguf

    models = [g if isinstance(g, GgufModel) else GgufModel(Path(g)) for g in ggufs]
    run, cfg, device, _, tuned, tokenizer, data, prompts = _held_out(run, samples, device, allow_changed_data)
    torch_metrics, torch_replies = _measure(tuned, tokenizer, data, prompts, device, cfg.max_new_tokens,
                                            "fine-tuned, torch")
    references = [r for _, r in prompts]
    rows = {"torch": {**torch_metrics, "identical_to_torch": 1.0}}
    replies = {"torch": torch_replies}
    for model in models:
        with progress_bar(f"llama.cpp: {model.label}", total=len(data.eval) + len(prompts)) as advance:
            loss, answers = measure_gguf(model, tokenizer, data.eval, [p for p, _ in prompts], cfg.max_new_tokens,
                                         on_item=advance)
        same = sum(a == b for a, b in zip(answers, torch_replies)) / max(len(prompts), 1)
        rows[model.label] = {"loss": loss["loss"], "perplexity": loss["perplexity"],
                             **score(answers, references), "identical_to_torch": same}
        replies[model.label] = answers
    examples = [{"prompt": p[-1]["content"], "reference": ref, **{k: v[i] for k, v in replies.items()}}
                for i, (p, ref) in enumerate(prompts)]
    report = {"run": str(run), "model": cfg.model, "eval_examples": len(data.eval), "generated": len(prompts),
              "rows": rows, "examples": examples}
    _write_gguf_report(run / "eval", report)
    return report


GGUF_METRICS = ("loss", "perplexity", "exact_match", "rouge_l", "identical_to_torch")


def _write_gguf_report(folder: Path, report: dict) -> None:
    folder.mkdir(exist_ok=True)
    write_json_atomic(folder / "gguf_report.json", report)
    names = list(report["rows"])
    lines = [f"# Exported GGUF files of {report['run']}", "",
             f"{report['eval_examples']} held-out examples, {report['generated']} generated; llama.cpp for the "
             "GGUF files, torch for the fine-tuned model.", "",
             "| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for key in GGUF_METRICS:
        lines.append(f"| {key} | " + " | ".join(f"{report['rows'][n][key]:.4f}" for n in names) + " |")
    lines += ["", "## Examples", "", "| prompt | reference | " + " | ".join(names) + " |",
              "|---|---|" + "---|" * len(names)]
    for ex in report["examples"][:20]:
        cells = [ex["prompt"], ex["reference"], *[ex[n] for n in names]]
        lines.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ")[:200] for c in cells) + " |")
    (folder / "gguf_report.md").write_text("\n".join(lines) + "\n")
