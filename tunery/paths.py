"""Where tunery keeps its own files: `TUNERY_HOME` (default ~/.tunery)."""

from __future__ import annotations

import os
from pathlib import Path


def tunery_home() -> Path:
    return Path(os.environ.get("TUNERY_HOME", Path.home() / ".tunery")).expanduser()


def cache_dir(kind: str) -> Path:
    path = tunery_home() / "cache" / kind
    path.mkdir(parents=True, exist_ok=True)
    return path
