"""`tunery plan`: read the data, then recommend model kind, candidates, method, batch, max_seq_len, epochs, the
flavor, time and dollars, and the command that does it; a plan that cannot fit says why.

    plan = make_plan("data.jsonl", flavor="a10g-small")    # -> Plan; plan.describe() is what the CLI prints

The rules, each stated where it is applied:
- model kind by data size: over 1,000 rows a base model can be shaped; 300-1,000 either; under 300 an instruct
  model; conversations (messages, ShareGPT) an instruct model, which already speaks a chat template;
- max_seq_len covers 99% of the rows (the 99th percentile of their token lengths, rounded up to 64);
- epochs by data size: 3 under 300 rows, 2 up to 1,000, 1 past that;
- method: LoRA over 16-bit weights when those take at most half of one GPU's memory, else QLoRA (4-bit weights
  leave the room for batches and long rows; the bench's 4-bit row ran at 0.92x of the 16-bit one's speed); a
  full fine-tune only when asked for;
- batch: the largest micro-batch of 16, 8, 4, 2, 1 whose predicted peak (advisor/memory.py, checkpointing on)
  stays under `HEADROOM` of the GPU's memory, gradient accumulation up to an effective batch of 8 (16 past
  1,000 rows).
"""

from __future__ import annotations

import math
import shlex
from dataclasses import asdict, dataclass, field

from tunery.advisor.memory import predict_peak
from tunery.advisor.shape import Shape, shape_for_model
from tunery.advisor.speed import run_seconds
from tunery.errors import TuneryError
from tunery.jobs.flavors import Flavor, flavors, get_flavor, money

HEADROOM = 0.85  # share of a GPU's memory a plan may fill: the rest for fragmentation, the CUDA context, eval
BASE_ROWS, INSTRUCT_ROWS = 1000, 300  # past BASE_ROWS a base model can be shaped; under INSTRUCT_ROWS, instruct
CHAT_FORMATS = ("openai", "sharegpt")
EVAL_SPLIT = 0.1  # RunConfig's default held-out share: the plan's time counts the other rows
CHARS_PER_TOKEN = 4  # the estimate when no tokenizer is at hand
PLANS_DIR = "plans"  # where `tunery plan --write` puts each candidate's config for `tunery submit`


@dataclass
class DataProfile:
    path: str
    format: str
    rows: int  # usable rows
    rejected: int
    lengths: list[int]  # tokens a row (sorted)
    measured: bool  # lengths from the model's tokenizer; False: estimated from characters

    @property
    def chat(self) -> bool:
        return self.format in CHAT_FORMATS

    def percentile(self, p: float) -> int:
        return self.lengths[min(len(self.lengths) - 1, max(0, math.ceil(p / 100 * len(self.lengths)) - 1))]

    def describe(self) -> str:
        how = "tokens" if self.measured else f"tokens, estimated at {CHARS_PER_TOKEN} characters a token"
        rejected = f", {self.rejected:,} rejected" if self.rejected else ""
        return (f"data: {self.path}: {self.rows:,} rows{rejected} ({self.format}, "
                f"{'chat' if self.chat else 'plain'}); length p50 {self.percentile(50):,} / p90 "
                f"{self.percentile(90):,} / p99 {self.percentile(99):,} / max {self.lengths[-1]:,} ({how})")


@dataclass
class Candidate:
    model: str
    params_b: float
    method: str
    max_seq_len: int  # the plan's, within the model's context
    batch_size: int
    grad_accum: int
    peak_gib: float
    flavor: str
    gpu_gb: float
    seconds: float
    usd: float
    command: str
    submit: str
    notes: list[str] = field(default_factory=list)


@dataclass
class Plan:
    data: DataProfile
    kind: str  # instruct, either, base
    kind_reason: str
    max_seq_len: int
    truncated: int  # rows longer than max_seq_len
    epochs: int
    candidates: list[Candidate]
    refused: list[str]  # models left out, each with why

    def to_dict(self) -> dict:
        out = asdict(self)
        out["data"] = {k: v for k, v in out["data"].items() if k != "lengths"}
        out["data"].update(chat=self.data.chat, p50=self.data.percentile(50), p99=self.data.percentile(99))
        return out

    def describe(self) -> list[str]:
        lines = [self.data.describe(), f"model kind: {self.kind} ({self.kind_reason})",
                 f"max_seq_len {self.max_seq_len:,} (covers 99% of rows; {self.truncated:,} truncated), "
                 f"{self.epochs} epoch{'s' * (self.epochs > 1)}"]
        for i, c in enumerate(self.candidates, 1):
            where = f"{c.flavor} ({c.gpu_gb:g} GB)" if c.gpu_gb else c.flavor
            lines.append(f"{i}. {c.model} ({c.params_b:.2g}B): {c.method}, batch {c.batch_size} x accumulate "
                         f"{c.grad_accum}, peak ~{c.peak_gib:.1f} GiB on {where}, ~{_span(c.seconds)}, "
                         f"~{money(c.usd)}")
            lines += [f"   {note}" for note in c.notes]
            lines += [f"   train: {c.command}", f"   job:   {c.submit}"]
        lines += [f"left out: {why}" for why in self.refused]
        if not self.candidates:
            lines.append("no candidate fits: see why above")
        return lines


def _span(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds < 3600 else f"{seconds / 3600:.1f} h"


def profile_data(path: str, model: str | None = None, sheet: str | None = None,
                 columns: list[str] | None = None) -> DataProfile:
    """Rows, format and token lengths of a data file: with `model`'s tokenizer when it loads here, else
    estimated from the characters of the rows' text."""
    from tunery.data.formats import detect_format, normalise
    from tunery.data.load import load_rows
    from tunery.errors import DataError

    rows = load_rows(path, sheet, columns)
    fmt = detect_format(rows, source=path)
    examples, _ = normalise(rows, fmt)
    kept = [e for e in examples if e is not None]
    if not kept:
        raise DataError(f"{path}: no usable rows (run `tunery data inspect {path}`)")
    lengths = _token_lengths(path, model, sheet, columns)
    measured = lengths is not None
    if lengths is None:
        lengths = [max(1, _chars(e) // CHARS_PER_TOKEN) for e in kept]
    return DataProfile(path, fmt.name, len(lengths), len(examples) - len(kept), sorted(lengths), measured)


def _chars(example: dict) -> int:
    if "text" in example:
        return len(example["text"])
    return sum(len(str(m.get("content", ""))) + 8 for m in example["messages"])  # + the template's markers a turn


def _token_lengths(path: str, model: str | None, sheet: str | None, columns: list[str] | None) -> list[int] | None:
    """Tokens a row as training counts them (chat template included), with the model's tokenizer; None when it
    cannot be loaded here."""
    from pathlib import Path

    if model is None or not Path(model).expanduser().is_dir():  # a Hub id: no download to plan
        return None
    from tunery.data.dataset import load_file
    from tunery.data.templates import ensure_chat_template
    from tunery.errors import ModelError
    from tunery.models.load import load_tokenizer

    try:
        tokenizer = load_tokenizer(model)
    except ModelError:
        return None
    ensure_chat_template(tokenizer, None)
    data = load_file(path, tokenizer, 1 << 20, sheet=sheet, columns=columns)
    return [len(data.tokens[i].input_ids) for i in data.usable()] or None


def recommend_kind(profile: DataProfile) -> tuple[str, str]:
    if profile.chat:
        return "instruct", "the data is conversations: an instruct model already speaks a chat template"
    if profile.rows > BASE_ROWS:
        return "base", f"{profile.rows:,} rows: more than {BASE_ROWS:,}, enough to shape a base model"
    if profile.rows >= INSTRUCT_ROWS:
        return "either", (f"{profile.rows:,} rows: {INSTRUCT_ROWS}-{BASE_ROWS:,}, a base or an instruct model; "
                          "compare both (`tunery compare --models`)")
    return "instruct", f"{profile.rows:,} rows: under {INSTRUCT_ROWS}, too few to teach a base model to answer"


def recommend_epochs(rows: int) -> int:
    return 3 if rows < INSTRUCT_ROWS else 2 if rows <= BASE_ROWS else 1


def recommend_max_seq_len(profile: DataProfile, context: int | None = None) -> tuple[int, int]:
    """(max_seq_len covering 99% of rows, rounded up to 64 and within the context; rows it truncates)."""
    seq = max(64, math.ceil(profile.percentile(99) / 64) * 64)
    if context:
        seq = min(seq, context)
    return seq, sum(n > seq for n in profile.lengths)


def fit(shape: Shape, method: str, seq: int, flavor: Flavor, effective: int) -> tuple[int, int, float] | None:
    """(batch, grad_accum, peak GiB) of the largest micro-batch that fits `flavor`, or None when batch 1 does not.
    A CPU flavor has no GPU memory to fit."""
    for batch in (16, 8, 4, 2, 1):
        if batch > effective and batch > 1:
            continue
        peak = predict_peak(shape, method, batch, seq).gib
        if not flavor.gpus or peak <= HEADROOM * flavor.memory_per_gpu_gib:
            return batch, math.ceil(effective / batch), peak
    return None


def choose_method(shape: Shape, flavor: Flavor, asked: str | None) -> str:
    if asked:
        return asked
    if flavor.gpus and shape.params * 2 / 2**30 > flavor.memory_per_gpu_gib / 2:
        return "qlora"
    return "lora"


def explain_misfit(name: str, shape: Shape, method: str, seq: int, flavor: Flavor) -> tuple[str, str | None]:
    """(why `method` cannot train `name` on `flavor` and what would, the method that fits or None): the method
    the plan would choose itself, else the leaner one, else a bigger flavor."""
    need = predict_peak(shape, method, 1, seq).gib
    why = (f"{name} {'full fine-tune' if method == 'full' else method.upper()} needs ~{need:.0f} GiB at batch 1 x "
           f"{seq:,} tokens; {flavor.name} has {flavor.memory_per_gpu_gb:g} GB a GPU "
           f"({flavor.memory_per_gpu_gib:.1f} GiB)")
    own = choose_method(shape, flavor, None)
    for other in dict.fromkeys((own, "qlora")):
        peak = predict_peak(shape, other, 1, seq).gib
        if other != method and peak <= HEADROOM * flavor.memory_per_gpu_gib:
            return f"{why}: use --method {other} (~{peak:.0f} GiB)", other
    roomy = [f for f in flavors().values() if f.gpus and need <= HEADROOM * f.memory_per_gpu_gib]
    if roomy:
        return f"{why}: pick a bigger GPU, e.g. --flavor {min(roomy, key=lambda f: f.usd_per_hour).name}", None
    return f"{why}, and no flavor has enough memory for it", None


def make_plan(data: str, models: list[str] | None = None, flavor: str | None = None, gpu: str | None = None,
              budget_usd: float | None = None, commercial: bool = False, method: str | None = None,
              sheet: str | None = None, columns: list[str] | None = None) -> Plan:
    if flavor and gpu:
        raise TuneryError("give --gpu or --flavor, not both")
    fixed = get_flavor(flavor) if flavor else _flavor_of_gpu(gpu) if gpu else None
    profile = profile_data(data, models[0] if models else None, sheet, columns)
    kind, reason = recommend_kind(profile)
    epochs = recommend_epochs(profile.rows)
    effective = 16 if profile.rows > BASE_ROWS else 8
    candidates, refused = [], []
    seq, truncated = recommend_max_seq_len(profile)
    for name in models or _catalogue_candidates(kind, commercial):
        shape = shape_for_model(name)
        if shape is None:
            refused.append(f"{name}: its config.json is not here (a local folder or the Hub cache), so its memory "
                           "cannot be predicted")
            continue
        if commercial and models and _commercial(name) is False:
            refused.append(f"{name}: its licence does not allow commercial use (`tunery models {name}`)")
            continue
        name_seq = min(seq, shape.context or seq)
        options = [fixed] if fixed else _default_flavors()
        best = None
        for fl in options:
            chosen = _candidate(name, shape, fl, method, name_seq, effective, epochs, profile, data, refused,
                                report=fixed is not None)
            if chosen and (best is None or chosen.usd < best.usd):
                best = chosen
        if best is None:
            if fixed is None:
                refused.append(f"{name}: no flavor fits it")
            continue
        if budget_usd is not None and best.usd > budget_usd:
            refused.append(f"{name}: ~{money(best.usd)} on {best.flavor}, over the budget of {money(budget_usd)}")
            continue
        if _commercial(name) is None and commercial:
            best.notes.append("licence unknown (not in the catalogue): check the model card before commercial use")
        candidates.append(best)
    candidates.sort(key=lambda c: c.params_b)
    return Plan(profile, kind, reason, seq, truncated, epochs, candidates[:3], refused)


def _candidate(name: str, shape: Shape, fl: Flavor, method: str | None, seq: int, effective: int, epochs: int,
               profile: DataProfile, data: str, refused: list[str], report: bool) -> Candidate | None:
    from tunery.models.catalog import is_prequantized

    how = "qlora" if is_prequantized(name) else choose_method(shape, fl, method)
    fitted, notes = fit(shape, how, seq, fl, effective), []
    if fitted is None:
        if not report:
            return None
        why, instead = explain_misfit(name, shape, how, seq, fl)
        fitted = fit(shape, instead, seq, fl, effective) if instead else None
        if fitted is None:
            refused.append(why)
            return None
        how, notes = instead, [why]
    batch, accum, peak = fitted
    tokens = int(epochs * (1 - EVAL_SPLIT) * sum(min(n, seq) for n in profile.lengths))
    seconds = run_seconds(tokens, shape, fl, how, seq, batch)
    args = ["tunery", "train", "--model", name, "--data", data, "--method", how, "--max-seq-len", str(seq),
            "--batch-size", str(batch), "--grad-accum", str(accum), "--epochs", str(epochs),
            "--gradient-checkpointing"]
    submit = (f"tunery submit --config {PLANS_DIR}/{_slug(name)}.yaml --flavor {fl.name}"
              + ("" if fl.name == "local" else " --backend hf-jobs"))
    if method and how != method and not notes:
        notes.append(f"{method} asked; the checkpoint is stored in 4 bits: qlora")
    elif not method and how == "qlora" and fl.gpus:
        notes.append(f"qlora: its 16-bit weights ({shape.params * 2 / 2**30:.0f} GiB) would take more than half of "
                     f"the {fl.memory_per_gpu_gb:g} GB")
    return Candidate(name, shape.params_b, how, seq, batch, accum, peak, fl.name, fl.memory_per_gpu_gb, seconds,
                     seconds / 3600 * fl.usd_per_hour, shlex.join(args), submit, notes)


def _slug(model: str) -> str:
    return model.rstrip("/").rsplit("/", 1)[-1].lower()


def _commercial(model: str) -> bool | None:
    from tunery.models.catalog import known_model

    known = known_model(model)
    return known.licence.commercial if known else None


def _catalogue_candidates(kind: str, commercial: bool) -> list[str]:
    """The catalogue's models of that kind (instruct ones for "either"; their base pairs are named), one per
    family, smallest first; pre-quantized checkpoints are for `--model`."""
    from tunery.models.catalog import KNOWN_MODELS

    picked: dict[str, str] = {}
    for m in sorted(KNOWN_MODELS, key=lambda m: m.params_b):
        if m.prequantized or (commercial and not m.licence.commercial):
            continue
        if m.instruct == (kind != "base") and m.family not in picked:
            picked[m.family] = m.hub_id
    return list(picked.values())


def _default_flavors() -> list[Flavor]:
    """This machine's GPU when it has one, else the one-GPU flavors of the table."""
    from tunery.jobs.flavors import local_flavor

    here = local_flavor()
    if here.gpus:
        return [here]
    return [f for f in flavors().values() if f.gpus == 1]


def _flavor_of_gpu(gpu: str) -> Flavor:
    """The cheapest one-GPU flavor with this GPU (T4, L4, A10G, A100, H100)."""
    matching = [f for f in flavors().values() if f.gpus == 1 and (f.gpu or "").lower() == gpu.lower()]
    if not matching:
        known = sorted({f.gpu for f in flavors().values() if f.gpu})
        raise TuneryError(f"unknown GPU {gpu!r}; known: {', '.join(known)} (or pick a --flavor)")
    return min(matching, key=lambda f: f.usd_per_hour)


def write_configs(plan: Plan, folder: str = PLANS_DIR) -> list[str]:
    """One RunConfig YAML per candidate, for `tunery submit --config`."""
    from pathlib import Path

    from tunery.config import RunConfig

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for c in plan.candidates:
        cfg = RunConfig(model=c.model, data=str(Path(plan.data.path).resolve()), method=c.method,
                        max_seq_len=c.max_seq_len, batch_size=c.batch_size, grad_accum=c.grad_accum,
                        epochs=float(plan.epochs), gradient_checkpointing=True)
        path = out / f"{_slug(c.model)}.yaml"
        cfg.to_yaml(path)
        written.append(str(path))
    return written
