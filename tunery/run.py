"""The run folder, the one thing every verb shares: create it, open it, describe it, load what it trained.

    run, cfg = open_run("runs/my-run")            # the folder and its RunConfig (config.yaml)
    base, tuned, tokenizer = load_trained(run, "cpu")

A run folder holds config.yaml, manifest.json, metrics.jsonl, train.log, checkpoints/, result.json and adapter/
(LoRA, PEFT format) or model/ (full fine-tuning). `train` writes it; eval, export, chat and the job layer read
it through this module.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import os
import platform
import secrets
import subprocess
from pathlib import Path

from tunery.config import RunConfig
from tunery.errors import RunError

# what a run writes once it has started training (the manifest comes right before the first step)
_STARTED = ("manifest.json", "metrics.jsonl", "checkpoints", "adapter", "model", "result.json")


LOCK = ".train.lock"  # held (flock) by the process training in a run folder, for as long as it trains


def auto_name(model: str) -> str:
    """A run name from the model, the time and a random tag: two runs started in the same second differ."""
    return f"{Path(model.rstrip('/')).name}-{dt.datetime.now():%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"


def create_run_dir(output_dir: str | Path, name: str | None, model: str) -> Path:
    """A new, empty run folder, created atomically (mkdir fails if it exists): a given `name` that exists is
    refused, a generated one is tried again under another tag. Two processes never get the same folder."""
    try:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise RunError(f"output_dir {output_dir} is a file, not a folder; pass --output-dir FOLDER") from None
    for _ in range(20):
        path = Path(output_dir) / (name or auto_name(model))
        try:
            path.mkdir()
            return path
        except FileExistsError:
            if name:
                raise RunError(f"run folder {path} already exists; pick another --name, or continue it with "
                               f"`tunery train --resume {path}`") from None
    raise RunError(f"could not create a new run folder under {output_dir}; pass --name")


def started(run: Path) -> bool:
    """Whether training has begun in `run` (it holds more than a prepared config and a job log)."""
    return any((Path(run) / p).exists() for p in _STARTED)


def new_run_dir(cfg: RunConfig) -> Path:
    """The folder `tunery train` starts in: a new one, or the one `tunery submit` prepared for this config."""
    if cfg.name:
        path = Path(cfg.output_dir) / cfg.name
        # a folder prepared by `tunery submit` (its config and job log), or left by a run that stopped before
        # training (a wrong setting, a missing model: its config and an empty log), holds nothing to lose
        if path.is_dir() and not started(path):
            return path
    return create_run_dir(cfg.output_dir, cfg.name, cfg.model or "run")


class RunLock:
    """An exclusive lock on a run folder while one process trains in it: a second `train` (or `--resume`) of the
    same folder is refused instead of writing into it too. The OS lets go when the process dies."""

    def __init__(self, run: Path):
        self.path = Path(run) / LOCK
        self._fh = None

    def __enter__(self) -> RunLock:
        self._fh = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(self._fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._fh.seek(0)
            holder = self._fh.read().strip() or "another process"
            self._fh.close()
            raise RunError(f"{self.path.parent} is being trained by {holder}; wait for it, or stop it "
                           "(`tunery cancel JOB` for a job)") from None
        self._fh.seek(0)
        self._fh.truncate()
        self._fh.write(f"pid {os.getpid()}\n")
        self._fh.flush()
        return self

    def __exit__(self, *exc) -> None:
        fcntl.flock(self._fh, fcntl.LOCK_UN)
        self._fh.close()


def open_run(run: str | Path) -> tuple[Path, RunConfig]:
    """An existing run folder and its config; a clear error when it is not one."""
    path = Path(run)
    if not (path / "config.yaml").is_file():
        raise RunError(f"{path} is not a tunery run folder (no config.yaml); runs live under the "
                       "output_dir of `tunery train` (default ./runs)")
    return path, RunConfig.from_yaml(path / "config.yaml")


def trained_weights(run: Path) -> tuple[str, Path]:
    """('adapter', run/adapter) or ('model', run/model) of a finished run."""
    for kind in ("adapter", "model"):
        if (run / kind).is_dir():
            return kind, run / kind
    raise RunError(f"{run} has no trained weights yet (no adapter/ or model/); finish it with "
                   f"`tunery train --resume {run}`")


def load_trained(run: Path, device: str):
    """(base model, tuned model, tokenizer) of a finished run; for LoRA both share the base weights."""
    from transformers import AutoTokenizer

    from tunery.models.load import load_model, pick_dtype
    from tunery.models.lora import load_adapter

    _, cfg = open_run(run)
    kind, weights = trained_weights(run)
    dtype = pick_dtype(cfg.dtype, device)
    tokenizer = AutoTokenizer.from_pretrained(weights)
    base = load_model(cfg.model, device, dtype, cfg.revision, cfg.trust_remote_code)
    if kind == "adapter":
        return base, load_adapter(base, weights), tokenizer
    return base, load_model(str(weights), device, dtype), tokenizer


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def _git_sha() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def hardware() -> dict:
    import torch

    info = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_count=torch.cuda.device_count(),
                    gpu_memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda)
    return info


def package_version(pkg: str) -> str | None:
    """The installed version of `pkg`, or None when it is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(pkg)
    except PackageNotFoundError:
        return None


def versions() -> dict:
    return {pkg: package_version(pkg)
            for pkg in ("tunery", "torch", "transformers", "peft", "datasets", "tokenizers", "safetensors")}


def manifest(cfg: RunConfig, data_hashes: dict, model_info: dict) -> dict:
    return {"created": dt.datetime.now(dt.timezone.utc).isoformat(), "versions": versions(),
            "data_sha256": data_hashes, "model": model_info, "seed": cfg.seed, "hardware": hardware(),
            "fast_path": cfg.fast_path.to_dict(), "git_sha": _git_sha()}
