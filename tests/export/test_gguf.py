"""GGUF export of tiny Llama and Qwen2 models (plus Qwen3, Mistral, RoPE scalings), checked against torch through
llama.cpp. Needs the gguf extra (gguf, llama-cpp-python); without it the tests fail and say how to install it.

    HF_HUB_OFFLINE=1 .venv/bin/pytest tests/export/test_gguf.py -q -s   # -s prints the numbers
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tunery.errors import ExportError
from tunery.export.gguf import FAMILIES, pre_tokenizer_name, quantize, tensor_types, write_gguf
from tunery.export.verify import verify_gguf
from tunery.models.tiny import TinySpec, build_tiny_model, corpus_of

from .conftest import SPEC, TRAIN_ROWS, date_rows, prompts

pytestmark = pytest.mark.slow

FAMILY_NAMES = ["llama", "qwen2"]


def _show(report: dict) -> None:
    """The numbers, visible with `pytest -s` (and in the failure output)."""
    keys = ("quant", "tokenization_match", "top1_agreement", "top1_agreement_all_positions", "max_abs_logit_diff",
            "max_abs_logit", "generations_identical", "generation_partings", "torch_stopped", "gguf_stopped",
            "tensor_types")
    print(json.dumps({k: report[k] for k in keys}))


@pytest.fixture(scope="module")
def f16_gguf(tiny_model, tmp_path_factory):
    made: dict[str, Path] = {}

    def make(family: str) -> Path:
        if family not in made:
            out = tmp_path_factory.mktemp(f"gguf-{family}") / "model.f16.gguf"
            made[family] = write_gguf(tiny_model(family), out, "f16", progress=False)
        return made[family]

    return make


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_f16_matches_torch(family, tiny_model, f16_gguf):
    report = verify_gguf(f16_gguf(family), tiny_model(family), prompts(20), quant="f16")
    _show(report)
    assert report["prompts"] == 20
    assert report["tokenization_match"] == 1.0
    assert report["top1_agreement"] == 1.0
    assert report["generations_matching"] == 1.0
    assert report["torch_stopped"] == report["gguf_stopped"] >= 18  # the trained model ends its turns
    assert report["max_abs_logit_diff"] < 0.05  # f16 weights (and f16 activations in llama.cpp) vs f32 torch
    assert report["tensor_types"].keys() == {"F16", "F32"}


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_metadata(family, tiny_model, f16_gguf):
    from gguf import GGUFReader
    from transformers import AutoConfig, AutoTokenizer

    model_dir = tiny_model(family)
    config, tokenizer = AutoConfig.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)
    fields = {k: f.contents() for k, f in GGUFReader(f16_gguf(family)).fields.items()}
    arch = fields["general.architecture"]
    assert arch == family
    assert fields[f"{arch}.context_length"] == 512 and fields[f"{arch}.embedding_length"] == 64
    assert fields[f"{arch}.block_count"] == 2 and fields[f"{arch}.feed_forward_length"] == 192
    assert fields[f"{arch}.attention.head_count"] == 4 and fields[f"{arch}.attention.head_count_kv"] == 2
    assert fields[f"{arch}.rope.freq_base"] == 10000.0 and fields[f"{arch}.rope.dimension_count"] == 16
    assert fields[f"{arch}.attention.layer_norm_rms_epsilon"] == pytest.approx(config.rms_norm_eps)
    assert fields[f"{arch}.vocab_size"] == config.vocab_size == len(fields["tokenizer.ggml.tokens"])
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "starcoder"
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert fields["tokenizer.ggml.eos_token_id"] == fields["tokenizer.ggml.eot_token_id"] == im_end
    assert fields["tokenizer.ggml.padding_token_id"] == tokenizer.pad_token_id
    assert "tokenizer.ggml.bos_token_id" not in fields and fields["tokenizer.ggml.add_bos_token"] is False
    assert fields["tokenizer.ggml.token_type"][:3] == [3, 3, 3]  # the ChatML specials are control tokens
    assert set(fields["tokenizer.ggml.token_type"][3:]) == {1}
    assert len(fields["tokenizer.ggml.merges"]) > 50
    assert fields["tokenizer.chat_template"] == tokenizer.chat_template
    assert ("output.weight" in {t.name for t in GGUFReader(f16_gguf(family)).tensors}) == (family == "llama")


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_q8_0_matches_torch(family, tiny_model, tmp_path):
    gguf_path = write_gguf(tiny_model(family), tmp_path / "model.q8_0.gguf", "q8_0", progress=False)
    report = verify_gguf(gguf_path, tiny_model(family), prompts(20), quant="q8_0")
    _show(report)
    assert report["top1_agreement"] >= 0.95
    assert report["tensor_types"].keys() == {"Q8_0", "F32"}


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_q4_k_m_loads_generates_and_stops(family, tiny_model, f16_gguf, tmp_path):
    gguf_path = quantize(f16_gguf(family), tmp_path / "model.q4_k_m.gguf", "q4_k_m")
    report = verify_gguf(gguf_path, tiny_model(family), prompts(20), quant="q4_k_m")
    _show(report)
    assert report["gguf_stopped"] >= report["torch_stopped"] >= 18
    # 64/192-wide rows do not fit q4_K's 256-wide blocks: llama.cpp stores them as q5_0 / q8_0 instead
    assert set(report["tensor_types"]) <= {"F32", "Q5_0", "Q8_0", "Q4_K", "Q6_K"}
    assert "F16" not in report["tensor_types"]


@pytest.mark.parametrize("name", ["qwen3", "mistral", "llama-rope-llama3", "llama-rope-linear"])
def test_more_families_and_rope_scalings_match_torch(name, tiny_model, tmp_path):
    gguf_path = write_gguf(tiny_model(name), tmp_path / "model.f16.gguf", "f16", progress=False)
    report = verify_gguf(gguf_path, tiny_model(name), prompts(20), quant="f16")
    _show(report)
    assert report["top1_agreement"] == 1.0 and report["generations_matching"] == 1.0
    assert report["max_abs_logit_diff"] < 0.05


def _cli(*args: str, home: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TUNERY_HOME": str(home)}
    proc = subprocess.run([sys.executable, "-m", "tunery.cli.app", *args], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, f"tunery {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"


def test_lora_run_exports_to_a_matching_gguf(tmp_path):
    """The real path: `tunery train` (LoRA) -> `tunery export --merged` -> GGUF -> verified against torch."""
    rows = date_rows()[:TRAIN_ROWS]
    data = tmp_path / "dates.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = build_tiny_model(tmp_path / "base", corpus_of(rows), TinySpec(family="qwen2", **SPEC))
    _cli("train", "--model", str(model), "--data", str(data), "--output-dir", str(tmp_path / "runs"), "--name", "r",
         "--max-seq-len", "64", "--batch-size", "8", "--lr", "3e-3", "--lora-r", "16", "--lora-alpha", "32",
         "--max-steps", "80", "--eval-samples", "0", home=tmp_path / "home")
    _cli("export", str(tmp_path / "runs" / "r"), "--merged", str(tmp_path / "merged"), home=tmp_path / "home")
    gguf_path = write_gguf(tmp_path / "merged", tmp_path / "model.f16.gguf", progress=False)
    report = verify_gguf(gguf_path, tmp_path / "merged", prompts(20), quant="f16")
    _show(report)
    assert report["top1_agreement"] == 1.0 and report["generations_matching"] == 1.0
    assert report["torch_stopped"] >= 10


def test_quantize_kinds(f16_gguf, tmp_path):
    for kind in ("q5_k_m", "q6_k", "q8_0"):
        types = tensor_types(quantize(f16_gguf("qwen2"), tmp_path / f"model.{kind}.gguf", kind))
        assert "F16" not in types and "F32" in types
    with pytest.raises(ExportError, match="q4_k_m"):
        quantize(f16_gguf("qwen2"), tmp_path / "x.gguf", "q3_k_s")
    (tmp_path / "not.gguf").write_text("not a gguf file")
    with pytest.raises(ExportError, match="could not quantize"):
        quantize(tmp_path / "not.gguf", tmp_path / "x.gguf")
    assert not list(tmp_path.glob("x.gguf*"))


def test_unsupported_family_is_named(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(tmp_path)
    with pytest.raises(ExportError) as err:
        write_gguf(tmp_path, tmp_path / "out.gguf")
    assert "'gpt2'" in str(err.value)
    assert all(name in str(err.value) for name in FAMILIES)
    assert not (tmp_path / "out.gguf").exists()


def test_bad_outtype(tiny_model, tmp_path):
    with pytest.raises(ExportError, match="f16, q8_0"):
        write_gguf(tiny_model("qwen2"), tmp_path / "out.gguf", "q4_k_m")


# Real families' pre-tokenizers: llama.cpp must split text exactly as tokenizer.json does, or every prompt is
# off by a few tokens. Each case trains a small tokenizer with that family's exact regex.
_TRICKY = [
    "Rewrite this date as YYYY-MM-DD: June 3, 1985",
    "I've been 'told he's there, 'RE you sure? We'Ve a'lL 12345 3.14159 1,000,000",
    "  leading spaces\n\n\ttabs\t\tand   runs of   spaces   \r\n",
    "naïve café, Ünïcödé — “quotes” ½ ² 三 四",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
]


def _tokenizer_with_regex(corpus: list[str], regex: str | None):
    """tunery's tiny tokenizer, or the same byte-level BPE + ChatML specials split by a family's own regex."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from tunery.data.templates import CHATML_TEMPLATE
    from tunery.models.tiny import train_tokenizer

    if regex is None:
        return train_tokenizer(corpus, vocab_size=600)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(regex), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=600, special_tokens=specials, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=["<|im_start|>"])
    fast.chat_template = CHATML_TEMPLATE
    return fast


@pytest.mark.parametrize("regex_name, expected", [("_LLAMA3_REGEX", "llama-bpe"), ("_QWEN2_REGEX", "qwen2"),
                                                  (None, "starcoder")])
def test_llama_cpp_tokenizes_like_hf(regex_name, expected, tmp_path):
    import llama_cpp
    import torch
    from transformers import AutoModelForCausalLM

    from tunery.export import gguf as export_gguf
    from tunery.models.tiny import TinySpec, make_config

    corpus = _TRICKY + [r["messages"][0]["content"] for r in date_rows()[:100]]
    tokenizer = _tokenizer_with_regex(corpus, getattr(export_gguf, regex_name) if regex_name else None)
    torch.manual_seed(0)
    spec = TinySpec(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1)
    AutoModelForCausalLM.from_config(make_config(spec, tokenizer)).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    assert pre_tokenizer_name(json.loads((tmp_path / "model" / "tokenizer.json").read_text())) == expected
    out = write_gguf(tmp_path / "model", tmp_path / "model.gguf", progress=False)
    llm = llama_cpp.Llama(str(out), vocab_only=True, verbose=False)
    try:
        for text in _TRICKY:
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == \
                tokenizer.encode(text, add_special_tokens=False), text
    finally:
        llm.close()


def test_unknown_pre_tokenizer_is_refused():
    spec = {"pre_tokenizer": {"type": "Metaspace", "replacement": "▁"}}
    with pytest.raises(ExportError, match="no llama.cpp equivalent"):
        pre_tokenizer_name(spec)
