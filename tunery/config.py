"""RunConfig: the one typed source of a run's settings.

The CLI flags of `tunery train`, the YAML file (`--config run.yaml`) and the `config.yaml` written into the
run folder are all generated from the dataclass below, so they cannot drift apart. The fast path's switches and
tuning are one nested field, `fast_path` (kernels/options.FastPathOptions): `fast_path: {compile: false}` in YAML,
`--no-fast-compile` on the command line.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from tunery.errors import TuneryError
from tunery.kernels.options import FastPathOptions


class ConfigError(TuneryError):
    """A setting is missing, unknown or has a bad value; the message names the field."""


# the fields of tunery's data layouts that `columns` may map a file's own column names onto (data/formats.py)
COLUMN_FIELDS = ("prompt", "completion", "instruction", "input", "output", "system", "reasoning", "text",
                 "messages", "conversations")


def column_pairs(columns: list[str]) -> list[tuple[str, str]]:
    """(field, column) of each FIELD=COLUMN entry of `columns`; a ConfigError for any other entry."""
    pairs = []
    for entry in columns:
        field, sep, column = (part.strip() for part in entry.partition("="))
        if not sep or not column or field not in COLUMN_FIELDS:
            raise ConfigError(f"columns entries are FIELD=COLUMN with FIELD one of {', '.join(COLUMN_FIELDS)}; "
                              f"not {entry!r}")
        pairs.append((field, column))
    return pairs


def _f(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class RunConfig:
    """Everything a training run needs. Field docs are the CLI help."""

    model: str | None = _f(None, "Hub id (Qwen/Qwen2.5-0.5B-Instruct) or local model folder.")
    data: str | None = _f(None, "Training data: .json/.jsonl/.csv/.xlsx/.parquet, a saved datasets folder, or a Hub "
                          "dataset: org/name[@revision][:subset][:split] (split train by default).")
    eval_data: str | None = _f(None, "Separate held-out file; when unset, eval_split of data is held out.")
    sheet: str | None = _f(None, "Excel sheet to read (required when a workbook has several).")
    columns: list[str] = _f([], "Your column names for tunery's, as FIELD=COLUMN (prompt=Question,completion=Response,"
                                "reasoning=Complex_CoT); fields: " + ", ".join(COLUMN_FIELDS) + ". In YAML also a "
                                "mapping.")
    allow_data_issues: bool = _f(False, "Train even when most rows are rejected, most answers are cut by "
                                        "max_seq_len, or many held-out rows are also training rows.")
    json_values: bool = _f(False, "Train cells that are not text (numbers, true/false, lists, objects) as their JSON "
                                  "text; by default such a row is rejected and named.")
    eval_split: float = _f(0.1, "Fraction of data held out for evaluation when eval_data is unset (0 = none).")
    output_dir: str = _f("runs", "Folder that holds run folders.")
    name: str | None = _f(None, "Run folder name; default: <model name>-<date>-<time>.")
    method: Literal["lora", "qlora", "full"] = _f(
        "lora", "lora: train adapters (PEFT) on a 16-bit base; qlora: adapters on a 4-bit NF4 base (bitsandbytes, "
        "`pip install 'tunery[qlora]'`); full: train every weight.")
    lora_r: int = _f(16, "LoRA rank.")
    lora_alpha: int = _f(32, "LoRA alpha (scale = alpha / r).")
    lora_dropout: float = _f(0.0, "Dropout on the LoRA input (0: each micro-batch shape can run as one CUDA graph).")
    lora_targets: list[str] = _f([], "Module names to adapt; empty = the model family's default (all linear).")
    max_seq_len: int = _f(2048, "Longer examples are truncated (and counted).")
    train_on: Literal["assistant", "all"] = _f("assistant", "Which tokens carry loss: assistant replies or all.")
    system_prompt: str | None = _f(None, "System message prepended to conversations that have none.")
    prompt_template: str | None = _f(None, "A prompt layout for a base model instead of its chat template, "
                                     "e.g. '### Question:\\n{prompt}\\n\\n### Response:\\n{completion}' "
                                     "({system} optional).")
    epochs: float = _f(1.0, "Passes over the training data (ignored when max_steps is set).")
    max_steps: int | None = _f(None, "Optimizer steps; overrides epochs.")
    batch_size: int = _f(4, "Examples per micro-batch.")
    grad_accum: int = _f(1, "Micro-batches per optimizer step.")
    micro_batch_tokens: int | None = _f(None, "Cut each optimizer step's batch_size x grad_accum examples into "
                                           "micro-batches of about this many tokens instead of batch_size examples "
                                           "each (0 = off): short examples go many at a time, long ones few, and "
                                           "lengths come from a fixed ladder, so few batch shapes (compiles, CUDA "
                                           "graphs) cover a run of varied lengths. The step and its loss are the "
                                           "same; one process only. Default: max(max_seq_len, 4096) on CUDA with "
                                           "the fast path, else off.")
    lr: float = _f(2e-4, "Peak learning rate.")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    optimizer: Literal["adamw", "adamw_8bit"] = _f(
        "adamw", "adamw: torch's AdamW, its two moments in fp32; adamw_8bit: bitsandbytes' 8-bit AdamW (Unsloth's "
        "notebooks' choice), the moments stored in 8 bits blockwise, 6 bytes less a trained parameter "
        "(`pip install 'tunery[qlora]'`).")
    warmup_ratio: float = _f(0.03, "Fraction of steps spent warming the learning rate up from 0.")
    scheduler: Literal["cosine", "linear", "constant"] = _f("cosine", "Learning-rate decay after warmup.")
    max_grad_norm: float = _f(1.0, "Gradient clipping norm (0 = off).")
    eval_every: int = _f(0, "Held-out loss every N steps (0 = only at the end).")
    eval_max_rows: int = _f(500, "Held-out rows the training's eval loss reads at most (a seeded sample; 0 = all).")
    save_every: int = _f(100, "Checkpoint every N steps (0 = only at the end).")
    keep_checkpoints: int = _f(2, "How many recent checkpoints to keep.")
    log_every: int = _f(1, "Write a metrics.jsonl line every N steps.")
    report_to: list[str] = _f([], "Also send metrics to these trackers when installed: trackio, tensorboard, wandb.")
    seed: int = _f(42, "Seed for data order, splits, initialisation and dropout.")
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = _f(
        "auto", "Weights dtype; auto = bf16 on GPUs that support it, else fp32.")
    device: Literal["auto", "cpu", "cuda"] = _f("auto", "Where to train; auto = cuda when available.")
    gpus: int = _f(1, "Data-parallel processes (torchrun + DDP): one per GPU; on CPU, gloo processes.")
    fast: bool = _f(True, "Use tunery's fused kernels where the family has them (CUDA); --no-fast forces "
                          "the plain reference path.")
    packing: bool | None = _f(None, "Pack micro-batches into padding-free rows; attention and loss stay within each "
                                    "example (varlen flash attention on CUDA, a per-example mask elsewhere). Default: "
                                    "on with the fast path on CUDA where the model can pack and varlen "
                                    "attention serves it (LFM2 packs with --packing, its convolutions bounded at "
                                    "each example; not yet by default), else off.")
    fast_path: FastPathOptions = field(
        default_factory=FastPathOptions, metadata={"help": "The fast path's pieces and tuning (each is a --fast-<name> "
                                                           "flag; in YAML a mapping)."})
    gradient_checkpointing: bool = _f(False, "Recompute activations in backward to save memory (on CUDA with the "
                                      "fast path, block inputs wait in pinned CPU memory).")
    revision: str | None = _f(None, "Hub revision (branch, tag or commit) of the model.")
    trust_remote_code: bool = _f(False, "Allow model code from the Hub repo (only for repos you trust).")
    eval_samples: int = _f(64, "Held-out prompts generated by `tunery eval` (0 = all).")
    max_new_tokens: int = _f(128, "Generation length limit in eval and chat.")

    @classmethod
    def field_specs(cls) -> list[dataclasses.Field]:
        return list(dataclasses.fields(cls))

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> RunConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown setting(s) {', '.join(unknown)}; known settings: "
                              f"{', '.join(sorted(known))}")
        if isinstance(values.get("columns"), dict):  # YAML's natural spelling: {prompt: Question, ...}
            values = {**values, "columns": [f"{k}={v}" for k, v in values["columns"].items()]}
        if "fast_path" in values and not isinstance(values["fast_path"], FastPathOptions):
            try:
                values = {**values, "fast_path": FastPathOptions.from_dict(values["fast_path"] or {})}
            except (TypeError, ValueError) as e:
                raise ConfigError(f"{source}: {e}") from None
        cfg = cls(**values)
        cfg.validate()
        return cfg

    @classmethod
    def from_yaml(cls, path: str | Path) -> RunConfig:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {e}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{path} must hold a mapping of settings, not {type(values).__name__}")
        return cls.from_dict(values, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    def replace(self, **changes: Any) -> RunConfig:
        merged = {**self.to_dict(), **{k: v for k, v in changes.items() if v is not None}}
        if isinstance(changes.get("fast_path"), dict):  # only the options given change
            merged["fast_path"] = {**self.fast_path.to_dict(), **changes["fast_path"]}
        return RunConfig.from_dict(merged, source="options")

    def validate(self) -> None:
        """Check types and ranges; every message names the field."""
        hints = typing.get_type_hints(RunConfig)
        for f in dataclasses.fields(self):
            if f.name != "fast_path":
                setattr(self, f.name, _coerce(f.name, getattr(self, f.name), hints[f.name]))
        fast_hints = typing.get_type_hints(FastPathOptions)
        for f in dataclasses.fields(FastPathOptions):  # every number among them is a count, size or share
            name, hint = f"fast_path.{f.name}", fast_hints[f.name]
            setattr(self.fast_path, f.name, _coerce(name, getattr(self.fast_path, f.name), hint))
            _check(hint not in (int, float) or getattr(self.fast_path, f.name) >= 0, name, "must be 0 or more")
        column_pairs(self.columns)
        for f in dataclasses.fields(self):  # `inf` and `nan` read as numbers, and train NaN
            value = getattr(self, f.name)
            _check(not isinstance(value, float) or math.isfinite(value), f.name, "must be a finite number")
        _check(0 <= self.eval_split < 1, "eval_split", "must be in [0, 1)")
        for name in ("lora_r", "lora_alpha", "max_seq_len", "batch_size", "grad_accum", "log_every", "gpus",
                     "max_new_tokens"):
            _check(getattr(self, name) > 0, name, "must be positive")
        _check(self.micro_batch_tokens is None or self.micro_batch_tokens >= 0, "micro_batch_tokens",
               "must be 0 or more")
        for name in ("eval_every", "save_every", "keep_checkpoints", "eval_samples", "eval_max_rows"):
            _check(getattr(self, name) >= 0, name, "must be 0 or more")
        _check(self.max_steps is None or self.max_steps > 0, "max_steps", "must be positive")
        _check(self.epochs > 0, "epochs", "must be positive")
        _check(not (self.micro_batch_tokens and self.gpus > 1), "micro_batch_tokens",
               "cuts micro-batches by tokens in one process only (ranks would run different numbers of them); "
               "set it to 0 with gpus > 1")
        _check(self.lr > 0, "lr", "must be positive")

        _check(0 <= self.lora_dropout < 1, "lora_dropout", "must be in [0, 1)")
        _check(0 <= self.warmup_ratio < 1, "warmup_ratio", "must be in [0, 1)")

    def with_absolute_paths(self, base: Path) -> RunConfig:
        """Data, eval data, output folder and a local model folder as absolute paths (relative ones read from
        `base`), so the run's config.yaml means the same from any working directory."""
        from tunery.data.load import hub_dataset

        changes = {name: str((base / getattr(self, name)).expanduser().resolve())
                   for name in ("data", "eval_data", "output_dir")
                   if getattr(self, name) and not (name != "output_dir" and hub_dataset(getattr(self, name)))}
        local_model = (base / self.model).expanduser() if self.model else None
        if local_model is not None and local_model.exists():
            changes["model"] = str(local_model.resolve())
        return self.replace(**changes)

    def bitsandbytes_settings(self) -> list[tuple[str, str]]:
        """The settings of this run that need bitsandbytes (the `qlora` extra), each with the setting to use
        instead: a 4-bit base (`method qlora`) and the 8-bit optimizer. Training refuses them when it is missing;
        an hf-jobs script installs it for them."""
        return [(setting, instead) for setting, instead, on in [
            ("method qlora", "method lora", self.method == "qlora"),
            ("optimizer adamw_8bit", "optimizer adamw", self.optimizer == "adamw_8bit")] if on]

    def require(self, *names: str) -> None:
        for name in names:
            if getattr(self, name) in (None, ""):
                raise ConfigError(f"{name} is required: pass --{name.replace('_', '-')} or set it in the config file")


def _check(ok: bool, name: str, what: str) -> None:
    if not ok:
        raise ConfigError(f"{name} {what}")


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """Accept YAML/CLI spellings (ints for floats, strings of numbers) and reject wrong types by name."""
    args = typing.get_args(hint)
    origin = typing.get_origin(hint)
    if value is None:
        if type(None) in args:
            return None
        raise ConfigError(f"{name} must not be empty")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{name} must be one of {', '.join(map(str, args))}, not {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return _coerce(name, value, inner[0])
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{name} must be a list of strings")
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{name} must be true or false, not {value!r}")
    if hint in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{name} must be a number, not {value!r}")
        try:
            number = hint(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name} must be a number, not {value!r}") from None
        if hint is int and float(value) != number:
            raise ConfigError(f"{name} must be a whole number, not {value!r}")
        return number
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name} must be text, not {value!r}")
        return value
    return value
