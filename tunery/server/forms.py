"""The fine-tune form, generated from RunConfig (and its nested FastPathOptions): one input per field, typed by the
field's annotation, labelled and explained by its help text, read back into a RunConfig that validates itself.

A field added to RunConfig appears in the form with nothing to change here; `COMMON` only says which come first.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from tunery.config import RunConfig

# shown first, in this order; the rest of RunConfig goes under "advanced"
COMMON = ("method", "max_steps", "epochs", "lr", "batch_size", "grad_accum", "lora_r", "lora_alpha", "max_seq_len",
          "eval_split", "name")
# how the data file is read: in the data step, where they change the report
READING = ("sheet", "columns", "json_values")
# chosen in steps of their own (model, data) or a group of their own (fast_path)
OWN_STEP = ("model", "data", "fast_path")
FAST = "fast_path."  # the form name prefix of FastPathOptions fields
FAST_PATH_OPTIONS = typing.get_type_hints(RunConfig)["fast_path"]  # its dataclass, as RunConfig declares it


@dataclass(frozen=True)
class Field:
    name: str  # the form input's name: a RunConfig field, or fast_path.<option>
    label: str
    kind: str  # bool, choice, int, float, text, list
    default: Any
    help: str
    choices: tuple = ()
    optional: bool = False

    def value_in(self, values: Mapping[str, Any]) -> Any:
        """This field's value in `values` (a run's settings, see `form_values`), else its default."""
        return values.get(self.name, self.default)

    @property
    def shown(self) -> str:
        return shown(self.default)


def shown(value: Any) -> str:
    """A value as its text input shows it."""
    if value is None:
        return ""
    if isinstance(value, list):
        return ",".join(value)
    return str(value)


def form_values(cfg: RunConfig) -> dict[str, Any]:
    """The form's inputs filled from a run's settings ("fine-tune again"), by input name; a new run needs a new
    name, so the name is left out."""
    values = {k: v for k, v in cfg.to_dict().items() if k not in ("fast_path", "name")}
    values.update({FAST + k: v for k, v in cfg.fast_path.to_dict().items()})
    return values


def _fields(cls: type, prefix: str = "") -> dict[str, Field]:
    hints = typing.get_type_hints(cls)
    defaults = cls()
    out = {}
    for f in dataclasses.fields(cls):
        if f.name == "fast_path":
            continue
        kind, choices, optional = _kind(hints[f.name])
        out[f.name] = Field(prefix + f.name, f.name.replace("_", " "), kind, getattr(defaults, f.name),
                            f.metadata.get("help", ""), choices, optional)
    return out


def _kind(hint: Any) -> tuple[str, tuple, bool]:
    args, origin = typing.get_args(hint), typing.get_origin(hint)
    optional = type(None) in args
    if optional:
        hint = next(a for a in args if a is not type(None))
        args, origin = typing.get_args(hint), typing.get_origin(hint)
    if origin is Literal:
        return "choice", args, optional
    if hint is bool and optional:  # on, off, or unset (tunery chooses: packing)
        return "choice", (True, False), optional
    if origin is list:
        return "list", (), optional
    return {bool: "bool", int: "int", float: "float"}.get(hint, "text"), (), optional


def form_sections() -> dict[str, list[Field]]:
    """{"reading": [...], "common": [...], "advanced": [...], "fast_path": [...]} of the form."""
    run = _fields(RunConfig)
    return {"reading": [run[n] for n in READING],
            "common": [run[n] for n in COMMON],
            "advanced": [f for n, f in run.items() if n not in (*COMMON, *READING, *OWN_STEP)],
            "fast_path": list(_fields(FAST_PATH_OPTIONS, FAST).values())}


def config_from_form(form: Mapping[str, Any], model: str | None, data: str | None) -> RunConfig:
    """A RunConfig from the submitted form; a bad value is a ConfigError that names its field. A checkbox not sent
    is off (the form shows every one); an empty optional field is unset."""
    sections = form_sections()
    values: dict[str, Any] = {"model": model or None, "data": data or None}
    for field in (*sections["reading"], *sections["common"], *sections["advanced"]):
        values[field.name] = _read(field, form.get(field.name))
    values["fast_path"] = {f.name.removeprefix(FAST): _read(f, form.get(f.name)) for f in sections["fast_path"]}
    return RunConfig.from_dict(values, source="the form")


def partial_config(form: Mapping[str, Any], names: tuple[str, ...]) -> RunConfig:
    """A RunConfig with only `names` read from the form (the data report needs a few settings, and a bad value
    elsewhere in the form must not hide it)."""
    by_name = {f.name: f for fields in form_sections().values() for f in fields}
    return RunConfig.from_dict({n: _read(by_name[n], form.get(n)) for n in names}, source="the form")


def _read(field: Field, raw: Any) -> Any:
    if field.kind == "bool":
        return raw is not None and str(raw).lower() not in ("", "0", "false", "off")
    text = "" if raw is None else str(raw).strip()
    if field.kind == "list":
        return [v.strip() for v in text.split(",") if v.strip()]
    if not text:
        return None if field.optional else (field.default if raw is None else None)
    if field.choices and all(isinstance(c, bool) for c in field.choices):
        return text == "True"
    return text  # numbers and choices: RunConfig's own validation reads and checks them, naming the field
