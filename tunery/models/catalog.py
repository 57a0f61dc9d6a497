"""Model families and known models as data: everything the code knows about a family, in one record.

    family = family_of(model.config.model_type)     # -> Family, or None for an architecture tunery does not know

A `Family` holds what each part of tunery needs to know about a family: its transformers architectures
(`config.model_type` values), LoRA targets, which fast-path pieces are exact for it and the data they read
(kernels/, which imports nothing outside itself: the training loop hands the family in), its llama.cpp
architecture for GGUF export (export/gguf.py), the settings of a tiny test model (models/tiny.py), whether
packed rows stay apart in it, and the real shapes of its public models (the rows bench/lora_bench.py runs, and
the configs the advisor predicts memory and time from: tunery/advisor/). Adding a family is one entry here, plus
a kernel module if its blocks need one; tests/models/test_catalog.py checks that family facts live nowhere else.

A `KnownModel` is one public checkpoint (`tunery models` lists them): its size, base or instruct and its pair,
licence (`LICENCES`: whether it allows commercial use), chat template kind, config shape, and whether it is stored
in 4 bits (a pre-quantized `...-bnb-4bit` checkpoint, which trains only as QLoRA).
"""

from __future__ import annotations

from dataclasses import dataclass, field

_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")

# The fast path's pieces (kernels/apply.py). "ops" (liger's RMSNorm and SwiGLU) computes Llama's norm and MLP:
# Gemma's norms scale by 1 + weight and its MLP is GeGLU; LFM2's modules have other names (nothing to swap).
ALL_PIECES = ("fused_linear_ce", "fused_lora", "offload", "attention", "ops", "compile")
_NO_OPS = tuple(p for p in ALL_PIECES if p != "ops")

# Projections grouped into one matmul with their adapters (kernels/lora_group.py): (parent module suffix, its
# projections that read one input, in the order the parent calls them, those whose output backward keeps as it
# is). v goes into attention unchanged and is saved there; as a view of the group's output it would keep all of
# q/k/v.
_QKV = ("self_attn", ("q_proj", "k_proj", "v_proj"), ("v_proj",))
_GATE_UP = ("mlp", ("gate_proj", "up_proj"), ())


@dataclass(frozen=True)
class Gguf:
    """How an architecture becomes a llama.cpp one (export/gguf.py); tensor names come from the gguf package's
    map for `arch`."""

    arch: str  # llama.cpp architecture name (a value of gguf.MODEL_ARCH_NAMES)
    permute_qk: bool  # reorder q/k rows from HF's rotate-half RoPE to llama.cpp's adjacent-pair RoPE
    sliding_window_caps_context: bool = False  # llama.cpp's arch has no sliding window: stay within it
    norm_offset: float = 0.0  # added to every norm weight: Gemma's norms scale by 1 + weight, llama.cpp's by weight
    # metadata beyond the common set, by the name of its writer in export/gguf.py (`_EXTRAS`): "query_scale"
    # (llama.cpp derives the attention scale from the head size), "softcapping", "sliding_window" (per-layer
    # windows), "shortconv" (LFM2's convolution cache and its attention-free layers)
    extras: tuple[str, ...] = ()


@dataclass(frozen=True)
class Architecture:
    """One transformers architecture of a family (a `config.model_type`)."""

    model_type: str
    config_class: str  # the transformers config class
    # settings of a tiny test model beyond models/tiny.TinySpec's (None: derived from the spec there)
    tiny: dict = field(default_factory=dict)
    gguf: Gguf | None = None  # None: no GGUF export for it yet
    # layers whose output only feeds the block's last residual add (no norm after the MLP): a recompute for
    # backward need not compute them (kernels/lora.py). Not Gemma 2/3: a norm reads the MLP's output.
    unread_in_recompute: tuple[str, ...] = ()


@dataclass(frozen=True)
class Family:
    name: str
    architectures: tuple[Architecture, ...]
    lora_targets: tuple[str, ...]  # all linear layers of a decoder block
    pieces: tuple[str, ...] = ALL_PIECES  # the fast path's pieces that are exact for it (kernels/apply.py)
    lora_groups: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...] = ()  # see _QKV
    # examples packed into one row stay apart (attention is kept within each; a convolution over the sequence
    # reaches across, unless it is one models/packing.py bounds: train/batching.packing_problem)
    packing: bool = True
    # real shapes (the benchmark's rows and the known models' configs): name -> (model_type, config.json values
    # of the public model); RoPE scaling left out
    bench: dict = field(default_factory=dict)

    @property
    def model_types(self) -> tuple[str, ...]:
        return tuple(a.model_type for a in self.architectures)

    def architecture(self, model_type: str) -> Architecture:
        return next(a for a in self.architectures if a.model_type == model_type)

    def unread_in_recompute(self, model_type: str) -> tuple[str, ...]:
        return self.architecture(model_type).unread_in_recompute


_DOWN = ("mlp.down_proj",)
_LLAMA_3 = dict(max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5)
_GEMMA_GGUF = ("query_scale", "softcapping", "sliding_window")
_QWEN_2 = dict(max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6)

FAMILIES: tuple[Family, ...] = (
    Family("llama", (Architecture("llama", "LlamaConfig", {"tie_word_embeddings": False}, Gguf("llama", True),
                                  _DOWN),),
           _ATTN + _MLP, lora_groups=(_QKV, _GATE_UP), bench={
               "llama-1b": ("llama", dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                                          num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                                          tie_word_embeddings=True, **_LLAMA_3)),
               "llama-8b": ("llama", dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                                          num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                          tie_word_embeddings=False, **_LLAMA_3))}),
    Family("qwen", (Architecture("qwen2", "Qwen2Config", {"tie_word_embeddings": True}, Gguf("qwen2", False), _DOWN),
                    Architecture("qwen3", "Qwen3Config", {"tie_word_embeddings": True}, Gguf("qwen3", False),
                                 _DOWN)),
           _ATTN + _MLP, lora_groups=(_QKV, _GATE_UP), bench={
               "qwen-0.5b": ("qwen2", dict(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                                           num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                                           tie_word_embeddings=True, **_QWEN_2)),
               "qwen-7b": ("qwen2", dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                                         num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                                         tie_word_embeddings=False, **_QWEN_2)),
               "qwen-1.5b": ("qwen2", dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                                           num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                                           tie_word_embeddings=True, **_QWEN_2)),
               "qwen3-0.6b": ("qwen3", dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072,
                                            num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                                            head_dim=128, tie_word_embeddings=True, max_position_embeddings=40960,
                                            rope_theta=1000000.0, rms_norm_eps=1e-6))}),
    Family("mistral", (Architecture("mistral", "MistralConfig", {"tie_word_embeddings": False},
                                    Gguf("llama", True, sliding_window_caps_context=True), _DOWN),),
           _ATTN + _MLP, lora_groups=(_QKV, _GATE_UP), bench={
               "mistral-7b": ("mistral", dict(vocab_size=32768, hidden_size=4096, intermediate_size=14336,
                                              num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                              max_position_embeddings=32768, rope_theta=1000000.0,
                                              sliding_window=None, tie_word_embeddings=False,
                                              rms_norm_eps=1e-5))}),
    # Gemma's head size would default to 256 in a tiny model: it follows the spec there instead
    Family("gemma", (Architecture("gemma", "GemmaConfig", {"head_dim": None}, Gguf("gemma", False, norm_offset=1.0),
                                  unread_in_recompute=_DOWN),
                     Architecture("gemma2", "Gemma2Config", {"head_dim": None, "query_pre_attn_scalar": None},
                                  Gguf("gemma2", False, norm_offset=1.0, extras=_GEMMA_GGUF)),
                     Architecture("gemma3_text", "Gemma3TextConfig",
                                  {"head_dim": None, "query_pre_attn_scalar": None},
                                  Gguf("gemma3", False, norm_offset=1.0, extras=_GEMMA_GGUF))),
           _ATTN + _MLP, pieces=_NO_OPS, lora_groups=(_QKV, _GATE_UP), bench={
               "gemma3-1b": ("gemma3_text", dict(vocab_size=262144, hidden_size=1152, intermediate_size=6912,
                                                 num_hidden_layers=26, num_attention_heads=4, num_key_value_heads=1,
                                                 head_dim=256, query_pre_attn_scalar=256, sliding_window=512,
                                                 max_position_embeddings=32768, rope_theta=1000000.0,
                                                 tie_word_embeddings=True, rms_norm_eps=1e-6))}),
    # Phi-3's checkpoints already hold q/k/v and gate/up as one linear each (qkv_proj, gate_up_proj): no groups
    # llama.cpp turns Phi-3's sliding window off (a warning when loading): stay within it
    Family("phi", (Architecture("phi3", "Phi3Config", {"tie_word_embeddings": False},
                                Gguf("phi3", False, sliding_window_caps_context=True), _DOWN),),
           ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"), bench={
               "phi3.5-mini": ("phi3", dict(vocab_size=32064, hidden_size=3072, intermediate_size=8192,
                                            num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                                            max_position_embeddings=131072, rope_theta=10000.0,
                                            tie_word_embeddings=False, rms_norm_eps=1e-5))}),
    # LFM2 alternates short-convolution and attention blocks (a tiny model alternates them too: models/tiny.py);
    # a tiny one would round its MLP width up to a multiple of 256 and follows the spec instead
    Family("lfm2", (Architecture("lfm2", "Lfm2Config", {"block_auto_adjust_ff_dim": False, "layer_types": None},
                                 Gguf("lfm2", False, extras=("shortconv",)),
                                 unread_in_recompute=("feed_forward.w2",)),),
           ("q_proj", "k_proj", "v_proj", "out_proj", "in_proj", "w1", "w2", "w3"), pieces=_NO_OPS,
           lora_groups=(_QKV, ("feed_forward", ("w1", "w3"), ())), bench={
               "lfm2-1.2b": ("lfm2", dict(vocab_size=65536, hidden_size=2048, intermediate_size=12288,
                                          num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                                          full_attn_idxs=[2, 5, 8, 10, 12, 14], max_position_embeddings=128000,
                                          rope_theta=1000000.0, tie_word_embeddings=True, norm_eps=1e-5))}),
)


@dataclass(frozen=True)
class Licence:
    name: str
    commercial: bool  # commercial use allowed (under the conditions in `terms`)
    terms: str


LICENCES: dict[str, Licence] = {lic.name: lic for lic in (
    Licence("apache-2.0", True, "Apache 2.0"),
    Licence("mit", True, "MIT"),
    Licence("llama3.1", True, "Llama 3.1 Community License: commercial use under 700M monthly users, attribution"),
    Licence("llama3.2", True, "Llama 3.2 Community License: commercial use under 700M monthly users, attribution"),
    Licence("gemma", True, "Gemma Terms of Use: commercial use allowed, within Google's use policy"),
    Licence("lfm1.0", False, "LFM Open License v1.0: commercial use only below USD 10M annual revenue"),
)}


@dataclass(frozen=True)
class KnownModel:
    hub_id: str
    family: str
    params_b: float
    instruct: bool  # post-trained to follow instructions (has a chat template); False: a base model
    license: str  # a key of LICENCES
    shape: str  # its config: a `Family.bench` shape name (the public config.json values)
    pair: str | None = None  # the base model of an instruct one, the instruct model of a base one
    template: str = ""  # the chat template's kind; "" for a base model without one
    prequantized: bool = False  # weights stored in 4-bit NF4 (bitsandbytes): it trains with --method qlora only

    @property
    def licence(self) -> Licence:
        return LICENCES[self.license]

    @property
    def config(self) -> tuple[str, dict]:
        """(model_type, config.json values) of the public model."""
        family = next(f for f in FAMILIES if f.name == self.family)
        return family.bench[self.shape]


def _pair(base: str, instruct: str, family: str, params_b: float, license: str, shape: str, template: str,
          base_template: str = "") -> tuple[KnownModel, KnownModel]:
    return (KnownModel(instruct, family, params_b, True, license, shape, base, template),
            KnownModel(base, family, params_b, False, license, shape, instruct, base_template))


KNOWN_MODELS: tuple[KnownModel, ...] = (
    # Qwen2.5's base models ship the same ChatML template as their instruct models
    *_pair("Qwen/Qwen2.5-0.5B", "Qwen/Qwen2.5-0.5B-Instruct", "qwen", 0.5, "apache-2.0", "qwen-0.5b", "chatml",
           "chatml"),
    *_pair("Qwen/Qwen2.5-1.5B", "Qwen/Qwen2.5-1.5B-Instruct", "qwen", 1.5, "apache-2.0", "qwen-1.5b", "chatml",
           "chatml"),
    *_pair("Qwen/Qwen2.5-7B", "Qwen/Qwen2.5-7B-Instruct", "qwen", 7.6, "apache-2.0", "qwen-7b", "chatml", "chatml"),
    *_pair("Qwen/Qwen3-0.6B-Base", "Qwen/Qwen3-0.6B", "qwen", 0.6, "apache-2.0", "qwen3-0.6b", "chatml (thinking)"),
    *_pair("meta-llama/Llama-3.2-1B", "meta-llama/Llama-3.2-1B-Instruct", "llama", 1.2, "llama3.2", "llama-1b",
           "llama3"),
    *_pair("meta-llama/Llama-3.1-8B", "meta-llama/Llama-3.1-8B-Instruct", "llama", 8.0, "llama3.1", "llama-8b",
           "llama3"),
    *_pair("mistralai/Mistral-7B-v0.3", "mistralai/Mistral-7B-Instruct-v0.3", "mistral", 7.2, "apache-2.0",
           "mistral-7b", "mistral [INST]"),
    *_pair("google/gemma-3-1b-pt", "google/gemma-3-1b-it", "gemma", 1.0, "gemma", "gemma3-1b", "gemma"),
    KnownModel("microsoft/Phi-3.5-mini-instruct", "phi", 3.8, True, "mit", "phi3.5-mini", template="phi3"),
    KnownModel("LiquidAI/LFM2-1.2B", "lfm2", 1.2, True, "lfm1.0", "lfm2-1.2b", template="chatml (lfm2)"),
    # pre-quantized checkpoints (NF4, bitsandbytes): smaller downloads, straight into QLoRA
    KnownModel("unsloth/Qwen2.5-7B-Instruct-bnb-4bit", "qwen", 7.6, True, "apache-2.0", "qwen-7b",
               template="chatml", prequantized=True),
    KnownModel("unsloth/Meta-Llama-3.1-8B-Instruct-bnb-4bit", "llama", 8.0, True, "llama3.1", "llama-8b",
               template="llama3", prequantized=True),
)

# a chat template's kind, by a marker its text holds (a local model's tokenizer_config.json)
TEMPLATE_MARKERS = (("<|im_start|>", "chatml"), ("<|start_header_id|>", "llama3"), ("[INST]", "mistral [INST]"),
                    ("<start_of_turn>", "gemma"), ("<|assistant|>", "phi3"))

PREQUANTIZED_SUFFIX = "bnb-4bit"  # how pre-quantized bitsandbytes checkpoints are named on the Hub


def is_prequantized(model: str, config: dict | None = None) -> bool:
    """A checkpoint stored in 4 bits: named so, or its config.json says so (a local folder, the Hub cache)."""
    known = known_model(model)
    if known is not None:
        return known.prequantized
    quant = (config or {}).get("quantization_config") or {}
    return model.rstrip("/").endswith(PREQUANTIZED_SUFFIX) or bool(quant.get("load_in_4bit"))


def supports(family: Family, model_type: str) -> dict[str, bool]:
    """What tunery supports for a family's architecture: its fast path, packed rows (attention kept within each
    example; not across a convolution over the sequence), GGUF export, QLoRA."""
    arch = family.architecture(model_type)
    return {"fast path": bool(family.pieces), "packing": family.packing, "gguf": arch.gguf is not None,
            "qlora": True}


def family_of(model_type: str) -> Family | None:
    return next((f for f in FAMILIES if model_type in f.model_types), None)


def family_of_model(model) -> Family | None:
    """The family of a transformers model (a PEFT-wrapped one too), by its config's model_type."""
    config = getattr(model, "config", None)
    return family_of(getattr(config, "model_type", ""))


def architectures() -> tuple[Architecture, ...]:
    """Every architecture of every family, in catalogue order."""
    return tuple(a for f in FAMILIES for a in f.architectures)


def architecture_of(model_type: str) -> Architecture | None:
    return next((a for a in architectures() if a.model_type == model_type), None)


def bench_shapes() -> dict[str, tuple[str, str, dict]]:
    """Benchmark shape name -> (model_type, transformers config class, config values), over all families."""
    return {name: (mt, architecture_of(mt).config_class, kw)
            for f in FAMILIES for name, (mt, kw) in f.bench.items()}


def known_model(hub_id: str) -> KnownModel | None:
    return next((m for m in KNOWN_MODELS if m.hub_id == hub_id), None)
