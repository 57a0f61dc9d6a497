"""Rows longer than the model's context are refused before the weights load, with the setting that fixes it;
a large max_seq_len alone is not."""

from __future__ import annotations

import json

import pytest

from tunery.config import ConfigError, RunConfig
from tunery.models.tiny import TinySpec, build_tiny_model

pytestmark = pytest.mark.usefixtures("tunery_home")


def test_rows_past_the_context_are_refused_and_max_seq_len_at_the_context_trains(tmp_path):
    from tunery.train import train

    model = build_tiny_model(tmp_path / "model", ["Say it."], TinySpec(hidden_size=32, intermediate_size=64,
                                                                        num_layers=1, num_heads=2, num_kv_heads=1))
    rows = [{"prompt": "Say it.", "completion": "it " * 700}, *[{"prompt": f"Say {i}.", "completion": f"{i}"}
                                                                 for i in range(8)]]
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = RunConfig(model=str(model), data=str(data), output_dir=str(tmp_path / "runs"), max_steps=1, batch_size=2,
                    eval_samples=0, eval_split=0)
    with pytest.raises(ConfigError, match=r"1 rows are longer than .*context of 512 tokens.*--max-seq-len 512"):
        train(cfg.replace(name="long", max_seq_len=4096))
    assert not (tmp_path / "runs" / "long" / "adapter").exists()
    run = train(cfg.replace(name="fits", max_seq_len=512))  # the long row truncated to the context
    assert (run / "adapter").is_dir()
    assert train(cfg.replace(name="short-data", max_seq_len=4096, data=str(_short(tmp_path)))).is_dir()


def _short(tmp_path):
    path = tmp_path / "short.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Say {i}.", "completion": f"{i}"}) + "\n" for i in range(8)))
    return path
