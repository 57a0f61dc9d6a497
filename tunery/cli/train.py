"""`tunery train`: its flags are generated from RunConfig, so flags, YAML and config.yaml agree."""

from __future__ import annotations

import dataclasses
import enum
import inspect
import types
import typing
from pathlib import Path
from typing import Literal

import typer

from tunery.config import RunConfig
from tunery.kernels.options import FastPathOptions

FAST = "fast_"  # a FastPathOptions field `compile` is the flag --fast-compile (parameter fast_compile)

HELP = """Fine-tune a model on a data file; every flag can also be set in --config YAML.

Example: tunery train --model Qwen/Qwen2.5-0.5B-Instruct --data my.jsonl"""


def _option(f: dataclasses.Field, hint, prefix: str = "") -> tuple[object, object]:
    """(annotation, typer.Option) for one RunConfig (or, with `prefix`, FastPathOptions) field; None means 'not
    given on the command line'."""
    flag = "--" + (prefix + f.name).replace("_", "-")
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    help_text = f"{f.metadata['help']} [default: {default}]"
    optional = typing.get_origin(hint) in (typing.Union, types.UnionType)
    base = next(a for a in typing.get_args(hint) if a is not type(None)) if optional else hint
    if typing.get_origin(base) is Literal:
        choices = enum.Enum(f.name, {str(a): str(a) for a in typing.get_args(base)}, type=str)
        return choices | None, typer.Option(None, flag, help=help_text, show_default=False)
    if base is bool:
        return bool | None, typer.Option(None, f"{flag}/--no-{flag[2:]}", help=help_text, show_default=False)
    if typing.get_origin(base) is list:
        return str | None, typer.Option(None, flag, help=help_text + " (comma-separated)", show_default=False)
    return base | None, typer.Option(None, flag, help=help_text, show_default=False)


def train_command():
    hints = typing.get_type_hints(RunConfig)
    keyword = inspect.Parameter.KEYWORD_ONLY
    params = [
        inspect.Parameter("config", keyword, annotation=Path | None, default=typer.Option(
            None, "--config", "-c", help="YAML file of settings; flags override it.")),
        inspect.Parameter("resume", keyword, annotation=Path | None, default=typer.Option(
            None, "--resume", help="Continue this run folder from its last checkpoint.")),
    ]
    for f in dataclasses.fields(RunConfig):
        if f.name == "fast_path":
            continue
        annotation, option = _option(f, hints[f.name])
        params.append(inspect.Parameter(f.name, keyword, default=option, annotation=annotation))
    fast_hints = typing.get_type_hints(FastPathOptions)
    for f in dataclasses.fields(FastPathOptions):
        annotation, option = _option(f, fast_hints[f.name], FAST)
        params.append(inspect.Parameter(FAST + f.name, keyword, default=option, annotation=annotation))

    def train(**kwargs) -> None:
        from tunery.progress import console
        from tunery.train import train as run_training

        config, resume = kwargs.pop("config"), kwargs.pop("resume")
        given = {k: v.value if isinstance(v, enum.Enum) else v for k, v in kwargs.items() if v is not None}
        fast_path = {k[len(FAST):]: given.pop(k) for k in list(given) if k.startswith(FAST)}
        if fast_path:
            given["fast_path"] = fast_path
        if resume:
            if given or config:
                raise typer.BadParameter("--resume continues a run with its own config.yaml; drop the other flags")
            try:
                run_training(RunConfig(), resume=resume)
            except KeyboardInterrupt:
                console.print(f"[yellow]interrupted[/]: continue with `tunery train --resume {resume}`")
                raise typer.Exit(130) from None
            return
        cfg = RunConfig.from_yaml(config) if config else RunConfig()
        cfg = cfg.replace(**given)
        try:
            run_training(cfg)
        except KeyboardInterrupt:
            console.print("[yellow]interrupted[/]: continue with `tunery train --resume RUN` (the run folder "
                          "printed above); it restarts from its last checkpoint")
            raise typer.Exit(130) from None

    train.__signature__ = inspect.Signature(params)
    train.__annotations__ = {p.name: p.annotation for p in params}
    train.__doc__ = HELP
    return train
