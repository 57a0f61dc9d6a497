"""The run page's chat: the base model and the fine-tuned one answer the same conversation, side by side.

The run last chatted with stays loaded (one at a time: the console should not grow by a model per run opened). A
LoRA run's two models share the base weights: the base answers with the adapter switched off, as `tunery eval` and
`tunery chat --base` do; a full fine-tune loads both.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path


@dataclass
class _Loaded:
    key: tuple
    base: object
    tuned: object
    tokenizer: object
    device: str


class ChatModels:
    def __init__(self) -> None:
        self._loaded: _Loaded | None = None
        self._lock = threading.Lock()  # one generation at a time: switching the adapter off is model state

    def replies(self, run: Path, turns: list[dict], prompt: str, system: str | None,
                max_new_tokens: int) -> dict[str, str]:
        """{"base": reply, "fine_tuned": reply} to `prompt` after the earlier `turns` ({"user", "base",
        "fine_tuned"}: each model sees its own earlier answers), greedy, with the run's chat template."""
        from tunery.eval.generate import generate_replies

        def conversation(side: str) -> list[dict]:
            messages = [{"role": "system", "content": system}] if system else []
            for turn in turns:
                messages += [{"role": "user", "content": turn["user"]}, {"role": "assistant", "content": turn[side]}]
            return messages + [{"role": "user", "content": prompt}]

        with self._lock:
            m = self._load(run)
            tuned = generate_replies(m.tuned, m.tokenizer, [conversation("fine_tuned")], max_new_tokens, m.device)[0]
            if hasattr(m.tuned, "disable_adapter"):
                with m.tuned.disable_adapter():
                    base = generate_replies(m.tuned, m.tokenizer, [conversation("base")], max_new_tokens, m.device)[0]
            else:
                base = generate_replies(m.base, m.tokenizer, [conversation("base")], max_new_tokens, m.device)[0]
        return {"base": base, "fine_tuned": tuned}

    def _load(self, run: Path) -> _Loaded:
        from tunery.models.load import pick_device
        from tunery.run import load_trained, open_run, trained_weights

        _, weights = trained_weights(run)
        key = (run, weights.stat().st_mtime_ns)  # a run trained again is loaded again
        if self._loaded is None or self._loaded.key != key:
            self._loaded = None  # let the previous run's weights go before the next load
            _, cfg = open_run(run)
            device = pick_device(cfg.device)
            base, tuned, tokenizer = load_trained(run, device)
            self._loaded = _Loaded(key, base, tuned, tokenizer, device)
        return self._loaded
