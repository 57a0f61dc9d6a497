"""The GGUF check's allowance for near ties: where two greedy generations part, torch's own margin between the two
tokens decides whether rounding explains it. Runs on a random tiny model, without llama.cpp."""

from __future__ import annotations

import pytest
import torch

from tunery.export.verify import ACCEPTANCE, _failures, _partings, _Run

PROMPT, SHARED = [1, 5, 9], [3, 7]


@pytest.fixture(scope="module")
def model():
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture(scope="module")
def ranked(model):
    """Torch's logits after the prompt and the shared start of the generations, and its tokens best first."""
    with torch.no_grad():
        logits = model(torch.tensor([PROMPT + SHARED])).logits[0, -1]
    return logits, [int(t) for t in logits.argsort(descending=True)]


def test_a_parting_within_the_engines_noise_is_a_near_tie_and_a_wide_one_is_not(model, ranked):
    logits, order = ranked
    best, second, worst = order[0], order[1], order[-1]
    gap, wide = float(logits[best] - logits[second]), float(logits[best] - logits[worst])
    assert wide > 4 * gap  # a random model's worst token is far below its best
    torch_run = _Run(None, SHARED + [best, 2], stopped=False)
    same, close, far = (_Run(None, SHARED + tail, stopped=False) for tail in ([best, 2], [second, 4], [worst, 4]))

    report = _partings(model, [PROMPT] * 3, [torch_run] * 3, [same, close, far], noise=gap)
    partings = report["generation_partings"]
    assert [p["prompt"] for p in partings] == [1, 2]  # identical generations have no parting
    assert [p["step"] for p in partings] == [2, 2]
    assert partings[0]["torch_margin"] == pytest.approx(gap, rel=1e-4)
    assert partings[1]["torch_margin"] == pytest.approx(wide, rel=1e-4)
    assert [p["near_tie"] for p in partings] == [True, False]
    assert report["generations_matching"] == pytest.approx(2 / 3)

    # with less noise between the engines, the same close parting is more than rounding can explain
    tighter = _partings(model, [PROMPT], [torch_run], [close], noise=0.49 * gap)
    assert not tighter["generation_partings"][0]["near_tie"] and tighter["generations_matching"] == 0.0


def test_a_generation_that_stops_early_is_never_a_near_tie(model, ranked):
    _, order = ranked
    longer = _Run(None, SHARED + [order[0]], stopped=False)
    stopped = _Run(None, list(SHARED), stopped=True)
    report = _partings(model, [PROMPT], [longer], [stopped], noise=1e9)
    assert report["generation_partings"] == [{"prompt": 0, "step": 2, "torch_margin": None, "near_tie": False}]


def test_f16_fails_only_on_partings_that_are_not_near_ties():
    base = {"tokenization_match": 1.0, "top1_agreement": 1.0, "generations_identical": 0.5,
            "max_abs_logit_diff": 0.01, "stop_tokens_are_eog": True, "stops_missed": []}
    tie = {"prompt": 0, "step": 3, "torch_margin": 0.015, "near_tie": True}
    apart = {"prompt": 1, "step": 5, "torch_margin": 1.2, "near_tie": False}
    assert _failures({**base, "generation_partings": [tie], "generations_matching": 1.0}, ACCEPTANCE["f16"]) == []
    failures = _failures({**base, "generation_partings": [tie, apart], "generations_matching": 0.5},
                         ACCEPTANCE["f16"])
    assert len(failures) == 1 and "prompts [1] part" in failures[0] and "50%" in failures[0]
    # quantizations that need no identical generations do not look at partings
    assert _failures({**base, "generation_partings": [apart], "generations_matching": 0.5}, ACCEPTANCE["q4_k_m"]) == []
