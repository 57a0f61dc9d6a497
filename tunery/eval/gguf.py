"""`tunery eval RUN --gguf FILE...`: exported GGUF files scored through llama.cpp on the run's held-out data, beside
the torch model they came from: held-out loss (from llama.cpp's logits), exact match, ROUGE-L, and the share of
answers identical to torch's, so what a quantization costs on the user's own task shows before it ships.

Both sides get the same token ids (the run's tokenizer renders the chat template) and decode greedily, stopping at
the end-of-turn tokens; replies are decoded with the run's tokenizer. Written to RUN/eval/gguf_report.json and .md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from tunery.data.tokenize import IGNORE, Tokenized
from tunery.errors import ExportError


@dataclass(frozen=True)
class GgufModel:
    """A GGUF file to score, with the LoRA GGUF llama.cpp loads over it (None: the file alone)."""

    path: Path
    adapter: Path | None = None

    @property
    def label(self) -> str:
        return f"{self.adapter.name} over {self.path.name}" if self.adapter else self.path.name


def measure_gguf(model: GgufModel, tokenizer, sequences: list[Tokenized], conversations: list[list[dict]],
                 max_new_tokens: int, on_item=None) -> tuple[dict, list[str]]:
    """({loss, perplexity, tokens}, greedy replies) of `model` through llama.cpp."""
    from tunery.data.templates import render

    if not Path(model.path).is_file():
        raise ExportError(f"{model.path}: no such GGUF file")
    prompt_ids = [tokenizer.encode(render(tokenizer, c, add_generation_prompt=True), add_special_tokens=False)
                  for c in conversations]
    longest = max([len(s.input_ids) for s in sequences] + [len(p) + max_new_tokens for p in prompt_ids])
    llm, llama_cpp = _load(model, longest + 8)
    try:
        if llm.n_vocab() < len(tokenizer):  # another model's file: its ids would index past the vocabulary
            raise ExportError(f"{model.path} has {llm.n_vocab()} tokens, the run's tokenizer {len(tokenizer)}: it is "
                              "not an export of this run")
        loss = _held_out_loss(llm, sequences, on_item)
        vocab = llama_cpp.llama_model_get_vocab(llm.model)
        replies = []
        for ids in prompt_ids:
            replies.append(tokenizer.decode(_greedy(llama_cpp, llm, vocab, ids, max_new_tokens),
                                            skip_special_tokens=True).strip())
            if on_item:
                on_item()
    finally:
        llm.close()
    return loss, replies


def _load(model: GgufModel, n_ctx: int):
    from tunery.export.gguf import require_llama_cpp
    from tunery.export.verify import load_llama

    return load_llama(model.path, n_ctx, model.adapter), require_llama_cpp()


def _held_out_loss(llm, sequences: list[Tokenized], on_item=None) -> dict:
    """Mean next-token cross-entropy per label token, as tunery.train.held_out_loss counts it."""
    import numpy as np

    total, count = 0.0, 0
    for seq in sequences:
        llm.reset()
        llm.eval(seq.input_ids)
        logits = np.asarray(llm.scores[: len(seq.input_ids)], dtype=np.float64)  # (seq, vocab)
        targets = np.asarray(seq.labels[1:])
        rows = np.nonzero(targets != IGNORE)[0]  # position t predicts label t+1
        if len(rows):
            picked = logits[rows]
            top = picked.max(axis=1, keepdims=True)
            log_norm = top[:, 0] + np.log(np.exp(picked - top).sum(axis=1))
            total += float((log_norm - picked[np.arange(len(rows)), targets[rows]]).sum())
            count += len(rows)
        if on_item:
            on_item()
    loss = total / max(count, 1) if count else float("nan")
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)) if count else float("nan"), "tokens": count}


def _greedy(llama_cpp, llm, vocab, ids: list[int], max_new_tokens: int) -> list[int]:
    import numpy as np

    llm.reset()
    llm.eval(ids)
    generated: list[int] = []
    for _ in range(max_new_tokens):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        generated.append(token)
        if llama_cpp.llama_vocab_is_eog(vocab, token):
            break
        llm.eval([token])
    return generated
