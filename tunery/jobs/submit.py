"""Prepare and queue a job: resolve its config into a run folder, estimate time and cost, check the budget."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from tunery.advisor.fits import check_fits
from tunery.config import RunConfig
from tunery.errors import TuneryError
from tunery.jobs.flavors import Estimate, estimate, get_flavor
from tunery.jobs.secrets import check_names, store_secrets
from tunery.jobs.store import Job, JobStore
from tunery.jobs.worker import worker_running
from tunery.paths import tunery_home
from tunery.run import auto_name, create_run_dir

BACKENDS = ("local", "ray", "hf-jobs")


def model_size_b(model: str) -> float:
    """Parameters in billions: the catalog, a local config.json, or a size in the Hub id ('7B')."""
    from tunery.models.catalog import known_model

    known = known_model(model)
    if known:
        return known.params_b
    config = Path(model).expanduser() / "config.json"
    if config.is_file():
        c = json.loads(config.read_text())
        h, layers, vocab = c["hidden_size"], c["num_hidden_layers"], c["vocab_size"]
        inter = c.get("intermediate_size", 4 * h)
        embed = vocab * h * (1 if c.get("tie_word_embeddings") else 2)
        return (embed + layers * (4 * h * h + 3 * h * inter)) / 1e9
    match = re.search(r"(\d+(?:\.\d+)?)\s*[bB]\b", model)
    return float(match[1]) if match else 1.0


def checked_data(cfg: RunConfig):
    """The run's data through training's own gate (tunery.data.dataset.prepare_data: rejected, truncated and
    overlapping rows, with --allow-data-issues as the way past), so a job that would be refused is refused now,
    not after it waited in a queue or started a paid machine. None when the model's tokenizer cannot be loaded
    here (a remote job's model this machine cannot read): the job then checks the data itself."""
    from tunery.data.dataset import prepare_data
    from tunery.data.templates import ensure_chat_template
    from tunery.errors import ModelError
    from tunery.models.load import load_tokenizer

    try:
        tokenizer = load_tokenizer(cfg.model, cfg.revision, cfg.trust_remote_code)
    except ModelError:
        return None
    ensure_chat_template(tokenizer, cfg.prompt_template)
    return prepare_data(cfg, tokenizer)


def training_tokens(cfg: RunConfig, data=None) -> int:
    """Tokens the run will process: counted from `data` (checked_data) when there is one, else estimated from
    the data's characters (~4 per token)."""
    from tunery.data.formats import detect_format, normalise
    from tunery.data.load import load_rows

    if data is not None and data.train:
        lengths = [len(t.input_ids) for t in data.train]
        mean = sum(lengths) / len(lengths)
        if cfg.max_steps:
            return int(cfg.max_steps * cfg.batch_size * cfg.grad_accum * mean)
        return int(cfg.epochs * sum(lengths))

    rows = load_rows(cfg.data, cfg.sheet, cfg.columns)
    examples, _ = normalise(rows, detect_format(rows, source=cfg.data), json_values=cfg.json_values)
    lengths = [min(cfg.max_seq_len, len(json.dumps(e)) // 4) for e in examples if e is not None]
    if not lengths:
        raise TuneryError(f"{cfg.data}: no usable rows (run `tunery data inspect {cfg.data}`)")
    mean = sum(lengths) / len(lengths)
    if cfg.max_steps:
        return int(cfg.max_steps * cfg.batch_size * cfg.grad_accum * mean)
    return int(cfg.epochs * sum(lengths))


def prepare(cfg: RunConfig, flavor: str, backend: str, base: Path | None = None) -> tuple[RunConfig, Path, Estimate]:
    if backend not in BACKENDS:
        raise TuneryError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    cfg.require("model", "data")
    cfg = cfg.with_absolute_paths(base or Path.cwd())
    run_dir = Path(cfg.output_dir) / (cfg.name or auto_name(cfg.model))
    if cfg.name and run_dir.exists():  # early word; `queue` creates the folder atomically
        raise TuneryError(f"run folder {run_dir} already exists; pick another --name")
    if backend == "local":
        check_local_flavor(flavor)
    data = checked_data(cfg)
    longest = max((len(t.input_ids) for t in data.train), default=None) if data else None
    check_fits(cfg, get_flavor(flavor), longest)
    est = estimate(training_tokens(cfg, data), model_size_b(cfg.model), get_flavor(flavor),
                   _measured_rate(cfg, get_flavor(flavor), longest))
    return cfg, run_dir, est


def _measured_rate(cfg: RunConfig, flavor, longest: int | None) -> float | None:
    """Tokens a second from the advisor's time model (tunery's own H100 bench rows scaled to the flavor's GPU),
    for a GPU flavor and a model whose config is here; None otherwise (the size table's rate is used)."""
    from tunery.advisor.shape import shape_for_model
    from tunery.advisor.speed import tokens_per_second

    shape = shape_for_model(cfg.model) if flavor.gpus else None
    if shape is None:
        return None
    seq = min(cfg.max_seq_len, longest or cfg.max_seq_len)
    return tokens_per_second(shape, flavor, cfg.method, seq, cfg.batch_size)


def check_local_flavor(name: str) -> None:
    """The local backend runs here: a GPU flavor (its price, its speed) must be this machine's GPU, so a CPU run
    is never billed and estimated as an H100's (a rented machine of that kind may name its flavor)."""
    from tunery.jobs.flavors import local_flavor

    wanted, here = get_flavor(name), local_flavor()
    if wanted.gpus and not (here.gpus and wanted.gpu and wanted.gpu.lower() in (here.gpu or "").lower()):
        raise TuneryError(f"flavor {name} is {wanted.gpus} {wanted.gpu} GPU(s), but the local backend runs on this "
                          f"machine, which has {here.gpu or 'no GPU'}: leave --flavor out (local), or submit with "
                          "--backend hf-jobs to run on that hardware")


def queue(cfg: RunConfig, run_dir: Path, est: Estimate, *, flavor: str, backend: str, timeout_s: int | None,
          budget_usd: float | None, secrets: list[str], store: JobStore | None = None) -> Job:
    check_names(secrets)  # before anything is written: a value given as a name is refused, unechoed
    store = store or JobStore()
    # the folder is made here, atomically: a name given twice is refused, a generated one is unique (its tag
    # may differ from the one `prepare` showed when two submits drew the same second)
    run_dir = create_run_dir(run_dir.parent, cfg.name, cfg.model)
    try:
        cfg = cfg.replace(name=run_dir.name)
        cfg.to_yaml(run_dir / "config.yaml")
        job = store.add(name=cfg.name, model=cfg.model, backend=backend, flavor=flavor, run_dir=str(run_dir),
                        timeout_s=timeout_s, budget_usd=budget_usd, usd_per_hour=get_flavor(flavor).usd_per_hour,
                        estimate=est.describe(), secret_names=secrets)
        if backend == "local":  # remote backends hand secrets to their own service at submit
            store_secrets(job.id, secrets)
        return job
    except BaseException:
        shutil.rmtree(run_dir, ignore_errors=True)  # a submit that failed leaves no folder to block the name
        raise


def ensure_worker(idle_exit_s: int = 60) -> bool:
    """Start a background `tunery worker` when none runs; True when one was started."""
    if worker_running():
        return False
    log = open(tunery_home() / "worker.log", "a", encoding="utf-8")
    subprocess.Popen([sys.executable, "-m", "tunery.cli.app", "worker", "--exit-when-idle", str(idle_exit_s)],
                     stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                     env=os.environ.copy())
    return True
