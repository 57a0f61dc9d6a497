"""Fixtures shared by the unit tests: offline Hub, a tokenizer trained on test text, a private TUNERY_HOME."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"

# Every word the unit tests render, so the tiny tokenizer has merges for them (unknown text still encodes
# byte by byte; the corpus only keeps sequences short).
TOKENIZER_CORPUS = [
    "system\n", "user\n", "assistant\n",
    "You are terse.", "Name a colour.", "Blue.", "Another one?", "Green, like grass.",
    "Rewrite this date as YYYY-MM-DD: June 3, 1985", "1985-06-03",
    "What is the capital of France?", "Paris is the capital of France.",
    "The quick brown fox jumps over the lazy dog.",
]


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A byte-level BPE tokenizer with the ChatML template, trained once per session; do not mutate it."""
    from tunery.models.tiny import train_tokenizer

    return train_tokenizer(TOKENIZER_CORPUS)


@pytest.fixture
def tunery_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """TUNERY_HOME (caches) in a fresh temporary folder."""
    home = tmp_path / "tunery-home"
    monkeypatch.setenv("TUNERY_HOME", str(home))
    return home

