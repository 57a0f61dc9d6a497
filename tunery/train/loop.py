"""The SFT loop as plain code, read top to bottom: `train` (a run folder) -> `run_loop` (the steps, evaluation,
checkpoints) -> `train_step` (one optimizer step; its micro-batch forward and backward written out in it) ->
`setup` (tokenizer, data, model, optimizer, the fast path).

    tunery train --model Qwen/Qwen2.5-0.5B-Instruct --data my.jsonl
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import tunery
from tunery.config import ConfigError, RunConfig
from tunery.data import pretokenize
from tunery.data.dataset import PreparedData, prepare_data
from tunery.errors import RunError
from tunery.kernels.apply import FastPath, fast_path_for
from tunery.kernels.graphs import StepGraphs, graphs_reason
from tunery.kernels.options import FastPathOptions
from tunery.models.catalog import family_of_model, is_prequantized
from tunery.models.load import (
    grow_vocabulary,
    load_model,
    model_fingerprint,
    pick_device,
    pick_dtype,
    remember_dynamic_shapes,
)
from tunery.models.lora import apply_lora
from tunery.models.packing import bound_convolutions, convolves
from tunery.progress import console
from tunery.run import RunLock, manifest, new_run_dir, open_run, started, write_json_atomic
from tunery.train import checkpoint, distributed
from tunery.train.batching import (
    bucket,
    collate,
    micro_batches,
    pack_batch,
    packing_problem,
    row_length,
    step_examples,
    token_micro_batches,
    trained_tokens,
)
from tunery.train.distributed import Dist
from tunery.train.loss import held_out_loss, summed_loss
from tunery.train.metrics import MetricsFile, TrainDisplay
from tunery.train.reporters import Reporters
from tunery.train.schedule import lr_multiplier, make_optimizer

log = logging.getLogger("tunery.train")


@dataclass
class Trainer:
    cfg: RunConfig
    run: Path
    model: object
    tokenizer: object
    data: PreparedData
    optimizer: object
    scheduler: object
    device: str
    total_steps: int
    dist: Dist = Dist()
    forward_model: object = None  # the DDP wrapper when distributed, else `model`
    fast: FastPath | None = None  # fused kernels in use, or the reason there are none
    graphs: StepGraphs | None = None  # runs train_step's micro-batch step eagerly or as a replayed CUDA graph
    timing: dict = field(default_factory=dict)  # run_loop's: time to first step, loop time, steady tokens/s
    batching: Batching | None = None  # how steps become micro-batches: cfg's, or what `choose_batching` picked
    prefetched: dict = field(default_factory=dict)  # step -> its micro-batches, built while the step before ran

    def __post_init__(self):
        self.forward_model = self.forward_model or self.model
        if self.batching is None:
            packed = bool(self.cfg.packing)
            self.batching = Batching(packed, self.cfg.micro_batch_tokens or 0,
                                     seq_idx=packed and bound_convolutions(self.model) > 0)
        if self.graphs is None:
            self.graphs = step_graphs(self.model, self.fast, self.device, self.dist, packed=self.batching.packed)


@dataclass(frozen=True)
class Batching:
    """How a step's examples become micro-batches: packed rows or padded ones; by token budget (`tokens` > 0)
    or `batch_size` examples at a time; `auto`: which of the two tunery chose itself (`choose_batching`)."""

    packed: bool
    tokens: int
    auto: tuple[str, ...] = ()
    seq_idx: bool = False  # packed rows carry each token's example number: the model has bounded convolutions

    def describe(self) -> str:
        rows = "packed rows" if self.packed else "padded rows"
        if self.seq_idx:
            rows += " (convolutions bounded at each example's start)"
        size = f"micro-batches of up to {self.tokens:,} tokens" if self.tokens else "batch_size examples a micro-batch"
        chosen = f" (chosen for this GPU run: {', '.join(self.auto)}; set them to change it)" if self.auto else ""
        return f"{rows}, {size}{chosen}"


AUTO_TOKENS = 4096  # the least token budget auto picks: about what a padding-free batch of 8 chat rows holds


def choose_batching(cfg: RunConfig, model, device: str, dist: Dist) -> Batching:
    """cfg's packing and micro_batch_tokens, with what is unset (None) chosen: on CUDA with the fast path in one
    process, micro-batches by token budget (max(max_seq_len, AUTO_TOKENS)), packed where the model can pack and
    varlen attention serves it. A run of varied lengths then meets few shapes (compiles, CUDA graphs) and pads
    little; elsewhere (CPU, the reference path, several processes) batch_size examples, padded, as before."""
    from tunery.kernels.varlen import varlen_problem

    gpu_run = str(device).startswith("cuda") and cfg.fast and not dist.enabled
    auto = []
    packed = cfg.packing
    if packed is None:
        # not yet where the blocks convolve (LFM2): bounded packing is right on the CPU tests but not yet measured
        # on a GPU (compiled, captured), so those runs keep padded token budgets until it is; --packing packs them
        packed = bool(gpu_run and packing_problem(model) is None and varlen_problem(model) is None
                      and not convolves(model))
        auto.append("packing" if packed else "no packing")
    tokens = cfg.micro_batch_tokens
    if tokens is None:
        tokens = max(cfg.max_seq_len, AUTO_TOKENS) if gpu_run else 0
        auto.append(f"micro_batch_tokens {tokens}")
    # packed rows of a model whose blocks convolve: each convolution bounded at the examples' starts
    bounded = packed and bound_convolutions(model) > 0
    return Batching(packed, tokens, tuple(auto) if gpu_run else (), seq_idx=bounded)


def choose_compile(cfg: RunConfig, model, data: PreparedData, device: str, dist: Dist, batching: Batching,
                   steps: int) -> tuple[FastPathOptions, str]:
    """cfg.fast_path with `compile` decided where it is unset, and a note saying why. torch.compile's warm-up
    (10-20 s more on an H100) repays itself only over enough steps: on where the steps are estimated
    (advisor/speed.py's throughput for this GPU) to take at least compile_min_seconds, else off.
    Set (--fast-compile / --no-fast-compile), or off the GPU fast path, nothing is decided here."""
    options = cfg.fast_path
    if options.compile is not None or not (str(device).startswith("cuda") and cfg.fast and not dist.enabled):
        return options, ""
    seconds = estimated_step_seconds(cfg, model, data, batching, steps)
    if seconds is None:
        return dataclasses.replace(options, compile=True), ""
    on = seconds >= options.compile_min_seconds
    note = (f"torch.compile {'on' if on else 'off'}: steps estimated at ~{seconds:.0f} s on this GPU, "
            f"{'at least' if on else 'under'} compile_min_seconds {options.compile_min_seconds:g} "
            f"(--fast-compile or --no-fast-compile to choose)")
    return dataclasses.replace(options, compile=on), note


def estimated_step_seconds(cfg: RunConfig, model, data: PreparedData, batching: Batching, steps: int) -> float | None:
    """The time the run's steps take on this machine's GPU by the advisor's throughput model (None: a model it
    has no shape for). Tokens: the steps' examples at the data's mean length."""
    from tunery.advisor.shape import shape_of_config
    from tunery.advisor.speed import tokens_per_second
    from tunery.jobs.flavors import local_flavor

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    shape = shape_of_config(base.config.to_dict())
    lengths = [len(e.input_ids) for e in data.train]
    if shape is None or not lengths:
        return None
    mean = sum(lengths) / len(lengths)
    tokens = steps * cfg.batch_size * cfg.grad_accum * mean
    per_micro = batching.tokens or cfg.batch_size * mean
    rate = tokens_per_second(shape, local_flavor(), cfg.method, seq=max(1, round(mean)),
                             batch=max(1, round(per_micro / mean)))
    return tokens / rate


def train(cfg: RunConfig, resume: str | Path | None = None) -> Path:
    """Train a new run (or continue `resume`) and return its folder; `gpus` > 1 launches torchrun. The folder
    is locked while this process trains in it (the ranks of a distributed run train under their launcher's)."""
    dist = distributed.current()
    if resume:
        run, cfg = open_run(resume)
    else:
        cfg.require("model", "data")
        cfg = cfg.with_absolute_paths(Path.cwd())  # config.yaml then reads the same from any folder
        run = new_run_dir(cfg)
    with contextlib.nullcontext() if dist.enabled else RunLock(run):
        if not resume:
            if started(run):  # another process claimed the prepared folder first and trained in it
                raise RunError(f"run folder {run} already holds a run; continue it with `tunery train --resume "
                               f"{run}`, or pick another --name")
            cfg.to_yaml(run / "config.yaml")
        if cfg.gpus > 1 and not dist.enabled:
            # every rank continues the prepared folder (a fresh start when it holds only config.yaml)
            code = distributed.launch(cfg.gpus, ["train", "--resume", str(run)])
            if code:
                raise RunError(f"distributed training exited with status {code}; see {run / 'train.log'}")
            return run
        return _train_logged(cfg, run, resume is not None, dist)


def _train_logged(cfg: RunConfig, run: Path, resuming: bool, dist: Dist) -> Path:
    handler = _attach_log(run) if dist.main else None
    try:
        out = _train_in(cfg, run, resuming, dist)
        distributed.barrier(dist)  # no rank tears the process group down while another still uses it
        return out
    finally:
        distributed.shutdown(dist)
        if handler:
            logging.getLogger("tunery").removeHandler(handler)
            handler.close()


def _train_in(cfg: RunConfig, run: Path, resuming: bool, dist: Dist) -> Path:
    fingerprint = None
    if dist.main and (not resuming or not (run / "manifest.json").exists()):
        # the manifest's model hash reads every weight file: beside setup, which reads them too (hashlib and
        # file reads let go of the GIL)
        fingerprint = Background(model_fingerprint, cfg.model, cfg.revision)
    t = setup(cfg, run, dist)
    start = 0
    saved = checkpoint.list_checkpoints(run / "checkpoints") if resuming else []
    if saved:
        start = checkpoint.load_checkpoint(saved[-1], t.model, t.optimizer, t.scheduler)
    if not dist.main:
        run_loop(t, start, None)
        return run
    report = t.data.report()
    console.print(f"[bold]{run}[/]: {report['train_examples']} train / {report['eval_examples']} eval "
                  f"examples, {t.total_steps} steps on {t.device}; {t.fast.describe()}; "
                  f"{t.graphs.describe()}; {t.batching.describe()}")
    for f in report["files"]:
        for note, n in f["template_notes"].items():
            console.print(f"[yellow]{f['path']}[/]: {n} rows: {note}")
        if f["rejected"] or f["truncated"] or f["no_trainable_tokens"]:
            console.print(f"[yellow]{f['path']}[/]: {f['rejected']} rows rejected {f['rejected_reasons']}, "
                          f"{f['truncated']} truncated, {f['no_trainable_tokens']} with nothing to train on")
    if saved:
        console.print(f"resuming from {saved[-1].name} (step {start} of {t.total_steps})")
    elif (run / "metrics.jsonl").exists():
        console.print("no checkpoint yet: starting the run over")
    if fingerprint is not None:
        data_hashes = {f.path: f.data_hash for f in t.data.files}
        write_json_atomic(run / "manifest.json", {
            **manifest(cfg, data_hashes, fingerprint.result()),
            "data_report": report})
    reporters = Reporters(cfg.report_to, run, "tunery", cfg.to_dict()) if cfg.report_to else None
    metrics = MetricsFile(run / "metrics.jsonl", keep_through_step=start, reporters=reporters)
    try:
        last = run_loop(t, start, metrics)
    finally:
        metrics.close()
    saving = time.time()
    _save_final(t)
    t.timing["save_s"] = round(time.time() - saving, 3)
    result = {"steps": t.total_steps, "final_loss": last.get("loss"), "eval_loss": last.get("eval_loss"),
              # what the steps ran on, as the run ended (a CUDA graph capture that failed mid-run shows here)
              "engine": {"fast_path": t.fast.describe(), "steps": t.graphs.describe(),
                         "batching": t.batching.describe(),
                         "fast_path_options": t.fast.options.to_dict()},
              # this process's steps (after a resume, only those it ran); first_step_s counts from its start;
              # setup: seconds for imports (from the start), tokenizer and data, the weights, adapters and fast path
              "timing": t.timing}
    write_json_atomic(run / "result.json", result)
    console.print(f"done: loss {result['final_loss']:.4f}"
                  + (f", eval loss {result['eval_loss']:.4f}" if result["eval_loss"] is not None else "")
                  + f"; weights in {run / ('model' if cfg.method == 'full' else 'adapter')}")
    return run


class Background:
    """`fn(*args)` in a daemon thread (a failed setup does not wait for it to exit); `result()` waits for it and
    returns its value or raises its exception."""

    def __init__(self, fn, *args):
        import threading

        self._value, self._error = None, None
        self._thread = threading.Thread(target=self._run, args=(fn, args), daemon=True, name="tunery-background")
        self._thread.start()

    def _run(self, fn, args) -> None:
        try:
            self._value = fn(*args)
        except BaseException as e:  # noqa: BLE001 - handed to whoever waits for the result
            self._error = e

    def result(self):
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value


def run_loop(t: Trainer, start: int, metrics: MetricsFile | None) -> dict:
    """Steps from `start` to the end; only the main rank (metrics is not None) evaluates, logs and saves."""
    cfg, main = t.cfg, metrics is not None
    display = TrainDisplay(t.total_steps, start) if main else None
    t0, tokens, last, slots = time.time(), 0, {}, 0
    marks = [(t0, 0)]  # (time, tokens so far) after each step of this process: rates now and in steady state
    try:
        for step in range(start, t.total_steps):
            stats = train_step(t, step)
            done = step + 1
            if not math.isfinite(stats["loss"]):  # nothing after this step could be trusted, so nothing is saved
                raise RunError(f"the loss became {stats['loss']} at step {done}; training stopped without saving "
                               f"its weights. Lower --lr (now {cfg.lr:g}), check the data with `tunery data "
                               f"inspect`, or use --dtype fp32; `tunery train --resume {t.run}` continues from "
                               "the last checkpoint")
            tokens += stats.pop("tokens")
            slots += stats.pop("slots")
            marks.append((time.time(), tokens))
            epoch = done * cfg.batch_size * cfg.grad_accum * t.dist.world / len(t.data.train)
            # tokens_per_s: since the loop began, warm-up (compiles, captures) included; recent: the last 20 steps
            stats.update(step=done, total_steps=t.total_steps, epoch=round(epoch, 4),
                         tokens_per_s=_rate(marks[0], marks[-1]),
                         tokens_per_s_recent=_rate(marks[max(0, len(marks) - 21)], marks[-1]),
                         elapsed_s=round(marks[-1][0] - t0, 3))
            if len(marks) == 2:
                t.timing["first_step_s"] = round(marks[1][0] - tunery.STARTED, 3)
            last = stats
            if not main:
                continue
            if t.data.eval and ((cfg.eval_every and done % cfg.eval_every == 0) or done == t.total_steps):
                ev = _eval(t, display if done == t.total_steps else None)
                stats.update(eval_loss=ev["loss"], eval_perplexity=ev["perplexity"])
            if done % cfg.log_every == 0 or done == t.total_steps or "eval_loss" in stats:
                metrics.write(stats)
                log.info("step %d loss %.5f lr %.3e", done, stats["loss"], stats["lr"])
            display.update(done, stats)
            if cfg.save_every and done % cfg.save_every == 0 and done < t.total_steps:
                checkpoint.save_checkpoint(t.run / "checkpoints", done, t.model, t.optimizer, t.scheduler,
                                           cfg.keep_checkpoints)
    finally:
        if display:
            display.close()
    half = marks[len(marks) // 2] if len(marks) > 4 else marks[0]
    t.timing.update(loop_s=round(marks[-1][0] - t0, 3), tokens=tokens,
                    tokens_per_s=round(_rate(marks[0], marks[-1]), 1),
                    # the second half of the steps: past the compiles and captures of the first shapes
                    steady_tokens_per_s=round(_rate(half, marks[-1]), 1),
                    padding_share=round(1 - tokens / max(1, slots * t.dist.world), 4), cuda_graphs=t.graphs.captured,
                    **_engine_counts(t.device))
    return last


def _engine_counts(device: str) -> dict:
    """What the steps cost the engine: torch.compile's graphs (each a compile) and the peak GPU memory."""
    import torch

    out = {}
    try:
        from torch._dynamo.utils import counters

        out["compiled_graphs"] = int(counters["stats"]["unique_graphs"])
    except (ImportError, KeyError, TypeError):
        pass
    if str(device).startswith("cuda"):
        out["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    return out


def _rate(a: tuple[float, int], b: tuple[float, int]) -> float:
    return (b[1] - a[1]) / max(b[0] - a[0], 1e-9)


def _eval(t: Trainer, display: TrainDisplay | None = None) -> dict:
    """Held-out loss over at most eval_max_rows rows (the same seeded sample every time); with `display`, a
    progress bar."""
    rows = t.data.eval
    if t.cfg.eval_max_rows and len(rows) > t.cfg.eval_max_rows:
        picked = sorted(random.Random(t.cfg.seed).sample(range(len(rows)), t.cfg.eval_max_rows))
        rows = [rows[i] for i in picked]
    advance = display.subtask("held-out loss", -(-len(rows) // t.cfg.batch_size)) if display else None
    return held_out_loss(t.model, rows, t.tokenizer.pad_token_id, t.device, t.cfg.batch_size, on_batch=advance)


def _save_final(t: Trainer) -> None:
    kind = "model" if t.cfg.method == "full" else "adapter"
    t.model.save_pretrained(t.run / kind)
    t.tokenizer.save_pretrained(t.run / kind)


def train_step(t: Trainer, step: int) -> dict:
    """One optimizer step over its micro-batches; loss is the mean over all trained tokens. Nothing waits for
    the GPU until the step is queued whole (micro-batches, clipping, the optimizer): then the next step's
    micro-batches are built and copied while it runs, and only then are its loss and norm read back."""
    import torch

    cfg, dist = t.cfg, t.dist
    batches = t.prefetched.pop(step, None) or step_batches(t, step)
    t.prefetched.clear()
    n_tokens = max(1.0, distributed.all_sum(sum(trained_tokens(b) for b in batches), dist))

    def forward_backward(batch: dict, scale) -> object:
        """One micro-batch: the loss summed over its label tokens, and its gradients (scaled by `scale`) added
        into p.grad. t.graphs runs exactly this, eagerly or as the replay of its CUDA-graph capture."""
        loss = summed_loss(t.forward_model, batch, t.fast)
        (loss * scale).backward()
        return loss.detach()

    losses = []
    for i, batch in enumerate(batches):
        sync = i == len(batches) - 1 or not dist.enabled
        with contextlib.nullcontext() if sync else t.forward_model.no_sync():
            # DDP averages gradients over ranks; scaling by world makes that the sum over all tokens
            losses.append(t.graphs(forward_backward, batch, dist.world / n_tokens))
    params = [p for p in t.model.parameters() if p.requires_grad]
    norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"))
    lr = t.optimizer.param_groups[0]["lr"]
    t.optimizer.step()
    t.scheduler.step()
    t.optimizer.zero_grad(set_to_none=True)
    if step + 1 < t.total_steps:  # built while the GPU runs this step (pinned, non-blocking copies on CUDA)
        t.prefetched[step + 1] = step_batches(t, step + 1)
    total = distributed.all_sum(sum(float(loss) / n_tokens for loss in losses), dist)
    tokens = distributed.all_sum(sum(b["real_tokens"] for b in batches), dist)
    slots = sum(b["input_ids"].numel() for b in batches)  # this process's tokens with padding: what it computed
    return {"loss": total, "lr": lr, "grad_norm": float(norm), "tokens": int(tokens), "slots": slots,
            "micro_batches": len(batches)}


def step_batches(t: Trainer, step: int) -> list[dict]:
    """The micro-batches of optimizer step `step`, on the device: this process's share of the step's examples,
    cut by token budget or by `batch_size`, packed or padded (t.batching)."""
    cfg, dist = t.cfg, t.dist
    per_step = cfg.batch_size * cfg.grad_accum * dist.world
    picked = [t.data.train[i] for i in step_examples(len(t.data.train), step, per_step, cfg.seed)]
    multiple = 64 if t.fast and t.fast.compiled else 1
    # the fast path's families are causal: right-padded rows need no mask, so attention runs sdpa's causal kernel
    # (no mask built, none read back), and a padded batch is captured like an unpadded one (kernels/graphs.py)
    mask = not (t.fast and t.fast.applied)
    budget, pad, packed = t.batching.tokens, t.tokenizer.pad_token_id, t.batching.packed
    if budget:  # micro-batches of about `budget` tokens, lengths from the ladder: few shapes
        micro = token_micro_batches(picked, budget, packed)
        if packed:
            return [pack_batch(ex, t.device, length=row_length(sum(len(e.input_ids) for e in ex), budget),
                               fixed_bounds=t.graphs.enabled, seq_idx=t.batching.seq_idx) for ex in micro]
        return [collate(ex, pad, t.device, mask=mask, length=bucket(max(len(e.input_ids) for e in ex)))
                for ex in micro]
    # padded micro-batches take the step's examples grouped by length; a packed row has no padding to save
    micro = micro_batches(picked, cfg.batch_size, dist.rank, dist.world, by_length=not packed)
    if packed:
        return [pack_batch(examples, t.device, multiple, seq_idx=t.batching.seq_idx) for examples in micro]
    return [collate(examples, pad, t.device, multiple, mask) for examples in micro]


def tokenizes_ahead(device: str, dist: Dist) -> bool:
    """Whether setup tokenizes in a second process while it loads the model (tunery/data/pretokenize.py): on a
    GPU, where setup's Python work is most of a short run's wait, in one process (a distributed run's ranks
    would each start one). A CPU run has the cores busy with itself."""
    return str(device).startswith("cuda") and not dist.enabled


def setup(cfg: RunConfig, run: Path, dist: Dist = Dist()) -> Trainer:
    """Load tokenizer, data and model; build optimizer and schedule (seeded, so resume rebuilds the same)."""
    import torch

    phases = {"imports_s": round(time.time() - tunery.STARTED, 3)}  # where the time before the first step goes
    mark = time.time()

    def lap(name: str) -> None:
        nonlocal mark
        now = time.time()
        phases[name], mark = round(now - mark, 3), now

    device = distributed.init(dist, pick_device(cfg.device))
    check_method(cfg)
    check_packages(cfg)

    def load_weights():
        torch.manual_seed(cfg.seed)
        loaded = load_model(cfg.model, device, pick_dtype(cfg.dtype, device), cfg.revision, cfg.trust_remote_code,
                            four_bit=cfg.method == "qlora")
        lap("load_s")
        return loaded

    model = None
    if tokenizes_ahead(device, dist):  # a second process tokenizes while this one loads the model
        ahead = pretokenize.start(cfg)
        try:
            model = load_weights()
            pretokenize.wait(ahead)
        except BaseException:
            pretokenize.stop(ahead)
            raise
    tokenizer, defaulted = pretokenize.run_tokenizer(cfg)
    if defaulted:
        log.info("tokenizer has no chat template: using tunery's default (ChatML text + eos)")
    data = prepare_data(cfg, tokenizer)  # read from the cache where the second process tokenized it
    check_context(cfg, data)
    lap("data_s")
    if model is None:
        model = load_weights()
    if device.startswith("cuda"):  # where the fast path compiles (and its caches are kept)
        remember_dynamic_shapes(model.config.to_dict())
    new_tokens = grow_vocabulary(model, tokenizer)
    if new_tokens:
        names = ", ".join(tokenizer.convert_ids_to_tokens(new_tokens[:5])) + (", ..." if len(new_tokens) > 5 else "")
        console.print(f"the tokenizer has {len(new_tokens)} tokens the model has no embedding rows for ({names}): "
                      "embeddings grown; the new rows start at the mean of the others and are trained")
    model = make_trainable(model, cfg, new_tokens)
    why = packing_problem(model) if cfg.packing else None  # asked for; auto packs only where it can
    if why:
        raise ConfigError(f"packing cannot train {cfg.model}: {why}; train it without --packing")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, cfg.optimizer, cfg.lr, cfg.weight_decay)
    steps = total_steps(cfg, len(data.train))
    warmup = int(cfg.warmup_ratio * steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_multiplier(s, steps, warmup, cfg.scheduler))
    forward = model
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel

        ids = [dist.local_rank] if device.startswith("cuda") else None
        forward = DistributedDataParallel(model, device_ids=ids)
    batching = choose_batching(cfg, model, device, dist)
    options, compile_note = choose_compile(cfg, model, data, device, dist, batching, steps)
    fast = fast_path_for(model, device, family_of_model(model), options, enabled=cfg.fast,
                         distributed=dist.enabled, packing=batching.packed, checkpointing=cfg.gradient_checkpointing)
    if compile_note and fast.applied:
        fast.notes.append(compile_note)
    log.info(fast.describe())
    trainer = Trainer(cfg, run, model, tokenizer, data, optimizer, scheduler, device, steps, dist, forward, fast,
                      batching=batching)
    lap("prepare_s")
    trainer.timing["setup"] = phases
    log.info("batching: %s", batching.describe())
    log.info(trainer.graphs.describe())
    return trainer


def check_method(cfg: RunConfig) -> None:
    """A checkpoint stored in 4 bits (a pre-quantized bitsandbytes one, `...-bnb-4bit`) trains only as QLoRA: its
    16-bit weights are not in it, for LoRA over them or a full fine-tune."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(cfg.model, revision=cfg.revision,
                                            trust_remote_code=cfg.trust_remote_code).to_dict()
    except (OSError, ValueError):
        config = {}  # load_model says what is wrong with the model
    if cfg.method != "qlora" and is_prequantized(cfg.model, config):
        raise ConfigError(f"{cfg.model} is stored in 4 bits (a pre-quantized bitsandbytes checkpoint): train it with "
                          f"--method qlora, or pick its 16-bit model for --method {cfg.method}")


def check_packages(cfg: RunConfig) -> None:
    """Refuse, before anything loads, a run whose optional packages are missing: bitsandbytes for a 4-bit base
    (`--method qlora`) or the 8-bit optimizer, each named with the setting that needs it and its alternative."""
    import importlib.util

    wants = cfg.bitsandbytes_settings()
    if wants and importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(f"{' and '.join(s for s, _ in wants)} need{'s' if len(wants) == 1 else ''} bitsandbytes: "
                          f"pip install 'tunery[qlora]' (or use {' and '.join(i for _, i in wants)})")


def check_context(cfg: RunConfig, data: PreparedData) -> None:
    """Refuse, before loading the weights, rows longer than the model's context (its config's
    max_position_embeddings): past it lie positions it never learned (a crash mid-run for learned positions,
    quietly worse answers for rotary ones). Only rows that are that long count, not max_seq_len itself."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(cfg.model, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError):
        return  # load_model says what is wrong with the model
    context = getattr(config.get_text_config(), "max_position_embeddings", None)
    longest = max((len(t.input_ids) for t in [*data.train, *data.eval]), default=0)
    if context and longest > context:
        over = sum(len(t.input_ids) > context for t in [*data.train, *data.eval])
        raise ConfigError(f"{over} rows are longer than {cfg.model}'s context of {context} tokens (its config's "
                          f"max_position_embeddings; the longest is {longest}): set --max-seq-len {context} (or "
                          "lower) to truncate them")


def make_trainable(model, cfg: RunConfig, new_tokens: list[int] | None = None):
    """Adapters (or every weight) set to train, checkpointing as configured, train mode: what a run trains.
    With LoRA, the embedding rows of `new_tokens` train too."""
    if cfg.method == "full":
        model.requires_grad_(True)
    else:
        model = apply_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets, new_tokens)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.method != "full":
            model.enable_input_require_grads()
    model.train()
    return model


def step_graphs(model, fast: FastPath | None, device: str, dist: Dist = Dist(), packed: bool = False) -> StepGraphs:
    """The micro-batch runner of a run: CUDA graphs where kernels/graphs.py can capture the step, else eager."""
    opts = fast.options if fast is not None else None
    reason = "multi-process training" if dist.enabled else graphs_reason(model, device, fast)
    if not reason and opts is not None and not opts.cuda_graphs:
        reason = "switched off (--no-fast-cuda-graphs)"
    params = [p for p in model.parameters() if p.requires_grad]
    if opts is None:
        return StepGraphs(params, enabled=not reason, reason=reason)
    return StepGraphs(params, enabled=not reason, reason=reason, state=fast.state, packed=packed,
                      capture_after=opts.capture_after, max_graphs=opts.max_graphs)


def total_steps(cfg: RunConfig, n_train: int) -> int:
    if cfg.max_steps:
        return cfg.max_steps
    return max(1, math.ceil(cfg.epochs * n_train / (cfg.batch_size * cfg.grad_accum)))


def _attach_log(run: Path) -> logging.Handler:
    handler = logging.FileHandler(run / "train.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logging.getLogger("tunery").addHandler(handler)
    logging.getLogger("tunery").setLevel(logging.INFO)
    return handler
