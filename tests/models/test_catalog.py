"""The family catalogue: one record per family holds every fact the code needs, and nothing else holds any.

Where family facts live: tunery/models/catalog.py. The fast path (kernels/apply.py) reads the record the training
loop hands it; GGUF export (export/gguf.py), tiny test models (models/tiny.py) and the benchmark shapes
(bench/lora_bench.py) read the catalogue. `test_family_facts_live_only_in_the_catalogue` fails when a model type
or its config class is spelled anywhere else in the package or the benchmarks.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tunery.models import catalog
from tunery.models.catalog import FAMILIES, architecture_of, architectures, bench_shapes, family_of

ROOT = Path(__file__).resolve().parents[2]

# strings that equal a family fact but mean something else there, each with its reason
ELSEWHERE = {
    ("tunery/export/gguf.py", "qwen2"),  # llama.cpp's pre-tokenizer name, chosen from tokenizer.json's regexes
    ("tunery/export/gguf.py", "llama"),  # llama.cpp's SentencePiece vocabulary type (tokenizer.ggml.model)
    ("tunery/kernels/ops.py", "llama"),  # liger-kernel's RMSNorm casting mode, not a model type
    ("tunery/models/tiny.py", "qwen2"),  # TinySpec's default architecture (the demo's model)
}


def _facts() -> set[str]:
    return ({a.model_type for a in architectures()} | {a.config_class for a in architectures()}
            | {f.name for f in FAMILIES})


def test_family_facts_live_only_in_the_catalogue():
    facts = _facts()
    found = set()
    files = [*(ROOT / "tunery").rglob("*.py"), *(ROOT / "bench").glob("*.py")]
    for path in files:
        rel = path.relative_to(ROOT).as_posix()
        if rel == "tunery/models/catalog.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in facts:
                found.add((rel, node.value))
    assert found == ELSEWHERE, f"family facts outside models/catalog.py: {sorted(found - ELSEWHERE)}"


def test_every_consumer_reads_the_catalogue():
    """Each table that used to be kept apart is now derived from the records."""
    from tunery.export import gguf
    from tunery.models import tiny

    assert set(tiny.FAMILIES) == {a.model_type for a in architectures()}
    assert gguf.FAMILIES == {a.model_type: a.gguf for a in architectures() if a.gguf is not None}
    assert set(bench_shapes()) == {name for f in FAMILIES for name in f.bench}


def test_adding_a_family_is_one_entry(monkeypatch):
    """A new record (here a copy of Llama under another model type) reaches the tiny builder, GGUF export,
    the benchmark shapes and the fast path's facts without any other edit."""
    from tunery.export.gguf import family_for
    from tunery.models.tiny import TinySpec, make_config, train_tokenizer

    llama = family_of("llama")
    arch = catalog.Architecture("llama_clone", "LlamaConfig", {"tie_word_embeddings": False},
                                llama.architectures[0].gguf, ("mlp.down_proj",))
    clone = catalog.Family("clone", (arch,), llama.lora_targets, lora_groups=llama.lora_groups,
                           bench={"clone-1b": ("llama_clone", {"hidden_size": 64})})
    monkeypatch.setattr(catalog, "FAMILIES", (*FAMILIES, clone))
    assert family_of("llama_clone") is clone and architecture_of("llama_clone") is arch
    assert family_for("llama_clone").arch == "llama"
    assert bench_shapes()["clone-1b"] == ("llama_clone", "LlamaConfig", {"hidden_size": 64})
    assert clone.unread_in_recompute("llama_clone") == ("mlp.down_proj",)
    config = make_config(TinySpec(family="llama_clone", vocab_size=300), train_tokenizer(["a b c"], 300))
    assert type(config).__name__ == "LlamaConfig"


@pytest.mark.parametrize("model_type", [a.model_type for a in architectures()])
def test_each_architecture_is_consistent(model_type):
    import transformers

    family = family_of(model_type)
    arch = family.architecture(model_type)
    assert hasattr(transformers, arch.config_class), arch.config_class
    assert set(family.pieces) <= set(catalog.ALL_PIECES)
    for _, members, apart in family.lora_groups:  # grouped projections are LoRA targets
        assert set(members) <= set(family.lora_targets) and set(apart) <= set(members)
    for suffix in arch.unread_in_recompute:
        assert suffix.rsplit(".", 1)[-1] in family.lora_targets


def test_each_bench_shape_is_a_valid_config():
    import transformers

    for name, (model_type, cls_name, values) in bench_shapes().items():
        config = getattr(transformers, cls_name)(**values)
        assert config.model_type == model_type, name
