"""GGUF export of tiny Gemma 1/2/3, Phi-3 and LFM2 models, each with its family's chat template and special
tokens, checked against torch through llama.cpp: f16 and q8_0 verified, q4_k_m loads, generates and stops at the
family's end-of-turn token; plus each architecture's quirks in the file (norm offsets, soft-capping, sliding-window
layers, LFM2's convolution layers, Phi-3's LongRoPE).

    HF_HUB_OFFLINE=1 .venv/bin/pytest tests/export/test_gguf_families.py -q -s   # -s prints the numbers
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tunery.export.gguf import quantize, write_gguf
from tunery.export.verify import verify_gguf

from .conftest import SPEC, TRAIN_ROWS, date_rows, prompts, train_briefly
from .test_ollama import GEMMA2_TEMPLATE, GEMMA3_TEMPLATE, LFM2_TEMPLATE, PHI35_TEMPLATE

pytestmark = pytest.mark.slow

TRAIN_STEPS = 100


@dataclass(frozen=True)
class Chat:
    """A family's chat template and the special tokens it writes (eot: where an assistant turn ends)."""

    template: str
    eot: str
    eos: str
    bos: str | None = None
    specials: tuple[str, ...] = ()
    config: dict = field(default_factory=dict)  # config.json values over the tiny shape


_GEMMA_SPECIALS = ("<start_of_turn>", "<end_of_turn>")
_PHI_SPECIALS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
MODELS = {
    "gemma": Chat(GEMMA3_TEMPLATE, "<end_of_turn>", "<eos>", "<bos>", _GEMMA_SPECIALS),
    # a window shorter than the prompts, on the first layer only (Gemma 2 alternates sliding and full layers)
    "gemma2": Chat(GEMMA2_TEMPLATE, "<end_of_turn>", "<eos>", "<bos>", _GEMMA_SPECIALS, {"sliding_window": 12}),
    "gemma3_text": Chat(GEMMA3_TEMPLATE, "<end_of_turn>", "<eos>", "<bos>", _GEMMA_SPECIALS,
                        {"sliding_window": 12, "layer_types": ["sliding_attention", "full_attention"]}),
    "phi3": Chat(PHI35_TEMPLATE, "<|end|>", "<|endoftext|>", None, _PHI_SPECIALS),
    "lfm2": Chat(LFM2_TEMPLATE, "<|im_end|>", "<|im_end|>", "<|startoftext|>", ()),
}


def build_family_model(out: Path, model_type: str, chat: Chat, steps: int = TRAIN_STEPS) -> Path:
    """A tiny model of `model_type` whose tokenizer has the family's specials and template, briefly trained."""
    import torch
    from transformers import AutoModelForCausalLM

    from tunery.models.tiny import TinySpec, corpus_of, make_config, train_tokenizer

    rows = date_rows()[:TRAIN_ROWS]
    tokenizer = train_tokenizer(corpus_of(rows), SPEC["vocab_size"])
    tokenizer.add_special_tokens({"eos_token": chat.eos, **({"bos_token": chat.bos} if chat.bos else {})})
    tokenizer.add_tokens(list(chat.specials), special_tokens=True)
    tokenizer.chat_template = chat.template
    config = make_config(TinySpec(family=model_type, **SPEC), tokenizer)
    for key, value in chat.config.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    train_briefly(out, rows, steps=steps)
    return out


@pytest.fixture(scope="module")
def family_model(tmp_path_factory):
    built: dict[str, Path] = {}

    def make(model_type: str) -> Path:
        if model_type not in built:
            # not named after the family: llama.cpp special-cases a Phi-3 by general.name (the folder name here),
            # and expects tokens of the real Phi-3 vocabulary there
            out = tmp_path_factory.mktemp("family")
            built[model_type] = build_family_model(out, model_type, MODELS[model_type])
        return built[model_type]

    return make


@pytest.fixture(scope="module")
def f16(family_model):
    made: dict[str, Path] = {}

    def make(model_type: str) -> Path:
        if model_type not in made:
            model = family_model(model_type)
            made[model_type] = write_gguf(model, model / "model.f16.gguf", "f16", progress=False)
        return made[model_type]

    return make


def _show(report: dict) -> None:
    keys = ("quant", "tokenization_match", "top1_agreement", "max_abs_logit_diff", "generations_identical",
            "generation_partings", "torch_stopped", "gguf_stopped", "tensor_types")
    print(json.dumps({k: report[k] for k in keys}))


def _fields(path: Path) -> dict:
    from gguf import GGUFReader

    return {k: f.contents() for k, f in GGUFReader(path).fields.items()}


def _eot_id(model_dir: Path, model_type: str) -> int:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir).convert_tokens_to_ids(MODELS[model_type].eot)


@pytest.mark.parametrize("model_type", sorted(MODELS))
def test_f16_matches_torch_and_stops_at_the_end_of_turn(model_type, family_model, f16):
    model = family_model(model_type)
    report = verify_gguf(f16(model_type), model, prompts(20), quant="f16")
    _show(report)
    assert report["tokenization_match"] == 1.0 and report["top1_agreement"] == 1.0
    assert report["generations_matching"] == 1.0
    assert report["torch_stopped"] == report["gguf_stopped"] >= 18
    assert report["max_abs_logit_diff"] < 0.05
    assert report["tensor_types"].keys() == {"F16", "F32"}
    assert _fields(f16(model_type))["tokenizer.ggml.eot_token_id"] == _eot_id(model, model_type)


@pytest.mark.parametrize("model_type", sorted(MODELS))
def test_q8_0_matches_torch(model_type, family_model, tmp_path):
    model = family_model(model_type)
    path = write_gguf(model, tmp_path / "model.q8_0.gguf", "q8_0", progress=False)
    report = verify_gguf(path, model, prompts(20), quant="q8_0")
    _show(report)
    assert report["top1_agreement"] >= 0.95
    assert "Q8_0" in report["tensor_types"] and "F16" not in report["tensor_types"]


@pytest.mark.parametrize("model_type", sorted(MODELS))
def test_q4_k_m_loads_generates_and_stops(model_type, family_model, f16, tmp_path):
    path = quantize(f16(model_type), tmp_path / "model.q4_k_m.gguf", "q4_k_m")
    report = verify_gguf(path, family_model(model_type), prompts(20), quant="q4_k_m")
    _show(report)
    assert report["gguf_stopped"] >= report["torch_stopped"] >= 18
    assert "F16" not in report["tensor_types"]


def _hf_tensor(model_dir: Path, name: str):
    from safetensors import safe_open

    with safe_open(model_dir / "model.safetensors", framework="np") as f:
        return f.get_tensor(name)


def _tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    from gguf import GGUFReader

    return {t.name: tuple(int(x) for x in t.shape) for t in GGUFReader(path).tensors}


def _gguf_tensor(path: Path, name: str):
    from gguf import GGUFReader

    return next(t for t in GGUFReader(path).tensors if t.name == name).data


@pytest.mark.parametrize("model_type", ["gemma", "gemma2", "gemma3_text"])
def test_gemma_norms_are_offset_by_one_and_embeddings_tied(model_type, family_model, f16):
    import numpy as np

    model, path = family_model(model_type), f16(model_type)
    hf = _hf_tensor(model, "model.layers.0.input_layernorm.weight")
    np.testing.assert_allclose(_gguf_tensor(path, "blk.0.attn_norm.weight"), hf + 1.0, rtol=1e-6)
    assert "output.weight" not in _tensor_shapes(path)  # llama.cpp ties the output projection to token_embd


def test_gemma2_soft_capping_and_sliding_layers(f16):
    fields = _fields(f16("gemma2"))
    assert fields["gemma2.attn_logit_softcapping"] == 50.0 and fields["gemma2.final_logit_softcapping"] == 30.0
    assert fields["gemma2.attention.sliding_window"] == 12
    assert fields["gemma2.attention.sliding_window_pattern"] == [True, False]


def test_gemma3_sliding_layers_and_their_rope_base(f16):
    fields = _fields(f16("gemma3_text"))
    assert fields["gemma3.attention.sliding_window"] == 12
    assert fields["gemma3.attention.sliding_window_pattern"] == [True, False]
    assert fields["gemma3.rope.freq_base"] == 1000000.0 and fields["gemma3.rope.freq_base_swa"] == 10000.0
    assert "gemma3.attn_logit_softcapping" not in fields


def test_lfm2_convolution_layers(family_model, f16):
    import numpy as np

    fields, path = _fields(f16("lfm2")), f16("lfm2")
    assert fields["lfm2.shortconv.l_cache"] == 3
    assert fields["lfm2.attention.head_count_kv"] == [0, 2]  # layer 0 convolves, layer 1 attends
    conv = _hf_tensor(family_model("lfm2"), "model.layers.0.conv.conv.weight")  # (channels, 1, kernel)
    np.testing.assert_array_equal(_gguf_tensor(path, "blk.0.shortconv.conv.weight"), conv[:, 0, :])


def test_phi3_fused_projections(f16):
    shapes = _tensor_shapes(f16("phi3"))
    hidden, ff = SPEC["hidden_size"], SPEC["intermediate_size"]
    assert shapes["blk.0.attn_qkv.weight"] == (hidden, hidden + 2 * 2 * 16)  # q + k + v rows (2 kv heads of 16)
    assert shapes["blk.0.ffn_up.weight"] == (hidden, 2 * ff)  # gate and up, as one
    assert _fields(f16("phi3"))["phi3.feed_forward_length"] == ff


def test_phi3_longrope_matches_torch(family_model, tmp_path):
    """Phi-3.5's LongRoPE: the per-frequency factors as tensors and the attention factor as metadata."""
    import numpy as np

    model = tmp_path / "longrope"
    shutil.copytree(family_model("phi3"), model, ignore=shutil.ignore_patterns("*.gguf"))
    config = json.loads((model / "config.json").read_text())
    half = 8  # head_dim 16
    # llama.cpp picks the long factors for a context over the original one (it rounds a context up to 256), HF
    # for a sequence over it: the verification's short prompts use the short factors on both sides
    config.update(max_position_embeddings=2048, original_max_position_embeddings=512, rope_parameters={
        "rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 1.0,
        "short_factor": [1.0 + 0.1 * i for i in range(half)], "long_factor": [1.0 + 2.0 * i for i in range(half)]})
    (model / "config.json").write_text(json.dumps(config))
    path = write_gguf(model, tmp_path / "model.f16.gguf", progress=False)
    fields = _fields(path)
    assert fields["phi3.rope.scaling.original_context_length"] == 512
    assert fields["phi3.rope.scaling.attn_factor"] == pytest.approx(np.sqrt(1 + np.log(4) / np.log(512)))
    np.testing.assert_allclose(_gguf_tensor(path, "rope_factors_short.weight"), [1.0 + 0.1 * i for i in range(half)],
                               rtol=1e-6)
    report = verify_gguf(path, model, prompts(20), quant="f16")
    _show(report)
    assert report["top1_agreement"] == 1.0 and report["generations_matching"] == 1.0
