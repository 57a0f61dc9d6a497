"""LoRA through peft: inject with per-family default targets, save/load in PEFT format, merge."""

from __future__ import annotations

from tunery.errors import ModelError
from tunery.models.catalog import family_of


def default_targets(model) -> list[str]:
    """The family's linear layers, or every nn.Linear inside the decoder blocks for unknown families."""
    import torch.nn as nn

    family = family_of(getattr(model.config, "model_type", ""))
    if family:
        return list(family.lora_targets)
    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
             if isinstance(module, nn.Linear) and ".layers." in name}
    if not names:
        raise ModelError("found no linear layers to adapt; set lora_targets explicitly")
    return sorted(names)


def apply_lora(model, r: int, alpha: int, dropout: float, targets: list[str] | None = None,
               new_tokens: list[int] | None = None):
    """Wrap `model` in a PeftModel with fresh LoRA weights on `targets` (family default when empty). The
    embedding rows of `new_tokens` (tokens the base model never learned: tunery.models.load.grow_vocabulary)
    train too, in the input embeddings and, when it is not tied to them, the output layer: PEFT's trainable
    tokens, saved with the adapter and merged by `merge_and_unload`."""
    from peft import LoraConfig, get_peft_model

    targets = targets or default_targets(model)
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = sorted(set(targets) - present)
    if missing:
        raise ModelError(f"lora_targets {missing} are not module names of this model; it has "
                         f"{sorted(n for n in present if 'proj' in n or n.startswith('w'))}")
    trainable_tokens = None
    if new_tokens:
        names = {module: name for name, module in model.named_modules()}
        trainable_tokens = {names[model.get_input_embeddings()].rsplit(".", 1)[-1]: list(new_tokens)}
        output = model.get_output_embeddings()
        if output is not None and output.weight is not model.get_input_embeddings().weight:
            trainable_tokens[names[output].rsplit(".", 1)[-1]] = list(new_tokens)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                        task_type="CAUSAL_LM", trainable_token_indices=trainable_tokens)
    return get_peft_model(model, config)


def load_adapter(base_model, adapter_dir, trainable: bool = False):
    """The adapter on `base_model`; a base whose embeddings are shorter than the adapter's tokenizer (tokens
    added for the run) grows first, so the adapter's trained rows land where they were trained."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    from tunery.models.load import grow_vocabulary

    grow_vocabulary(base_model, AutoTokenizer.from_pretrained(str(adapter_dir)))

    return PeftModel.from_pretrained(base_model, str(adapter_dir), is_trainable=trainable)
