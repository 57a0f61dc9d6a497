"""Optional experiment trackers (`report_to`): trackio, tensorboard, wandb. None is required."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from tunery.errors import TuneryError

_PACKAGES = {"trackio": "trackio", "tensorboard": "tensorboard", "wandb": "wandb"}


class Reporters:
    """Forwards each logged metrics record to the trackers named in `report_to`."""

    def __init__(self, names: list[str], run: Path, project: str, config: dict):
        self._log, self._close = [], []
        for name in names:
            if name not in _PACKAGES:
                raise TuneryError(f"report_to: unknown tracker {name!r}; choose from {', '.join(_PACKAGES)}")
            if importlib.util.find_spec(_PACKAGES[name]) is None:
                raise TuneryError(f"report_to: {name} is not installed (pip install {_PACKAGES[name]})")
            getattr(self, f"_open_{name}")(run, project, config)

    def _open_trackio(self, run: Path, project: str, config: dict) -> None:
        import trackio

        trackio.init(project=project, name=run.name, config=config)
        self._log.append(lambda rec, step: trackio.log(rec, step=step))
        self._close.append(trackio.finish)

    def _open_tensorboard(self, run: Path, project: str, config: dict) -> None:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(log_dir=str(run / "tensorboard"))

        def log(rec: dict, step: int) -> None:
            for key, value in rec.items():
                writer.add_scalar(key, value, step)

        self._log.append(log)
        self._close.append(writer.close)

    def _open_wandb(self, run: Path, project: str, config: dict) -> None:
        import wandb

        handle = wandb.init(project=project, name=run.name, config=config, dir=str(run))
        self._log.append(lambda rec, step: handle.log(rec, step=step))
        self._close.append(handle.finish)

    def log(self, record: dict) -> None:
        numbers = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        for fn in self._log:
            fn(numbers, record["step"])

    def close(self) -> None:
        for fn in self._close:
            fn()
