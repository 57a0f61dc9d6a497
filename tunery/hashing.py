"""Content hashes for data files and model folders (what a manifest records to make a run reproducible)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path


def sha256_files(files: Iterable[tuple[str, Path]]) -> str:
    """sha256 over (name, bytes) of each file in the given order; name "" hashes the bytes alone."""
    digest = hashlib.sha256()
    for name, file in files:
        digest.update(name.encode())
        with open(file, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def sha256_json(value) -> str:
    """sha256 of a JSON-able value, keys sorted (anything else written as its str)."""
    import json

    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()
