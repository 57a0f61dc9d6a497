"""What tunery knows about a model (`tunery models`): the catalogue's records (models/catalog.py), or a local
folder's or the Hub cache's config.json read against the family records, so an unlisted model of a known family
is described too.

    info = describe("Qwen/Qwen2.5-7B-Instruct")     # -> ModelInfo
    rows = catalogue(commercial=True)                # every known model, as ModelInfo
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from tunery.errors import ModelError
from tunery.models.catalog import (
    KNOWN_MODELS,
    TEMPLATE_MARKERS,
    KnownModel,
    family_of,
    is_prequantized,
    known_model,
    supports,
)


@dataclass(frozen=True)
class ModelInfo:
    model: str
    family: str | None  # None: an architecture tunery has no record for (trains on the reference path)
    model_type: str
    params_b: float
    kind: str  # "instruct", "base" or "unknown"
    pair: str | None  # the base of an instruct model, the instruct of a base one
    licence: str | None
    commercial: bool | None  # None: unknown (a local folder's licence is not in its config)
    licence_terms: str
    context: int | None
    template: str
    supports: dict[str, bool] = field(default_factory=dict)
    prequantized: bool = False
    source: str = "catalogue"  # catalogue, or the config.json read

    def to_dict(self) -> dict:
        return asdict(self)


def _from_record(m: KnownModel) -> ModelInfo:
    """A catalogue record as it stands (no model is built: `tunery models` lists in well under a second;
    tests/advisor/test_models.py checks each record's size against its config)."""
    model_type, values = m.config
    return ModelInfo(m.hub_id, m.family, model_type, m.params_b, "instruct" if m.instruct else "base", m.pair,
                     m.license, m.licence.commercial, m.licence.terms, values.get("max_position_embeddings"),
                     m.template, _supported(model_type, m.prequantized), m.prequantized)


def _supported(model_type: str, prequantized: bool) -> dict[str, bool]:
    family = family_of(model_type)
    found = supports(family, model_type) if family else {"fast path": False, "packing": False, "gguf": False,
                                                          "qlora": True}
    if prequantized:  # stored in 4 bits: QLoRA only; export needs the 16-bit weights
        found = {**found, "gguf": False}
    return found


def catalogue(commercial: bool = False) -> list[ModelInfo]:
    """Every model in the catalogue (only those whose licence allows commercial use, with `commercial`)."""
    rows = [_from_record(m) for m in KNOWN_MODELS]
    return [r for r in rows if r.commercial or not commercial]


def describe(model: str) -> ModelInfo:
    """A catalogue model, or a model folder / Hub-cached model described from its config.json."""
    from tunery.advisor.shape import read_config, shape_of_config

    known = known_model(model)
    if known is not None:
        return _from_record(known)
    config = read_config(model)
    if config is None:
        raise ModelError(f"{model} is not in tunery's catalogue (`tunery models` lists it), and no config.json was "
                         "found for it here (a local folder, or the Hub cache: download it once with `hf download "
                         f"{model} config.json`)")
    model_type = config.get("model_type", "?")
    shape = shape_of_config(config)
    if shape is None:
        raise ModelError(f"{model}: transformers cannot build its architecture {model_type!r} here")
    family = family_of(model_type)
    text = config.get("text_config") or config
    return ModelInfo(model, family.name if family else None, model_type, round(shape.params_b, 2), _kind(model),
                     None, None, None, "not in config.json: read the model card", shape.context,
                     _template_kind(model), _supported(model_type, is_prequantized(model, config)),
                     is_prequantized(model, config), source="config.json" + ("" if text is config else " (text)"))


def _kind(model: str) -> str:
    """Instruct or base from a folder's chat template; unknown when there is no tokenizer to read."""
    template = _chat_template(model)
    if template is None:
        return "unknown"
    return "instruct" if template else "base"


def _template_kind(model: str) -> str:
    template = _chat_template(model) or ""
    return next((kind for marker, kind in TEMPLATE_MARKERS if marker in template), "other" if template else "")


def _chat_template(model: str) -> str | None:
    """The chat template of a local folder's tokenizer ("" when it has none), None when there is no tokenizer."""
    import json
    from pathlib import Path

    folder = Path(model).expanduser()
    config = folder / "tokenizer_config.json"
    if not config.is_file():
        return None
    template = json.loads(config.read_text()).get("chat_template") or ""
    jinja = folder / "chat_template.jinja"
    if not template and jinja.is_file():
        template = jinja.read_text()
    return template if isinstance(template, str) else json.dumps(template)
