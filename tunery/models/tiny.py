"""Build small models offline: a real `transformers` architecture with random weights from a fixed seed,
and a byte-level BPE tokenizer trained with `tokenizers` on the given texts, saved as an ordinary model
folder that `AutoModelForCausalLM` / `AutoTokenizer` (and so every tunery verb) load like a Hub download.

    python -c "from tunery.models.tiny import build_tiny_model; build_tiny_model('/tmp/tiny', ['hello'])"
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tunery.data.templates import CHATML_TEMPLATE
from tunery.models.catalog import architecture_of, architectures

_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


@dataclass(frozen=True)
class TinySpec:
    """Shape of a tiny model; the defaults learn the bundled date task on a CPU in about a minute."""

    family: str = "qwen2"
    hidden_size: int = 256
    intermediate_size: int = 768
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    vocab_size: int = 512
    seed: int = 0


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512):
    """A byte-level BPE tokenizer (digits split one by one) with ChatML special tokens and template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=_SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=["<|im_start|>"])
    fast.chat_template = CHATML_TEMPLATE
    return fast


# the architectures a tiny model can be built for: every one in the catalogue (its `tiny` settings)
FAMILIES = tuple(a.model_type for a in architectures())


def make_config(spec: TinySpec, tokenizer):
    """A `transformers` config of the spec's family sized to the tokenizer."""
    import transformers

    arch = architecture_of(spec.family)
    if arch is None:
        raise ValueError(f"tiny models exist for {sorted(FAMILIES)}, not {spec.family!r}")
    cls_name, extra = arch.config_class, arch.tiny
    head_dim = spec.hidden_size // spec.num_heads
    extra = {**extra, **{k: head_dim for k in ("head_dim", "query_pre_attn_scalar") if k in extra}}
    if "layer_types" in extra:  # LFM2: short-convolution and attention blocks alternate, as real configs mix them
        extra["layer_types"] = ["conv" if i % 2 == 0 else "full_attention" for i in range(spec.num_layers)]
    return getattr(transformers, cls_name)(
        vocab_size=len(tokenizer), hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads, max_position_embeddings=512,
        # std 1/sqrt(hidden) instead of the 0.02 meant for wide models: with frozen random (tied) output
        # embeddings, 0.02 caps a tiny model's logits near 1 and LoRA could never become confident
        initializer_range=spec.hidden_size**-0.5,
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **extra)


def build_tiny_model(out_dir: str | Path, texts: Iterable[str], spec: TinySpec = TinySpec()) -> Path:
    """Train a tokenizer on `texts`, build a random-init model of `spec`, save both to `out_dir`."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    out = Path(out_dir)
    tokenizer = train_tokenizer(texts, spec.vocab_size)
    torch.manual_seed(spec.seed)
    model = AutoModelForCausalLM.from_config(make_config(spec, tokenizer), dtype=torch.float32)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def corpus_of(rows: list[dict]) -> list[str]:
    """Tokenizer training text from chat rows: contents plus the role names the template writes."""
    texts = ["system\n", "user\n", "assistant\n"]
    for row in rows:
        texts += [m["content"] for m in row.get("messages", [])] or [str(v) for v in row.values()]
    return texts
