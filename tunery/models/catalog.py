"""Model families and known models as data: LoRA targets per family, sizes, licences, instruct or base."""

from __future__ import annotations

from dataclasses import dataclass

_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]  # config.model_type values
    lora_targets: tuple[str, ...]  # all linear layers of a decoder block


FAMILIES: tuple[Family, ...] = (
    Family("llama", ("llama",), _ATTN + _MLP),
    Family("qwen", ("qwen2", "qwen3"), _ATTN + _MLP),
    Family("mistral", ("mistral",), _ATTN + _MLP),
    Family("gemma", ("gemma", "gemma2", "gemma3_text"), _ATTN + _MLP),
    Family("phi", ("phi3",), ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")),
    Family("lfm2", ("lfm2",), ("q_proj", "k_proj", "v_proj", "out_proj", "in_proj", "w1", "w2", "w3")),
)


@dataclass(frozen=True)
class KnownModel:
    hub_id: str
    family: str
    params_b: float
    instruct: bool
    license: str


KNOWN_MODELS: tuple[KnownModel, ...] = (
    KnownModel("Qwen/Qwen2.5-0.5B-Instruct", "qwen", 0.5, True, "apache-2.0"),
    KnownModel("Qwen/Qwen2.5-0.5B", "qwen", 0.5, False, "apache-2.0"),
    KnownModel("Qwen/Qwen2.5-1.5B-Instruct", "qwen", 1.5, True, "apache-2.0"),
    KnownModel("Qwen/Qwen2.5-7B-Instruct", "qwen", 7.6, True, "apache-2.0"),
    KnownModel("Qwen/Qwen3-0.6B", "qwen", 0.6, True, "apache-2.0"),
    KnownModel("meta-llama/Llama-3.2-1B-Instruct", "llama", 1.2, True, "llama3.2"),
    KnownModel("meta-llama/Llama-3.2-1B", "llama", 1.2, False, "llama3.2"),
    KnownModel("meta-llama/Llama-3.1-8B-Instruct", "llama", 8.0, True, "llama3.1"),
    KnownModel("mistralai/Mistral-7B-Instruct-v0.3", "mistral", 7.2, True, "apache-2.0"),
    KnownModel("google/gemma-3-1b-it", "gemma", 1.0, True, "gemma"),
    KnownModel("microsoft/Phi-3.5-mini-instruct", "phi", 3.8, True, "mit"),
    KnownModel("LiquidAI/LFM2-1.2B", "lfm2", 1.2, True, "lfm1.0"),
)


def family_of(model_type: str) -> Family | None:
    return next((f for f in FAMILIES if model_type in f.model_types), None)


def known_model(hub_id: str) -> KnownModel | None:
    return next((m for m in KNOWN_MODELS if m.hub_id == hub_id), None)
