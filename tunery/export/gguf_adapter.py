"""A run's LoRA adapter alone as a llama.cpp LoRA GGUF (a few MB), to load over the base model's GGUF.

    python -c "from pathlib import Path; from tunery.export.gguf_adapter import write_adapter_gguf; \
write_adapter_gguf(Path('runs/RUN/adapter'), Path('base-model-folder'), Path('adapter.gguf'))"

The facts this relies on come from llama.cpp (convert_lora_to_gguf.py, src/llama-adapter.cpp): the file's
general.type is "adapter" and adapter.type "lora", its architecture is the base's; each adapted weight W gets
`<W's GGUF name>.lora_a` (rank, in) and `.lora_b` (out, rank), and llama.cpp adds alpha / rank * B(A x) to W x.
Rows that the base's conversion reorders (q/k of the `llama` architecture, see gguf.py) are reordered in B too.
"""

from __future__ import annotations

import json
import math
from contextlib import ExitStack
from pathlib import Path

from tunery.errors import ExportError
from tunery.export.gguf import Tensor, family_for, gguf_module, interleave_rope_halves, natural_key, write_file

_PREFIX = "base_model.model."
_SUFFIXES = {".lora_A.weight": "lora_a", ".lora_B.weight": "lora_b"}


def write_adapter_gguf(adapter_dir: Path, base_dir: Path, out_path: Path, progress: bool = True) -> Path:
    """Write the PEFT adapter in `adapter_dir` (trained on the model in `base_dir`) as a LoRA GGUF."""
    from transformers import AutoConfig

    gguf = gguf_module()
    adapter_dir, base_dir, out_path = Path(adapter_dir), Path(base_dir), Path(out_path)
    settings = _lora_settings(adapter_dir)
    config = AutoConfig.from_pretrained(base_dir)
    family = family_for(config.model_type)
    writer = gguf.GGUFWriter(None, family.arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_name(f"{adapter_dir.resolve().parent.name} adapter")
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, settings["alpha"])
    with ExitStack() as stack:
        write_file(writer, _plan(stack, adapter_dir, config, family), out_path, progress)
    return out_path


def _lora_settings(adapter_dir: Path) -> dict:
    """alpha as llama.cpp reads it (scale = alpha / rank), from adapter_config.json; ExportError for an adapter
    llama.cpp's LoRA cannot express."""
    path = adapter_dir / "adapter_config.json"
    if not path.is_file():
        raise ExportError(f"{adapter_dir} has no adapter_config.json; --gguf-adapter needs a LoRA run (this run "
                          "trained the full model: export it with --gguf instead)")
    cfg = json.loads(path.read_text())
    if cfg.get("peft_type", "LORA") != "LORA" or cfg.get("use_dora"):
        raise ExportError(f"llama.cpp loads plain LoRA adapters only; this one is {cfg.get('peft_type')}"
                          f"{' with DoRA' if cfg.get('use_dora') else ''}: export the merged model (--gguf)")
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise ExportError("the adapter has per-layer ranks or alphas (rank_pattern/alpha_pattern), which a LoRA "
                          "GGUF (one alpha) cannot hold: export the merged model (--gguf)")
    r, alpha = cfg["r"], cfg["lora_alpha"]
    # rsLoRA scales by alpha / sqrt(r); llama.cpp by alpha / r
    return {"r": r, "alpha": float(alpha * math.sqrt(r) if cfg.get("use_rslora") else alpha)}


def _adapter_file(adapter_dir: Path) -> Path:
    path = adapter_dir / "adapter_model.safetensors"
    if not path.is_file():
        raise ExportError(f"{adapter_dir} has no adapter_model.safetensors")
    return path


def _plan(stack: ExitStack, adapter_dir: Path, config, family) -> list[Tensor]:
    from safetensors import safe_open

    gguf = gguf_module()
    arch = {name: arch for arch, name in gguf.MODEL_ARCH_NAMES.items()}[family.arch]
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    handle = stack.enter_context(safe_open(_adapter_file(adapter_dir), framework="pt"))
    planned, other = [], []
    for key in handle.keys():
        suffix = next((s for s in _SUFFIXES if key.endswith(s)), None)
        if suffix is None or not key.startswith(_PREFIX):
            other.append(key)
            continue
        module = key[len(_PREFIX):-len(suffix)]
        base_name = names.get_name(module + ".weight", try_suffixes=(".weight",))
        if base_name is None:
            raise ExportError(f"adapter tensor {key} adapts {module}, which has no GGUF name in llama.cpp's "
                              f"{family.arch} architecture")
        shape = tuple(handle.get_slice(key).get_shape())
        planned.append(Tensor(f"{base_name}.{_SUFFIXES[suffix]}", shape, gguf.GGMLQuantizationType.F16,
                               _loader(handle, key, module, config, family)))
    if other:
        raise ExportError(f"the adapter holds more than LoRA matrices ({', '.join(other[:3])}"
                          f"{', ...' if len(other) > 3 else ''}: trained embedding rows or full modules), which a "
                          "LoRA GGUF cannot carry: export the merged model (--gguf) instead")
    if not planned:
        raise ExportError(f"{adapter_dir} holds no LoRA weights")
    return sorted(planned, key=lambda t: natural_key(t.name))


def _loader(handle, key: str, module: str, config, family):
    def load():
        w = handle.get_tensor(key).float()
        if family.permute_qk and key.endswith(".lora_B.weight"):  # B's rows are W's output rows
            if module.endswith("q_proj"):
                w = interleave_rope_halves(w, config.num_attention_heads)
            elif module.endswith("k_proj"):
                w = interleave_rope_halves(w, config.num_key_value_heads or config.num_attention_heads)
        return w.numpy()

    return load
