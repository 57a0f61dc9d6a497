"""`tunery chat RUN`: talk to a fine-tuned run with its own chat template, replies streamed."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from tunery.progress import console


def chat_command(
    run: Path = typer.Argument(..., help="Run folder written by `tunery train`."),
    prompt: str | None = typer.Option(None, "--prompt", "-p", help="Ask once, print the reply and exit."),
    system: str | None = typer.Option(None, "--system", help="System message (default: the run's)."),
    max_new_tokens: int | None = typer.Option(None, "--max-new-tokens", help="Reply length limit."),
    base: bool = typer.Option(False, "--base", help="Talk to the base model instead, for comparison."),
) -> None:
    """Chat with the fine-tuned model. Type /exit or Ctrl-D to leave, /reset to forget the conversation."""
    from tunery.models.load import pick_device
    from tunery.run import load_trained, open_run

    _, cfg = open_run(run)
    device = pick_device(cfg.device)
    with console.status("loading model"):
        base_model, tuned, tokenizer = load_trained(run, device)
    model = tuned
    if base:  # LoRA: the same weights with the adapter switched off; full fine-tune: the base model itself
        if hasattr(tuned, "disable_adapter"):
            tuned.base_model.disable_adapter_layers()
        else:
            model = base_model
    system = system if system is not None else cfg.system_prompt
    history: list[dict] = [{"role": "system", "content": system}] if system else []
    limit = max_new_tokens or cfg.max_new_tokens
    if prompt is not None:
        _reply(model, tokenizer, history + [{"role": "user", "content": prompt}], limit, device)
        return
    console.print("[dim]/exit to leave, /reset to start over[/]")
    while True:
        try:
            text = input("you> ")
        except EOFError:
            break
        if text.strip() == "/exit":
            break
        if text.strip() == "/reset":
            history = history[:1] if system else []
            continue
        history.append({"role": "user", "content": text})
        history.append({"role": "assistant", "content": _reply(model, tokenizer, history, limit, device)})


def _reply(model, tokenizer, messages: list[dict], max_new_tokens: int, device: str) -> str:
    """Stream one greedy reply to stdout and return it."""
    import threading

    import torch
    from transformers import TextIteratorStreamer

    from tunery.data.templates import render, stop_token_ids

    text = render(tokenizer, messages, add_generation_prompt=True)
    enc = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(device)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    kwargs = dict(**enc, max_new_tokens=max_new_tokens, do_sample=False, streamer=streamer,
                  eos_token_id=stop_token_ids(tokenizer), pad_token_id=tokenizer.pad_token_id)
    worker = threading.Thread(target=lambda: torch.no_grad()(model.generate)(**kwargs))
    worker.start()
    pieces = []
    for piece in streamer:
        pieces.append(piece)
        sys.stdout.write(piece)
        sys.stdout.flush()
    worker.join()
    sys.stdout.write("\n")
    return "".join(pieces).strip()
