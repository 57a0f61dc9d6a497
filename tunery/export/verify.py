"""Check a GGUF file against the torch model it came from: same tokens, same next-token logits, same greedy text.

    python -c "from pathlib import Path; from tunery.export.verify import verify_gguf; \
print(verify_gguf(Path('model.f16.gguf'), Path('merged')))"

Both sides get the same token ids (the HF tokenizer's rendering of the chat template); llama.cpp's own tokenization
of the same text is compared separately. What each quantization must show is data (`ACCEPTANCE`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from tunery.errors import ExportError


@dataclass(frozen=True)
class Acceptance:
    """What a GGUF of one quantization must show against the torch model (besides loading and generating)."""

    min_top1: float | None  # share of prompts whose next-token argmax equals torch's; None: reported only
    identical_generations: bool  # greedy generations equal torch's token for token, or part only at a near tie
    same_tokenization: bool  # llama.cpp tokenizes every rendered prompt exactly as the HF tokenizer does


# every quantization must also stop (at an end-of-generation token) on each prompt where torch stops
ACCEPTANCE: dict[str, Acceptance] = {
    "f16": Acceptance(min_top1=1.0, identical_generations=True, same_tokenization=True),
    "q8_0": Acceptance(min_top1=0.95, identical_generations=False, same_tokenization=False),
    "q6_k": Acceptance(min_top1=None, identical_generations=False, same_tokenization=False),
    "q5_k_m": Acceptance(min_top1=None, identical_generations=False, same_tokenization=False),
    "q4_k_m": Acceptance(min_top1=None, identical_generations=False, same_tokenization=False),
}

DEFAULT_PROMPTS: list[list[dict]] = [
    [{"role": "user", "content": "Hello! Who are you?"}],
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write the number 1234 in words."}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}],
    [{"role": "user", "content": "Rewrite this date as YYYY-MM-DD: June 3, 1985"}],
]


@dataclass
class _Run:
    """One prompt through one engine: logits at every prompt position (seq, vocab) and the greedy continuation."""

    logits: object
    generated: list[int]
    stopped: bool


def verify_gguf(gguf_path: Path, model_dir: Path, prompts: list[list[dict]] | None = None, quant: str = "f16",
                max_new_tokens: int = 16, torch_adapter: Path | None = None,
                gguf_adapter: Path | None = None) -> dict:
    """Compare `gguf_path` with the torch model in `model_dir`; the report, or ExportError with the numbers.

    `torch_adapter`: a PEFT adapter folder over `model_dir` on the torch side (its tokenizer too); `gguf_adapter`:
    a LoRA GGUF llama.cpp loads over `gguf_path`."""
    from tunery.data.templates import render, stop_token_ids

    if quant not in ACCEPTANCE:
        raise ExportError(f"no acceptance rule for quantization {quant!r}; known: {', '.join(ACCEPTANCE)}")
    gguf_path, model_dir = Path(gguf_path), Path(model_dir)
    if not gguf_path.is_file():
        raise ExportError(f"{gguf_path} does not exist")
    prompts = prompts or DEFAULT_PROMPTS
    model, tokenizer = _load_torch(model_dir, torch_adapter)
    texts = [render(tokenizer, p, add_generation_prompt=p[-1]["role"] != "assistant") for p in prompts]
    ids = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    stops = stop_token_ids(tokenizer)
    torch_runs = [_torch_greedy(model, x, set(stops), max_new_tokens) for x in ids]
    llama_tokens, llama_runs, stops_are_eog = _llama_side(gguf_path, texts, ids, stops, max_new_tokens,
                                                          gguf_adapter)
    report = _compare(ids, llama_tokens, torch_runs, llama_runs)
    report.update(_partings(model, ids, torch_runs, llama_runs, report["max_abs_logit_diff"]))
    report.update(gguf=str(gguf_path), gguf_adapter=str(gguf_adapter) if gguf_adapter else None, quant=quant,
                  stop_tokens_are_eog=stops_are_eog,
                  acceptance=asdict(ACCEPTANCE[quant]), tensor_types=_tensor_types(gguf_path),
                  examples=[{"prompt": texts[i], "torch": tokenizer.decode(torch_runs[i].generated),
                             "gguf": tokenizer.decode(llama_runs[i].generated)} for i in range(min(3, len(ids)))])
    failures = _failures(report, ACCEPTANCE[quant])
    if failures:
        raise ExportError(f"{gguf_path.name} ({quant}) does not match the torch model: " + "; ".join(failures))
    return report


def _tensor_types(gguf_path: Path) -> dict[str, int]:
    from tunery.export.gguf import tensor_types

    return tensor_types(gguf_path)


def _load_torch(model_dir: Path, adapter: Path | None = None):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(adapter or model_dir)
    # float32 whatever the stored dtype: the reference should carry no rounding of its own
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter is not None:
        from tunery.models.lora import load_adapter

        model = load_adapter(model, adapter)
    return model.eval(), tokenizer


def _torch_greedy(model, ids: list[int], stops: set[int], max_new_tokens: int) -> _Run:
    """Plain argmax decoding (no generation_config: its penalties would make the comparison unfair)."""
    import torch

    with torch.no_grad():
        out = model(torch.tensor([ids]), use_cache=True)
        logits = out.logits[0].numpy()  # (seq, vocab)
        generated: list[int] = []
        for _ in range(max_new_tokens):
            token = int(out.logits[0, -1].argmax())
            generated.append(token)
            if token in stops:
                return _Run(logits, generated, stopped=True)
            out = model(torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True)
    return _Run(logits, generated, stopped=False)


def _partings(model, ids: list[list[int]], torch_runs: list[_Run], llama_runs: list[_Run], noise: float) -> dict:
    """Where each pair of greedy generations that differ first parts, and whether it parts at a near tie.

    Two engines that agree to within rounding can still pick different tokens where torch's two best logits
    are nearly equal: from there on the texts differ, though neither engine is wrong. At the first differing
    step, torch's margin between its token and the GGUF's is measured (one more forward of torch over the
    shared prefix). It is a near tie when that margin is within twice `noise`, the largest difference between
    the two engines' logits seen on the prompts: each of the two logits may be off by that much.
    """
    import torch

    partings = []
    for i, (t, g) in enumerate(zip(torch_runs, llama_runs)):
        if t.generated == g.generated:
            continue
        step = next((k for k, (a, b) in enumerate(zip(t.generated, g.generated)) if a != b), None)
        if step is None:  # one is a prefix of the other: they part at a stop, which no rounding explains
            partings.append({"prompt": i, "step": min(len(t.generated), len(g.generated)), "torch_margin": None,
                             "near_tie": False})
            continue
        with torch.no_grad():
            logits = model(torch.tensor([ids[i] + t.generated[:step]])).logits[0, -1]
        margin = float(logits[t.generated[step]] - logits[g.generated[step]])
        partings.append({"prompt": i, "step": step, "torch_margin": margin, "near_tie": margin <= 2 * noise})
    n = len(torch_runs)
    return {"generation_partings": partings,
            "generations_matching": (n - sum(not p["near_tie"] for p in partings)) / n}


def load_llama(gguf_path: Path, n_ctx: int, adapter: Path | None = None):
    """llama.cpp's model (with the LoRA GGUF `adapter` over it), keeping the logits of every position."""
    from tunery.export.gguf import require_llama_cpp

    llama_cpp = require_llama_cpp()
    extra = {"lora_path": str(adapter)} if adapter is not None else {}
    try:
        return llama_cpp.Llama(model_path=str(gguf_path), n_ctx=n_ctx, n_batch=n_ctx, logits_all=True,
                               verbose=False, **extra)
    except (ValueError, RuntimeError) as e:
        what = f"{gguf_path} with the adapter {adapter}" if adapter is not None else str(gguf_path)
        raise ExportError(f"llama.cpp cannot load {what}: {e}") from e


def _llama_side(gguf_path: Path, texts: list[str], ids: list[list[int]], stops: list[int], max_new_tokens: int,
                adapter: Path | None = None):
    """llama.cpp's tokenization of each text, its run on the HF ids, and whether each HF stop token ends generation."""
    from tunery.export.gguf import require_llama_cpp

    llama_cpp = require_llama_cpp()
    llm = load_llama(gguf_path, max(len(x) for x in ids) + max_new_tokens + 8, adapter)
    try:
        vocab = llama_cpp.llama_model_get_vocab(llm.model)
        tokens = [llm.tokenize(t.encode("utf-8"), add_bos=False, special=True) for t in texts]
        runs = [_llama_greedy(llama_cpp, llm, vocab, x, max_new_tokens) for x in ids]
        stops_are_eog = all(llama_cpp.llama_vocab_is_eog(vocab, t) for t in stops)
    finally:
        llm.close()
    return tokens, runs, stops_are_eog


def _llama_greedy(llama_cpp, llm, vocab, ids: list[int], max_new_tokens: int) -> _Run:
    import numpy as np

    llm.reset()
    llm.eval(ids)
    logits = np.array(llm.scores[: len(ids)])  # copy: the buffer is reused by the next eval
    generated: list[int] = []
    for _ in range(max_new_tokens):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        generated.append(token)
        if llama_cpp.llama_vocab_is_eog(vocab, token):
            return _Run(logits, generated, stopped=True)
        llm.eval([token])
    return _Run(logits, generated, stopped=False)


def _compare(ids: list[list[int]], llama_tokens: list[list[int]], torch_runs: list[_Run],
             llama_runs: list[_Run]) -> dict:
    import numpy as np

    n = len(ids)
    pairs = list(zip(torch_runs, llama_runs))
    last_agree = [int(t.logits[-1].argmax() == g.logits[-1].argmax()) for t, g in pairs]
    all_agree = np.concatenate([t.logits.argmax(-1) == g.logits.argmax(-1) for t, g in pairs])
    return {
        "prompts": n,
        "tokenization_match": sum(a == b for a, b in zip(ids, llama_tokens)) / n,
        "tokenization_mismatches": [i for i, (a, b) in enumerate(zip(ids, llama_tokens)) if a != b],
        "top1_agreement": sum(last_agree) / n,
        "top1_disagreements": [i for i, a in enumerate(last_agree) if not a],
        "top1_agreement_all_positions": float(all_agree.mean()),
        "max_abs_logit_diff": float(max(np.abs(t.logits - g.logits).max() for t, g in pairs)),
        "max_abs_logit": float(max(np.abs(t.logits).max() for t, _ in pairs)),
        "generations_identical": sum(t.generated == g.generated for t, g in pairs) / n,
        "torch_stopped": sum(t.stopped for t, _ in pairs),
        "gguf_stopped": sum(g.stopped for _, g in pairs),
        "stops_missed": [i for i, (t, g) in enumerate(pairs) if t.stopped and not g.stopped],
    }


def _failures(report: dict, rule: Acceptance) -> list[str]:
    failures = []
    if rule.same_tokenization and report["tokenization_match"] < 1.0:
        failures.append(f"llama.cpp tokenizes prompts {report['tokenization_mismatches']} differently "
                        f"from the HF tokenizer (match {report['tokenization_match']:.0%})")
    if rule.min_top1 is not None and report["top1_agreement"] < rule.min_top1:
        failures.append(f"next-token top-1 agreement {report['top1_agreement']:.1%} < {rule.min_top1:.0%} "
                        f"(prompts {report['top1_disagreements']}; max |logit diff| "
                        f"{report['max_abs_logit_diff']:.4f} on logits up to {report['max_abs_logit']:.2f})")
    if rule.identical_generations and report["generations_matching"] < 1.0:
        apart = [p for p in report["generation_partings"] if not p["near_tie"]]
        failures.append(f"greedy generations identical on only {report['generations_identical']:.0%} of prompts; "
                        f"prompts {[p['prompt'] for p in apart]} part where torch's own margin between the two "
                        f"tokens is over twice the largest logit difference ({report['max_abs_logit_diff']:.4f})")
    if not report["stop_tokens_are_eog"]:
        failures.append("llama.cpp does not end generation at every stop token of the chat template")
    if report["stops_missed"]:
        failures.append(f"generation does not stop on prompts {report['stops_missed']} where torch stops "
                        f"(torch stopped on {report['torch_stopped']}, gguf on {report['gguf_stopped']})")
    return failures
