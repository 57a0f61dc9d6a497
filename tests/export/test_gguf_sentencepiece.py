"""GGUF export of a tiny Llama whose tokenizer is SentencePiece BPE with byte fallback (the kind Llama 2, Mistral,
Gemma and Phi-3 ship), trained here with `tokenizers`: llama.cpp's `llama` vocabulary (scores, token types, byte
tokens) must split every text exactly as the Hugging Face tokenizer does, and the model must verify as the
byte-level ones do.

    HF_HUB_OFFLINE=1 .venv/bin/pytest tests/export/test_gguf_sentencepiece.py -q -s
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunery.errors import ExportError
from tunery.export.gguf import quantize, write_gguf
from tunery.export.verify import verify_gguf

from .conftest import SPEC, TRAIN_ROWS, date_rows, prompts, train_briefly

pytestmark = pytest.mark.slow

SPACE = "\u2581"  # SentencePiece's "▁", written for a space
BYTES = [f"<0x{b:02X}>" for b in range(256)]
CHATML = ["<|im_start|>", "<|im_end|>"]

TRICKY = [
    "Rewrite this date as YYYY-MM-DD: June 3, 1985",
    "  leading spaces\n\n\ttabs\t\tand   runs of   spaces   ",
    "naïve café, Ünïcödé — “quotes” ½ ² 三 四 ☕ 🙂",  # characters the vocabulary lacks: byte fallback
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n1985-06-03<|im_end|>\n",
    "",
    "a",
    " ",
]


def train_sentencepiece_tokenizer(texts: list[str], vocab_size: int = 600, space_prefix: bool = True):
    """A SentencePiece-style BPE tokenizer: "▁" for spaces (and before each text when `space_prefix`), byte
    fallback through <0x00>..<0xFF>, and merges listed as SentencePiece applies them: every split of each piece,
    pieces in the order training made them (a converted SentencePiece model's tokenizer.json looks like this)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from tunery.data.templates import CHATML_TEMPLATE

    learner = Tokenizer(models.BPE())
    learner.normalizer = normalizers.Replace(" ", SPACE)
    learner.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="always", split=True)
    learner.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False))
    learned = sorted(learner.get_vocab().items(), key=lambda item: item[1])  # in the order training made them
    pieces = ["<unk>", "<s>", "</s>", *BYTES, *[p for p, _ in learned if p not in BYTES]]
    vocab = {p: i for i, p in enumerate(pieces)}
    merges = [(piece[:k], piece[k:]) for piece in pieces[3 + 256:] for k in range(1, len(piece))
              if piece[:k] in vocab and piece[k:] in vocab]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    steps = [normalizers.Prepend(SPACE)] if space_prefix else []
    tok.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", SPACE)])
    tok.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse(),
                                     *([decoders.Strip(" ", 1, 0)] if space_prefix else [])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="<|im_end|>",
                                   pad_token="</s>", additional_special_tokens=CHATML)
    fast.chat_template = CHATML_TEMPLATE
    return fast


def _corpus() -> list[str]:
    from tunery.models.tiny import corpus_of

    return corpus_of(date_rows()[:TRAIN_ROWS])


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    import torch
    from transformers import AutoModelForCausalLM

    from tunery.models.tiny import TinySpec, make_config

    out = tmp_path_factory.mktemp("spm-llama")
    tokenizer = train_sentencepiece_tokenizer(_corpus(), vocab_size=SPEC["vocab_size"] + 100)
    torch.manual_seed(0)
    config = make_config(TinySpec(family="llama", **SPEC), tokenizer)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    train_briefly(out, date_rows()[:TRAIN_ROWS], steps=100)
    return out


@pytest.fixture(scope="module")
def f16(model) -> Path:
    return write_gguf(model, model / "model.f16.gguf", "f16", progress=False)


def _show(report: dict) -> None:
    keys = ("quant", "tokenization_match", "top1_agreement", "max_abs_logit_diff", "generations_identical",
            "torch_stopped", "gguf_stopped", "tensor_types")
    print(json.dumps({k: report[k] for k in keys}))


def test_the_vocabulary_is_sentencepieces(model, f16):
    from gguf import GGUFReader, TokenType
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    fields = {k: f.contents() for k, f in GGUFReader(f16).fields.items()}
    assert fields["tokenizer.ggml.model"] == "llama" and "tokenizer.ggml.merges" not in fields
    assert fields["tokenizer.ggml.add_space_prefix"] is True
    types, scores, tokens = (fields[f"tokenizer.ggml.{k}"] for k in ("token_type", "scores", "tokens"))
    assert types[:3] == [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL]
    assert types.count(TokenType.BYTE) == 256 and tokens[3 + 0x41] == "<0x41>" and types[3 + 0x41] == TokenType.BYTE
    assert fields["tokenizer.ggml.unknown_token_id"] == 0
    assert fields["tokenizer.ggml.eos_token_id"] == fields["tokenizer.ggml.eot_token_id"] == \
        tokenizer.convert_tokens_to_ids("<|im_end|>")
    # pieces made by merges score by merge order: the earlier a piece was learned, the higher its score
    merged = [(i, s) for i, s in enumerate(scores) if s < 0]
    assert len(merged) > 50 and [s for _, s in merged] == sorted((s for _, s in merged), reverse=True)


@pytest.mark.parametrize("space_prefix", [True, False])  # Llama 2 / Mistral write "▁" first, Gemma does not
def test_llama_cpp_tokenizes_like_hf(space_prefix, tmp_path):
    import llama_cpp
    import torch
    from transformers import AutoModelForCausalLM

    from tunery.models.tiny import TinySpec, make_config

    tokenizer = train_sentencepiece_tokenizer(_corpus() + TRICKY[:2], space_prefix=space_prefix)
    torch.manual_seed(0)
    spec = TinySpec(family="llama", hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1)
    AutoModelForCausalLM.from_config(make_config(spec, tokenizer)).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    out = write_gguf(tmp_path / "model", tmp_path / "model.gguf", progress=False)
    llm = llama_cpp.Llama(str(out), vocab_only=True, verbose=False)
    texts = TRICKY + [json.dumps(r["messages"][0]["content"]) for r in date_rows()[-50:]]
    try:
        for text in texts:
            want = tokenizer.encode(text, add_special_tokens=False)
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == want, text
            if text.strip():
                assert any(t >= 3 + 256 for t in want)  # learned pieces, not only bytes
    finally:
        llm.close()


def test_f16_matches_torch(model, f16):
    report = verify_gguf(f16, model, prompts(20), quant="f16")
    _show(report)
    assert report["tokenization_match"] == 1.0 and report["top1_agreement"] == 1.0
    assert report["generations_matching"] == 1.0
    assert report["torch_stopped"] == report["gguf_stopped"] >= 18


def test_q8_0_and_q4_k_m(model, f16, tmp_path):
    q8 = verify_gguf(write_gguf(model, tmp_path / "model.q8_0.gguf", "q8_0", progress=False), model, prompts(20),
                     quant="q8_0")
    _show(q8)
    assert q8["top1_agreement"] >= 0.95
    q4 = verify_gguf(quantize(f16, tmp_path / "model.q4_k_m.gguf", "q4_k_m"), model, prompts(20), quant="q4_k_m")
    _show(q4)
    assert q4["gguf_stopped"] >= q4["torch_stopped"] >= 18


def test_unigram_is_refused(tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from tunery.export.gguf import _sentencepiece_space_prefix

    tok = Tokenizer(models.Unigram([("<unk>", 0.0), ("a", -1.0), ("b", -2.0)], unk_id=0, byte_fallback=False))
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(tmp_path)
    with pytest.raises(ExportError, match="Unigram"):
        _sentencepiece_space_prefix(json.loads((tmp_path / "tokenizer.json").read_text()))
