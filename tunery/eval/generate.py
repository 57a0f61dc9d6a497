"""Greedy generation for eval and chat, rendered with the run's chat template."""

from __future__ import annotations

from tunery.data.templates import render, stop_token_ids


def generate_replies(model, tokenizer, conversations: list[list[dict]], max_new_tokens: int, device: str,
                     batch_size: int = 16, on_batch=None) -> list[str]:
    """Greedy replies to each conversation (left-padded batches)."""
    import torch

    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    stops = stop_token_ids(tokenizer)
    replies: list[str] = []
    model.eval()
    try:
        for start in range(0, len(conversations), batch_size):
            chunk = conversations[start : start + batch_size]
            prompts = [render(tokenizer, c, add_generation_prompt=True) for c in chunk]
            enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            with torch.no_grad():
                out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stops,
                                     pad_token_id=tokenizer.pad_token_id)
            replies += tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            if on_batch:
                on_batch(len(chunk))
    finally:
        tokenizer.padding_side = side
    return [r.strip() for r in replies]
