"""A model's size, as memory and time depend on it, read off its config: the model is built on the meta device
(no weights, no memory), so every architecture transformers knows is counted exactly, from data only.

    shape = shape_of("llama", {"hidden_size": 4096, ...})     # -> Shape
    shape = shape_for_model("Qwen/Qwen2.5-7B-Instruct")        # a known model, a local folder or the Hub cache
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

from tunery.errors import ModelError


@dataclass(frozen=True)
class Linear:
    name: str  # its attribute name in the block (q_proj, gate_up_proj, w1, ...)
    block: int  # index of the decoder block
    n_in: int
    n_out: int


@dataclass(frozen=True)
class Shape:
    model_type: str
    params: int  # every parameter
    hidden: int
    vocab: int
    layers: int
    context: int | None  # max_position_embeddings
    linears: tuple[Linear, ...]  # the decoder blocks' linear layers

    @property
    def params_b(self) -> float:
        return self.params / 1e9

    @property
    def block_linear_params(self) -> int:
        """Parameters of the blocks' linear layers: the ones QLoRA stores in 4 bits."""
        return sum(lin.n_in * lin.n_out for lin in self.linears)

    def lora_params(self, r: int, targets: tuple[str, ...] | list[str] = ()) -> int:
        """Adapter parameters at rank `r` on `targets` (every block linear when empty)."""
        return sum(r * (lin.n_in + lin.n_out) for lin in self.linears if not targets or lin.name in targets)

    @property
    def block_outputs(self) -> int:
        """Output features of the widest block's linears, summed: what one block's working set scales with."""
        per_block: dict[int, int] = {}
        for lin in self.linears:
            per_block[lin.block] = per_block.get(lin.block, 0) + lin.n_out
        return max(per_block.values(), default=self.hidden)

    @property
    def widest_linear(self) -> int:
        return max((lin.n_in * lin.n_out for lin in self.linears), default=0)


def shape_of(model_type: str, values: dict) -> Shape:
    """The shape of a `model_type` model with these config.json values."""
    return _shape(model_type, json.dumps(values, sort_keys=True))


@functools.lru_cache(maxsize=64)
def _shape(model_type: str, values_json: str) -> Shape:
    import torch
    import transformers

    values = json.loads(values_json)
    try:
        config = transformers.AutoConfig.for_model(model_type, **values)
    except ValueError as e:
        raise ModelError(f"transformers does not know the architecture {model_type!r}: {e}") from None
    text = config.get_text_config()
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    linears = []
    for name, module in model.named_modules():
        parts = name.split(".")
        if isinstance(module, torch.nn.Linear) and "layers" in parts:
            block = int(parts[parts.index("layers") + 1])
            linears.append(Linear(parts[-1], block, module.in_features, module.out_features))
    params = sum(p.numel() for p in model.parameters())
    return Shape(model_type, params, text.hidden_size, text.vocab_size, text.num_hidden_layers,
                 getattr(text, "max_position_embeddings", None), tuple(linears))


def read_config(model: str) -> dict | None:
    """config.json of a local model folder, or of a Hub id in the local Hub cache; None when neither is here."""
    folder = Path(model).expanduser()
    if (folder / "config.json").is_file():
        return json.loads((folder / "config.json").read_text())
    if "/" in model and not folder.exists():
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(model, "config.json")
        except Exception:  # a malformed id: not in the cache
            cached = None
        if isinstance(cached, str):
            return json.loads(Path(cached).read_text())
    return None


def shape_for_model(model: str) -> Shape | None:
    """The shape of a known model (the catalogue's config values), a local folder's or a Hub-cached model's
    config.json; None when tunery cannot read it here."""
    from tunery.models.catalog import known_model

    known = known_model(model)
    if known is not None:
        return shape_of(*known.config)
    config = read_config(model)
    if config is None or "model_type" not in config:
        return None
    return shape_of_config(config)


def shape_of_config(config: dict) -> Shape | None:
    """The shape of a config.json's values; None for an architecture transformers cannot build here."""
    config = {k: v for k, v in config.items() if k not in ("architectures", "transformers_version", "torch_dtype",
                                                            "dtype", "quantization_config", "auto_map")}
    model_type = config.pop("model_type", None)
    try:
        return shape_of(model_type, config)
    except (ModelError, TypeError, ValueError, KeyError):
        return None
