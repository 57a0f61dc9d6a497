"""What the fine-tune form offers to pick from: models (the catalogue, local model folders, those used before),
backends and flavors."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tunery.jobs.flavors import flavors, money
from tunery.jobs.store import Job
from tunery.jobs.submit import BACKENDS, model_size_b
from tunery.models.catalog import KNOWN_MODELS
from tunery.server.web import params


@dataclass(frozen=True)
class Choice:
    value: str
    label: str
    group: str


def model_choices(model_dirs: tuple[Path, ...], jobs: list[Job]) -> list[Choice]:
    """Local model folders first (what works offline), then the catalogue with size, licence and base/instruct."""
    local = []
    for folder in _local_models(model_dirs, jobs):
        size = params(model_size_b(str(folder)))
        local.append(Choice(str(folder), f"{folder.name} · local folder · ~{size} parameters", "Local folders"))
    catalogue = [Choice(m.hub_id, f"{m.hub_id} · {m.params_b:g}B · {m.license} · "
                                  f"{'instruct' if m.instruct else 'base'}", "Catalogue (Hugging Face Hub)")
                 for m in KNOWN_MODELS]
    return local + catalogue


def grouped(choices: list[Choice]) -> list[tuple[str, list[Choice]]]:
    """Choices by group, in the order they come (Jinja's groupby would sort the groups)."""
    groups: dict[str, list[Choice]] = {}
    for c in choices:
        groups.setdefault(c.group, []).append(c)
    return list(groups.items())


def _local_models(model_dirs: tuple[Path, ...], jobs: list[Job]) -> list[Path]:
    found: dict[Path, None] = {}
    for root in model_dirs:
        if root.is_dir():
            found.update((p, None) for p in sorted(root.iterdir()) if (p / "config.json").is_file())
    for job in jobs:  # folders trained before, still there
        path = Path(job.model)
        if path.is_absolute() and (path / "config.json").is_file():
            found.setdefault(path, None)
    return list(found)


def flavor_choices() -> list[Choice]:
    out = []
    for f in flavors().values():
        hardware = f"{f.gpus} x {f.gpu} {f.gpu_memory_gb // max(f.gpus, 1)} GB" if f.gpus else "CPU"
        label = "local · this machine, no charge" if f.name == "local" else \
            f"{f.name} · {hardware} · {money(f.usd_per_hour)}/h"
        out.append(Choice(f.name, label, "flavor"))
    return out


def backend_choices() -> list[Choice]:
    words = {"local": "local · the queue on this machine", "ray": "ray · a Ray cluster (Jobs API)",
             "hf-jobs": "hf-jobs · Hugging Face Jobs"}
    return [Choice(b, words.get(b, b), "backend") for b in BACKENDS]
