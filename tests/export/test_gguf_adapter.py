"""`tunery export RUN --gguf-adapter`: a LoRA run's adapter alone as a llama.cpp LoRA GGUF over the base model's
f16 GGUF, loaded together in llama.cpp and compared with the torch adapter model; the merged-then-exported GGUF
agrees with that same torch adapter model; the Modelfile says FROM the base and ADAPTER the adapter.

    HF_HUB_OFFLINE=1 .venv/bin/pytest tests/export/test_gguf_adapter.py -q -s
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tunery.errors import ExportError
from tunery.export.gguf_adapter import write_adapter_gguf
from tunery.export.verify import verify_gguf

from .conftest import SPEC, TRAIN_ROWS, date_rows, prompts

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", params=["llama", "qwen2"])  # q/k rows reordered for llama.cpp, and not
def exported(request, tmp_path_factory):
    """A LoRA run on a tiny base, exported with --gguf f16 --gguf-adapter --ollama."""
    from tunery.config import RunConfig
    from tunery.export.pipeline import export_run
    from tunery.models.tiny import TinySpec, build_tiny_model, corpus_of
    from tunery.train import train

    root = tmp_path_factory.mktemp(f"adapter-{request.param}")
    rows = date_rows()[:TRAIN_ROWS]
    data = root / "dates.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = build_tiny_model(root / "base", corpus_of(rows), TinySpec(family=request.param, **SPEC))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TUNERY_HOME", str(root / "home"))
        run = train(RunConfig(model=str(base), data=str(data), output_dir=str(root / "runs"), name="dates",
                              max_steps=80, batch_size=8, lr=3e-3, max_seq_len=64, eval_samples=0, save_every=0,
                              lora_r=16, lora_alpha=32))
        result = export_run(run, gguf=["f16"], gguf_adapter=True, ollama="dates")
    return {"run": Path(run), "base": base, **result}


def _show(report: dict) -> None:
    keys = ("tokenization_match", "top1_agreement", "max_abs_logit_diff", "generations_identical", "torch_stopped",
            "gguf_stopped")
    print(json.dumps({k: report[k] for k in keys}))


def test_adapter_over_the_base_gguf_matches_the_torch_adapter_model(exported):
    files = exported["gguf_adapter"]
    report = verify_gguf(files["base"], exported["base"], prompts(20), quant="f16",
                         torch_adapter=exported["run"] / "adapter", gguf_adapter=files["adapter"])
    _show(report)
    assert report["tokenization_match"] == 1.0 and report["top1_agreement"] == 1.0
    assert report["generations_matching"] == 1.0
    assert report["torch_stopped"] == report["gguf_stopped"] >= 10  # the adapter taught the base to end its turn
    # without the adapter, the base GGUF is the untrained base: the adapter is what makes the difference
    with pytest.raises(ExportError, match="top-1 agreement"):
        verify_gguf(files["base"], exported["base"], prompts(20), quant="f16",
                    torch_adapter=exported["run"] / "adapter")


def test_the_merged_export_matches_the_torch_adapter_model(exported):
    report = verify_gguf(exported["gguf"]["f16"], exported["base"], prompts(20), quant="f16",
                         torch_adapter=exported["run"] / "adapter")
    _show(report)
    assert report["top1_agreement"] == 1.0 and report["generations_matching"] == 1.0


def test_the_adapter_file(exported):
    from gguf import GGUFReader

    path = exported["gguf_adapter"]["adapter"]
    reader = GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items()}
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["adapter.lora.alpha"] == 32.0
    shapes = {t.name: tuple(int(x) for x in reversed(t.shape)) for t in reader.tensors}  # PyTorch order
    assert shapes["blk.0.attn_q.weight.lora_a"] == (16, SPEC["hidden_size"])  # (rank, in)
    assert shapes["blk.1.ffn_down.weight.lora_b"] == (SPEC["hidden_size"], 16)  # (out, rank)
    assert len(shapes) == 2 * 7 * 2  # A and B of 7 projections in 2 layers
    assert path.stat().st_size < exported["gguf_adapter"]["base"].stat().st_size / 2


def test_the_modelfile_loads_the_adapter_over_the_base(exported):
    text = (exported["run"] / "export" / "Modelfile.adapter").read_text()  # Modelfile: the merged GGUF
    assert f"\nFROM ./{exported['gguf_adapter']['base'].name}\n" in text
    assert f"\nADAPTER ./{exported['gguf_adapter']['adapter'].name}\n" in text


def test_what_a_lora_gguf_cannot_hold_is_refused(exported, tmp_path):
    from safetensors.torch import load_file, save_file

    adapter = tmp_path / "adapter"
    shutil.copytree(exported["run"] / "adapter", adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(ExportError, match="DoRA"):
        write_adapter_gguf(adapter, exported["base"], tmp_path / "a.gguf", progress=False)
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    weights = load_file(adapter / "adapter_model.safetensors")
    some = next(iter(weights.values())).clone()
    save_file({**weights, "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta": some},
              adapter / "adapter_model.safetensors")
    with pytest.raises(ExportError, match="trained embedding rows"):
        write_adapter_gguf(adapter, exported["base"], tmp_path / "a.gguf", progress=False)
    assert not (tmp_path / "a.gguf").exists()
    shutil.rmtree(adapter)
    adapter.mkdir()
    with pytest.raises(ExportError, match="trained the full model"):
        write_adapter_gguf(adapter, exported["base"], tmp_path / "a.gguf", progress=False)


def test_the_hub_plan_carries_the_adapter_ggufs(exported, capsys):
    from tunery.export.pipeline import export_run

    export_run(exported["run"], gguf_adapter=True, push_to_hub="someone/dates", dry_run=True, score=False,
               out=exported["run"] / "export-again")
    plan = capsys.readouterr().out
    assert f"{exported['run'].name}-adapter-f16.gguf" in plan and f"{exported['run'].name}-base-f16.gguf" in plan


def test_export_scores_the_adapter_over_the_base_beside_torch(exported):
    rows = exported["scores"]["rows"]
    name = exported["run"].name
    pair, merged = rows[f"{name}-adapter-f16.gguf over {name}-base-f16.gguf"], rows[f"{name}-f16.gguf"]
    assert pair["identical_to_torch"] >= 0.9 and merged["identical_to_torch"] >= 0.9
    assert pair["exact_match"] == rows["torch"]["exact_match"]
    assert abs(pair["loss"] - rows["torch"]["loss"]) < 0.01
