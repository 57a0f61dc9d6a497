"""A model folder's hash in the manifest: computed once per folder state, again after any file changes."""

from __future__ import annotations

import hashlib

from tunery.models import load


def _folder(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "model.safetensors").write_bytes(b"\0" * 4096)
    (folder / "notes.txt").write_text("not hashed")
    return folder


def test_the_hash_is_kept_until_a_file_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNERY_HOME", str(tmp_path / "home"))
    folder = _folder(tmp_path)
    reads = []
    real = load.sha256_files
    monkeypatch.setattr(load, "sha256_files", lambda files: reads.append(1) or real(files))
    first = load.model_fingerprint(str(folder))
    expected = hashlib.sha256(b"config.json" + (folder / "config.json").read_bytes() + b"model.safetensors"
                              + b"\0" * 4096).hexdigest()
    assert first == {"model": str(folder.resolve()), "folder_sha256": expected} and len(reads) == 1
    assert load.model_fingerprint(str(folder)) == first and len(reads) == 1  # kept: no file read again
    (folder / "model.safetensors").write_bytes(b"\1" * 4096)  # same size, written since
    changed = load.model_fingerprint(str(folder))
    assert len(reads) == 2 and changed["folder_sha256"] != expected
    assert changed["folder_sha256"] == hashlib.sha256(b"config.json" + (folder / "config.json").read_bytes()
                                                      + b"model.safetensors" + b"\1" * 4096).hexdigest()
    assert load.model_fingerprint("org/name", "abc") == {"model": "org/name", "revision": "abc"}  # a Hub id


def test_background_returns_the_value_or_raises_the_error():
    import pytest

    from tunery.train.loop import Background

    assert Background(lambda a, b: a + b, 2, 3).result() == 5

    def fails():
        raise ValueError("no such model")

    with pytest.raises(ValueError, match="no such model"):
        Background(fails).result()
