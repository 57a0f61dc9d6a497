"""Convert a merged Hugging Face model folder to GGUF (f16 or q8_0), and quantize it further with llama.cpp.

    python -c "from pathlib import Path; from tunery.export.gguf import write_gguf, quantize; \
quantize(write_gguf(Path('merged'), Path('model.f16.gguf')), Path('model.q4_k_m.gguf'), 'q4_k_m')"

The facts this relies on come from llama.cpp (convert_hf_to_gguf.py, src/llama-vocab.cpp, src/llama-quant.cpp):
- llama.cpp's `llama` architecture rotates adjacent pairs of each head's dimensions; Hugging Face Llama rotates
  the two halves of the head, so q/k rows are reordered per head. `qwen2`/`qwen3` rotate halves (NEOX) as HF does.
- A GGUF without `output.weight` ties the output projection to `token_embd.weight`.
- `tokenizer.ggml.pre` selects a pre-tokenizer regex compiled into llama.cpp; it is chosen here from the structure
  of tokenizer.json (`PRE_TOKENIZERS`), never guessed.
- llama.cpp's quantizer gives a tensor whose rows do not fit a k-quant's 256-wide blocks a 32-wide type instead
  (q4_k -> q5_0, q5_k -> q5_1, q6_k -> q8_0), so tiny models quantize; `tensor_types` shows what was chosen.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from tunery.errors import ExportError
from tunery.models.catalog import Gguf, architecture_of, architectures

_INSTALL_HINT = "pip install 'tunery[gguf]' (installs gguf and llama-cpp-python)"


# what GGUF export needs of a family (its llama.cpp architecture, RoPE layout) is in its catalogue record
FAMILIES: dict[str, Gguf] = {a.model_type: a.gguf for a in architectures() if a.gguf is not None}


# Hugging Face pre-tokenizer regexes (as written in tokenizer.json) of the families we export
_GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# the sequence of isolating splits a byte-level tokenizer applies -> the llama.cpp pre-tokenizer doing the same
PRE_TOKENIZERS: dict[tuple[str, ...], str] = {
    (_GPT2_REGEX,): "gpt-2",
    (r"\p{N}", _GPT2_REGEX): "starcoder",  # digits one by one, then GPT-2's split (tunery's tiny tokenizers)
    (_LLAMA3_REGEX,): "llama-bpe",
    (_QWEN2_REGEX,): "qwen2",
}

OUTTYPES = ("f16", "q8_0")

# llama.cpp file types (enum llama_ftype) reachable through `quantize`
QUANT_FTYPES: dict[str, int] = {"q8_0": 7, "q4_k_m": 15, "q5_k_m": 17, "q6_k": 18}


@dataclass(frozen=True)
class Tensor:
    """One tensor to write: its GGUF name, logical shape (PyTorch order), storage type, and how to load it."""

    name: str
    shape: tuple[int, ...]
    qtype: object  # gguf.GGMLQuantizationType
    load: Callable[[], object]  # -> float32 numpy array of `shape`, already in llama.cpp's layout


def gguf_module():
    try:
        import gguf
    except ImportError as e:
        raise ExportError(f"GGUF export needs the gguf package: {_INSTALL_HINT}") from e
    return gguf


def family_for(model_type: str) -> Gguf:
    """The GGUF recipe of a Hugging Face `model_type`; ExportError naming the supported ones otherwise."""
    arch = architecture_of(model_type)
    if arch is None or arch.gguf is None:
        supported = sorted(a.model_type for a in architectures() if a.gguf is not None)
        raise ExportError(f"GGUF export does not support model_type {model_type!r} yet; supported: "
                          f"{', '.join(supported)}. Export the merged folder or the adapter instead.")
    return arch.gguf


def write_gguf(model_dir: Path, out_path: Path, outtype: str = "f16", progress: bool = True,
               tokenizer_dir: Path | None = None) -> Path:
    """Write the merged model folder `model_dir` (safetensors + tokenizer) as one GGUF file of `outtype`; the
    tokenizer from `tokenizer_dir` instead when given (a base model's GGUF with the run's chat template)."""
    from transformers import AutoConfig, AutoTokenizer

    gguf = gguf_module()
    if outtype not in OUTTYPES:
        raise ExportError(f"outtype must be one of {', '.join(OUTTYPES)}, not {outtype!r}; "
                          f"use quantize() on the f16 file for {', '.join(q for q in QUANT_FTYPES if q != 'q8_0')}")
    model_dir, out_path = Path(model_dir), Path(out_path)
    config = AutoConfig.from_pretrained(model_dir)
    family = family_for(config.model_type)
    tokenizer_dir = Path(tokenizer_dir or model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    writer = gguf.GGUFWriter(None, family.arch)
    writer.add_name(model_dir.resolve().name)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if outtype == "f16" else gguf.LlamaFileType.MOSTLY_Q8_0)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_tokenizer(writer, tokenizer_dir, tokenizer, config.vocab_size)
    with ExitStack() as stack:
        tensors = _plan_tensors(stack, model_dir, config, family, outtype)
        _add_hparams(writer, config, family, tensors)
        write_file(writer, tensors, out_path, progress)
    return out_path


def write_file(writer, tensors: list[Tensor], out_path: Path, progress: bool) -> None:
    """Write `writer`'s metadata and `tensors` to `out_path`, through a temporary file (no half-written GGUF)."""
    tmp = out_path.with_name(out_path.name + ".tmp")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    for t in tensors:
        byte_shape, dtype = _storage(t)
        writer.add_tensor_info(t.name, byte_shape, dtype, math.prod(byte_shape) * dtype.itemsize, raw_dtype=t.qtype)
    try:
        _write_data(writer, tmp, tensors, progress, f"writing {out_path.name}")
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(out_path)


def _write_data(writer, path: Path, tensors: list[Tensor], progress: bool, description: str) -> None:
    writer.write_header_to_file(path=path)
    try:
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        with _bar(progress, description, len(tensors)) as advance:
            for t in tensors:  # one tensor in memory at a time
                writer.write_tensor_data(_encode(t))
                advance()
    finally:
        writer.close()


def quantize(f16_path: Path, out_path: Path, kind: str = "q4_k_m") -> Path:
    """Quantize an f16 GGUF with llama.cpp's quantizer (llama-cpp-python) to `kind` (see QUANT_FTYPES)."""
    import ctypes
    import os

    if kind not in QUANT_FTYPES:
        raise ExportError(f"quantization kind must be one of {', '.join(QUANT_FTYPES)}, not {kind!r}")
    llama_cpp = require_llama_cpp()
    f16_path, out_path = Path(f16_path), Path(out_path)
    if not f16_path.is_file():
        raise ExportError(f"{f16_path} does not exist; write it first with write_gguf(..., outtype='f16')")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANT_FTYPES[kind]
    params.nthread = os.cpu_count() or 1
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    with _quiet_llama_cpp():
        rc = llama_cpp.llama_model_quantize(str(f16_path).encode(), str(tmp).encode(), ctypes.byref(params))
    if rc != 0:
        tmp.unlink(missing_ok=True)
        raise ExportError(f"llama.cpp could not quantize {f16_path} to {kind} (status {rc}); "
                          "check that it is an f16 GGUF written by write_gguf")
    tmp.replace(out_path)
    return out_path


def tensor_types(gguf_path: Path) -> dict[str, int]:
    """How many tensors of each storage type (F32, F16, Q8_0, Q4_K, ...) a GGUF file holds."""
    reader = gguf_module().GGUFReader(str(gguf_path))
    counts: dict[str, int] = {}
    for t in reader.tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return dict(sorted(counts.items()))


def require_llama_cpp():
    """The llama_cpp module, or ExportError saying how to install it."""
    try:
        import llama_cpp
    except ImportError as e:
        raise ExportError(f"quantizing and verifying GGUF needs llama-cpp-python: {_INSTALL_HINT}") from e
    return llama_cpp


@contextmanager
def _quiet_llama_cpp() -> Iterator[None]:
    """Hide llama.cpp's per-tensor info lines while quantizing; its warnings (e.g. k-quant fallbacks for narrow
    rows) still print, and a failure shows as a non-zero status. llama-cpp-python's log callback obeys this logger."""
    import logging

    logger = logging.getLogger("llama-cpp-python")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


@contextmanager
def _bar(enabled: bool, description: str, total: int) -> Iterator[Callable[[], None]]:
    if not enabled:
        yield lambda n=1: None
        return
    from tunery.progress import progress_bar

    with progress_bar(description, total) as advance:
        yield advance


# ---- hyperparameters -------------------------------------------------------------------------------------------

def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _add_hparams(writer, config, family: Gguf, tensors: list[Tensor]) -> None:
    n_ctx = config.max_position_embeddings
    window = getattr(config, "sliding_window", None)
    if family.sliding_window_caps_context and window:
        n_ctx = min(n_ctx, window)
    head_dim = _head_dim(config)
    rope = _rope_parameters(config)
    writer.add_context_length(n_ctx)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    # the MLP's width as stored (LFM2 derives it from intermediate_size; Phi-3's gate_up holds two of it)
    writer.add_feed_forward_length(next(t.shape[1] for t in tensors if t.name.endswith("ffn_down.weight")))
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(int(head_dim * rope.get("partial_rotary_factor", 1.0)))
    writer.add_rope_freq_base(rope["rope_theta"])
    writer.add_layer_norm_rms_eps(getattr(config, "rms_norm_eps", None) or config.norm_eps)
    writer.add_vocab_size(config.vocab_size)
    _rope_scaling(config)[0](writer, config)
    for extra in family.extras:
        _EXTRAS[extra](writer, config)


def _rope_parameters(config, layer_type: str = "full_attention") -> dict:
    """RoPE settings of `layer_type`'s layers (Gemma 3 keeps one set per layer type, others one for all)."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    if isinstance(params.get(layer_type), dict):
        params = dict(params[layer_type])
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params.setdefault("rope_type", "default")
    return params


def _query_scale(writer, config) -> None:
    """llama.cpp scales queries by 1/sqrt(head size) (or of hidden/heads in the largest Gemmas), not by
    query_pre_attn_scalar: a model whose scalar is neither would be another model there."""
    scalar = getattr(config, "query_pre_attn_scalar", None)
    if scalar is not None and scalar not in (_head_dim(config), config.hidden_size // config.num_attention_heads):
        raise ExportError(f"query_pre_attn_scalar {scalar} is neither the head size {_head_dim(config)} nor "
                          f"hidden_size/num_attention_heads; llama.cpp would scale attention differently")


def _softcapping(writer, config) -> None:
    if getattr(config, "attn_logit_softcapping", None):
        writer.add_attn_logit_softcapping(config.attn_logit_softcapping)
    if getattr(config, "final_logit_softcapping", None):
        writer.add_final_logit_softcapping(config.final_logit_softcapping)


def _sliding_window(writer, config) -> None:
    """The window, which layers use it, and the RoPE base of those layers (Gemma 3 gives them their own)."""
    window = getattr(config, "sliding_window", None)
    if not window:
        return
    writer.add_sliding_window(window)
    types = getattr(config, "layer_types", None) or []
    writer.add_sliding_window_pattern([t == "sliding_attention" for t in types])
    local = _rope_parameters(config, "sliding_attention")
    if local["rope_type"] != "default":
        raise ExportError(f"RoPE scaling {local['rope_type']!r} on sliding-window layers is not supported by "
                          "GGUF export")
    writer.add_rope_freq_base_swa(local["rope_theta"])


def _shortconv(writer, config) -> None:
    """LFM2: the convolution's cache length, and no key/value heads in the convolution layers (llama.cpp tells
    its recurrent layers by that)."""
    writer.add_shortconv_l_cache(config.conv_L_cache)
    types = getattr(config, "layer_types", None) or ["full_attention" if i in config.full_attn_idxs else "conv"
                                                     for i in range(config.num_hidden_layers)]
    writer.add_head_count_kv([config.num_key_value_heads if t == "full_attention" else 0 for t in types])


_EXTRAS: dict[str, Callable] = {"query_scale": _query_scale, "softcapping": _softcapping,
                                "sliding_window": _sliding_window, "shortconv": _shortconv}


def _rope_none(writer, config) -> None:
    return None


def _rope_linear(writer, config) -> None:
    gguf = gguf_module()
    writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
    writer.add_rope_scaling_factor(_rope_parameters(config)["factor"])


def _llama3_rope_factors(config) -> dict:
    """Per-frequency divisors llama.cpp applies (rope_freqs.weight): HF's llama3 inv_freq vs the plain one."""
    import torch
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    dim, theta = _head_dim(config), _rope_parameters(config)["rope_theta"]
    plain = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    return {"rope_freqs.weight": (plain / scaled.double()).float().numpy()}


def _longrope(writer, config) -> None:
    """Phi-3's LongRoPE: llama.cpp scales cos/sin by attn_factor, as HF does, and picks the long factors past
    the original context."""
    params = _rope_parameters(config)
    original = params.get("original_max_position_embeddings") or config.original_max_position_embeddings
    scale = config.max_position_embeddings / original
    factor = params.get("attention_factor") or (math.sqrt(1 + math.log(scale) / math.log(original))
                                                if scale > 1.0 else 1.0)
    writer.add_rope_scaling_attn_factors(factor)
    writer.add_rope_scaling_orig_ctx_len(original)


def _longrope_factors(config) -> dict:
    import numpy as np

    params = _rope_parameters(config)
    return {"rope_factors_long.weight": np.asarray(params["long_factor"], dtype=np.float32),
            "rope_factors_short.weight": np.asarray(params["short_factor"], dtype=np.float32)}


# rope_type -> (metadata writer, extra tensors); llama.cpp applies llama3 and LongRoPE scaling through tensors
_ROPE_TYPES: dict[str, tuple[Callable, Callable | None]] = {
    "default": (_rope_none, None),
    "linear": (_rope_linear, None),
    "llama3": (_rope_none, _llama3_rope_factors),
    "longrope": (_longrope, _longrope_factors),
}


def _rope_scaling(config) -> tuple[Callable, Callable | None]:
    rope_type = _rope_parameters(config)["rope_type"]
    if rope_type not in _ROPE_TYPES:
        raise ExportError(f"RoPE type {rope_type!r} is not supported by GGUF export yet; "
                          f"supported: {', '.join(_ROPE_TYPES)}")
    return _ROPE_TYPES[rope_type]


# ---- tokenizer ---------------------------------------------------------------------------------------------

def _add_tokenizer(writer, model_dir: Path, tokenizer, vocab_size: int) -> None:
    spec_path = model_dir / "tokenizer.json"
    if not spec_path.is_file():
        raise ExportError(f"{model_dir} has no tokenizer.json; GGUF export needs a fast (tokenizers) tokenizer")
    spec = json.loads(spec_path.read_text(encoding="utf-8"))
    space_prefix = _sentencepiece_space_prefix(spec)
    if space_prefix is None:
        _check_byte_level_bpe(spec)
        tokens, types = _vocabulary(tokenizer, vocab_size)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre_tokenizer_name(spec))
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(_merges(spec))
    else:
        tokens, types = _vocabulary(tokenizer, vocab_size, byte_fallback=True)
        writer.add_tokenizer_model("llama")
        writer.add_token_list(tokens)
        writer.add_token_scores(_merge_scores(spec, tokens))
        writer.add_token_types(types)
        writer.add_add_space_prefix(space_prefix)
        if tokenizer.unk_token_id is not None:
            writer.add_unk_token_id(tokenizer.unk_token_id)
    for add, token_id in ((writer.add_bos_token_id, tokenizer.bos_token_id),
                          (writer.add_eos_token_id, tokenizer.eos_token_id),
                          (writer.add_eot_token_id, _end_of_turn_id(tokenizer)),
                          (writer.add_pad_token_id, tokenizer.pad_token_id)):
        if token_id is not None:
            add(token_id)
    probe = tokenizer("a")["input_ids"]  # what the HF tokenizer adds around plain text
    writer.add_add_bos_token(tokenizer.bos_token_id is not None and probe[0] == tokenizer.bos_token_id)
    writer.add_add_eos_token(tokenizer.eos_token_id is not None and probe[-1] == tokenizer.eos_token_id)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def _steps(node: dict | None) -> list[dict]:
    """The steps of a normalizer, pre-tokenizer or decoder (a Sequence's members, or the one step)."""
    if not node:
        return []
    return [s for n in node.get("normalizers") or node.get("pretokenizers") or node.get("decoders") or []
            for s in _steps(n)] if node.get("type") == "Sequence" else [node]


def _sentencepiece_space_prefix(spec: dict) -> bool | None:
    """For a SentencePiece BPE tokenizer (byte fallback, "▁" for spaces: Llama 2, Mistral, Gemma, Phi-3),
    whether it writes "▁" before each text after a special token, as llama.cpp's `llama` vocabulary does with
    add_space_prefix; None for any other tokenizer. ExportError for a SentencePiece tokenizer that llama.cpp
    would split differently."""
    model = spec.get("model") or {}
    if model.get("type") == "Unigram":
        raise ExportError("this is a SentencePiece Unigram tokenizer: Hugging Face splits it by the most likely "
                          "segmentation, llama.cpp's SentencePiece vocabulary by greedy merges, so prompts would "
                          "be tokenized differently. GGUF export supports SentencePiece BPE (byte fallback) and "
                          "byte-level BPE tokenizers")
    if model.get("type") != "BPE" or not model.get("byte_fallback"):
        return None
    normalizers = [(n.get("type"), n.get("prepend") or (n.get("pattern") or {}).get("String"), n.get("content"))
                   for n in _steps(spec.get("normalizer"))]
    pre = _steps(spec.get("pre_tokenizer"))
    if not pre and normalizers in ([("Replace", " ", "▁")], [("Prepend", "▁", None), ("Replace", " ", "▁")]):
        return len(normalizers) == 2
    if not normalizers and len(pre) == 1 and pre[0].get("type") == "Metaspace" \
            and pre[0].get("replacement") == "▁" and pre[0].get("prepend_scheme") in ("always", "never") \
            and not pre[0].get("split", False):
        return pre[0]["prepend_scheme"] == "always"
    raise ExportError("the tokenizer is SentencePiece-style (byte fallback) but writes spaces in a way llama.cpp "
                      f"does not: normalizer {json.dumps(spec.get('normalizer'))[:200]}, pre_tokenizer "
                      f"{json.dumps(spec.get('pre_tokenizer'))[:200]}")


def _merge_scores(spec: dict, tokens: list[str]) -> list[float]:
    """Scores for llama.cpp's SentencePiece merges, which join the adjacent pair whose result scores highest: a
    token made by the merge of rank r scores -r, so llama.cpp merges in the order the BPE model does. Tokens no
    merge makes (characters, bytes, specials) score 0; nothing compares their scores."""
    first_rank: dict[str, int] = {}
    for rank, merge in enumerate(_merges(spec)):
        first_rank.setdefault(merge.replace(" ", ""), rank)  # "a b" -> "ab" (SentencePiece pieces hold no space)
    return [-float(first_rank[t]) if t in first_rank else 0.0 for t in tokens]


def _check_byte_level_bpe(spec: dict) -> None:
    model, decoders = spec.get("model") or {}, _steps(spec.get("decoder"))
    if model.get("type") != "BPE" or not any(d.get("type") == "ByteLevel" for d in decoders):
        raise ExportError("GGUF export supports byte-level BPE tokenizers (Llama 3, Qwen, GPT-2 style) and "
                          "SentencePiece BPE ones with byte fallback (Llama 2, Mistral, Gemma, Phi-3); this "
                          f"tokenizer is {model.get('type')} with decoders {[d.get('type') for d in decoders]}")
    normalizer = spec.get("normalizer")
    if normalizer is not None and normalizer.get("type") != "NFC":  # NFC leaves already-composed text as is
        raise ExportError(f"the tokenizer's {normalizer.get('type')} normalizer has no llama.cpp equivalent")


def _split_steps(pre: dict) -> list[str] | None:
    """The isolating regex splits a pre-tokenizer applies, in order; None when a step is not a plain split."""
    kind = pre.get("type")
    if kind == "Sequence":
        steps = [_split_steps(p) for p in pre.get("pretokenizers", [])]
        return None if any(s is None for s in steps) else [r for s in steps for r in s]
    if kind == "ByteLevel" and not pre.get("add_prefix_space", False):
        return [_GPT2_REGEX] if pre.get("use_regex", True) else []
    if kind == "Digits":
        return [r"\p{N}" if pre.get("individual_digits") else r"\p{N}+"]
    if kind == "Split" and "Regex" in pre.get("pattern", {}) and not pre.get("invert") \
            and pre.get("behavior") == "Isolated":
        return [pre["pattern"]["Regex"]]
    return None


def pre_tokenizer_name(spec: dict) -> str:
    """The llama.cpp `tokenizer.ggml.pre` that splits text as tokenizer.json's pre_tokenizer does."""
    steps = _split_steps(spec.get("pre_tokenizer") or {})
    name = PRE_TOKENIZERS.get(tuple(steps)) if steps is not None else None
    if name is None:
        raise ExportError("the tokenizer's pre-tokenizer has no llama.cpp equivalent that tunery knows; "
                          f"known: {', '.join(PRE_TOKENIZERS.values())}. Its pre_tokenizer is "
                          f"{json.dumps(spec.get('pre_tokenizer'))[:300]}")
    return name


_BYTE_TOKEN = re.compile(r"<0x[0-9A-F]{2}>")  # a SentencePiece byte-fallback token


def _vocabulary(tokenizer, vocab_size: int, byte_fallback: bool = False) -> tuple[list[str], list[int]]:
    """Token strings and llama.cpp token types for ids 0..vocab_size-1 (ids the tokenizer lacks are UNUSED)."""
    gguf = gguf_module()
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    if max(by_id) >= vocab_size:
        raise ExportError(f"the tokenizer has token id {max(by_id)} but the model's vocab_size is {vocab_size}; "
                          "resize the embeddings before merging")
    added = tokenizer.added_tokens_decoder  # id -> AddedToken
    tokens, types = [], []
    for i in range(vocab_size):
        text = by_id.get(i)
        tokens.append(text if text is not None else f"[PAD{i}]")
        if text is None:
            types.append(gguf.TokenType.UNUSED)
        elif byte_fallback and i == tokenizer.unk_token_id:
            types.append(gguf.TokenType.UNKNOWN)
        elif byte_fallback and _BYTE_TOKEN.fullmatch(text):
            types.append(gguf.TokenType.BYTE)
        elif i not in added:
            types.append(gguf.TokenType.NORMAL)
        elif added[i].special or (text.startswith("<|") and text.endswith("|>")):
            types.append(gguf.TokenType.CONTROL)
        else:
            types.append(gguf.TokenType.USER_DEFINED)
    return tokens, [int(t) for t in types]


def _merges(spec: dict) -> list[str]:
    # tokenizers writes merges as "a b" strings (older) or ["a", "b"] pairs (newer)
    return [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]


def _end_of_turn_id(tokenizer) -> int | None:
    """The stop token the chat template writes after a turn (eos when the template names none)."""
    from tunery.data.templates import stop_token_ids

    template = tokenizer.chat_template or ""
    written = [i for i in stop_token_ids(tokenizer) if tokenizer.convert_ids_to_tokens(i) in template]
    if tokenizer.eos_token_id in written or not written:
        return tokenizer.eos_token_id
    return written[0]


# ---- tensors -----------------------------------------------------------------------------------------------

def _weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / s for s in shards]
    single = model_dir / "model.safetensors"
    if not single.is_file():
        raise ExportError(f"{model_dir} has no model.safetensors; export the merged model first (tunery export)")
    return [single]


def _plan_tensors(stack: ExitStack, model_dir: Path, config, family: Gguf, outtype: str) -> list[Tensor]:
    from safetensors import safe_open

    gguf = gguf_module()
    arch = {name: arch for arch, name in gguf.MODEL_ARCH_NAMES.items()}[family.arch]
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    tied = getattr(config, "tie_word_embeddings", False)
    planned: list[Tensor] = []
    for path in _weight_files(model_dir):
        handle = stack.enter_context(safe_open(path, framework="pt"))
        for hf_name in handle.keys():
            if hf_name.endswith("rotary_emb.inv_freq") or (tied and hf_name == "lm_head.weight"):
                continue  # recomputed by llama.cpp / tied to token_embd
            name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if name is None:
                raise ExportError(f"tensor {hf_name} has no GGUF name in llama.cpp's {family.arch} architecture; "
                                  "is this a plain merged model folder?")
            shape = tuple(handle.get_slice(hf_name).get_shape())
            if name.endswith(_CONV) and len(shape) == 3:
                shape = (shape[0], shape[2])  # (channels, 1, kernel) as llama.cpp's (channels, kernel)
            planned.append(Tensor(name, shape, _qtype(name, shape, outtype),
                                   _loader(handle, hf_name, name, shape, config, family)))
    if not tied and not any(t.name == "output.weight" for t in planned):
        # llama.cpp would silently reuse token_embd as the output projection: a different model
        raise ExportError(f"{model_dir} has no lm_head.weight but its config says the embeddings are not tied")
    extra = _rope_scaling(config)[1]
    for name, values in (extra(config) if extra is not None else {}).items():
        planned.append(Tensor(name, values.shape, gguf.GGMLQuantizationType.F32, lambda v=values: v))
    return sorted(planned, key=lambda t: natural_key(t.name))


def natural_key(name: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in name.split("."))


def _qtype(name: str, shape: tuple[int, ...], outtype: str):
    """Norms and 1-D tensors stay F32 (llama.cpp expects that); matrices become f16 or q8_0."""
    q = gguf_module().GGMLQuantizationType
    if len(shape) <= 1 or name.endswith(("_norm.weight", _CONV)):  # llama.cpp's convolution reads f32 weights
        return q.F32
    if outtype == "q8_0":
        block, _ = gguf_module().GGML_QUANT_SIZES[q.Q8_0]
        return q.Q8_0 if shape[-1] % block == 0 else q.F16  # rows q8_0 cannot hold stay f16, as in llama.cpp
    return q.F16


_CONV = "shortconv.conv.weight"  # LFM2's depthwise convolution


def _loader(handle, hf_name: str, name: str, shape: tuple[int, ...], config, family: Gguf) -> Callable[[], object]:
    def load():
        w = handle.get_tensor(hf_name).float()
        if family.permute_qk and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            w = interleave_rope_halves(w, config.num_attention_heads)
        elif family.permute_qk and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            w = interleave_rope_halves(w, config.num_key_value_heads or config.num_attention_heads)
        if family.norm_offset and name.endswith("norm.weight"):
            w = w + family.norm_offset
        return w.reshape(shape).numpy()

    return load


def interleave_rope_halves(w, n_heads: int):
    """Per head, rows [x_0..x_{d/2-1}, y_0..y_{d/2-1}] (HF rotate-half) -> [x_0, y_0, x_1, y_1, ...]."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _storage(t: Tensor):
    """(shape as stored, numpy dtype): float types as they are, block-quantized types as bytes."""
    import numpy as np

    gguf = gguf_module()
    q = gguf.GGMLQuantizationType
    if t.qtype == q.F32:
        return t.shape, np.dtype(np.float32)
    if t.qtype == q.F16:
        return t.shape, np.dtype(np.float16)
    return tuple(gguf.quant_shape_to_byte_shape(t.shape, t.qtype)), np.dtype(np.uint8)


def _encode(t: Tensor):
    import numpy as np

    gguf = gguf_module()
    data = np.ascontiguousarray(t.load(), dtype=np.float32)
    if tuple(data.shape) != tuple(t.shape):
        raise ExportError(f"{t.name}: expected shape {t.shape}, got {data.shape}")
    if t.qtype == gguf.GGMLQuantizationType.F32:
        return data
    if t.qtype == gguf.GGMLQuantizationType.F16:
        return data.astype(np.float16)
    return gguf.quants.quantize(data, t.qtype)
