"""New fine-tune: data (upload or a path, and its `tunery data inspect` report), model, settings (generated from
RunConfig) with a live time and cost estimate, and Start, which submits the job as `tunery submit` does."""

from __future__ import annotations

import functools
import logging
import re
import secrets
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, Response
from starlette.datastructures import FormData, UploadFile

from tunery.config import RunConfig
from tunery.data.inspect import Inspection, histogram, inspect_file
from tunery.errors import ModelError, TuneryError
from tunery.jobs import control, submit
from tunery.jobs.flavors import money, parse_duration, parse_money
from tunery.run import open_run
from tunery.server.choices import backend_choices, flavor_choices, grouped, model_choices
from tunery.server.forms import config_from_form, form_sections, form_values, partial_config
from tunery.server.web import Settings, find_run, job_store, page, settings

router = APIRouter()
log = logging.getLogger(__name__)

DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".xlsx", ".parquet")
PREVIEW_ROWS = 3
# the settings the data report depends on (how the file is read and tokenized, and the held-out split)
INSPECT_FIELDS = ("sheet", "columns", "json_values", "max_seq_len", "train_on", "eval_data", "eval_split", "seed",
                  "prompt_template", "revision", "trust_remote_code")


class UploadRefused(TuneryError):
    """An upload with no usable name or of a kind that is not training data."""


@router.get("/new", response_class=HTMLResponse)
def new_page(request: Request, source: str | None = Query(None, alias="from")) -> HTMLResponse:
    """The form; `?from=RUN` fills it from that run's settings, data and model."""
    s = settings(request)
    choices = model_choices(s.model_dirs, job_store(request).list(200))
    values = {"output_dir": str(s.runs_dir)}
    if source:
        _, cfg = open_run(find_run(request, source))
        values.update(form_values(cfg))
    offered = {c.value for c in choices}
    model_other = values.get("model") if values.get("model") not in offered else ""
    return page(request, "new.html", sections=form_sections(), models=grouped(choices), values=values,
                model_other=model_other or "", source=source, flavors=flavor_choices(), backends=backend_choices(),
                upload_limit=s.upload_limit, suffixes=DATA_SUFFIXES, inspect_fields=INSPECT_FIELDS)


@router.post("/new/upload", response_class=HTMLResponse)
async def upload(request: Request) -> HTMLResponse:
    """Store the file under TUNERY_HOME/uploads/<random>/<sanitised name> and answer with its report; the stored
    path comes back in the X-Tunery-Data header (the data field takes it)."""
    form = await request.form(max_files=1, max_fields=400)
    file = form.get("file")
    if not isinstance(file, UploadFile):
        raise UploadRefused("no file came with the upload; drop a data file on the box or pick one")
    path = await store_upload(file, settings(request).uploads)
    response = await _report(request, form, str(path))
    response.headers["X-Tunery-Data"] = str(path)
    return response


@router.post("/new/inspect", response_class=HTMLResponse)
async def inspect(request: Request) -> HTMLResponse:
    form = await request.form()
    data = str(form.get("data") or "").strip()
    if not data:
        return page(request, "_report.html", insp=None, error=None, note="Drop a file above, or give its path.")
    return await _report(request, form, data)


def safe_name(name: str) -> str:
    """The file's own name, with no folders, and only letters, digits, '.', '_' and '-'; of a data kind."""
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", name.replace("\\", "/").rsplit("/", 1)[-1]).lstrip("._-")[:120]
    if not base.lower().endswith(DATA_SUFFIXES) or base.lower() in DATA_SUFFIXES:
        raise UploadRefused(f"{name!r} is not a data file tunery reads: upload a {', '.join(DATA_SUFFIXES)} file")
    return base


async def store_upload(file: UploadFile, uploads: Path) -> Path:
    """Write the upload into a new folder of its own under `uploads`, never anywhere else."""
    name = safe_name(file.filename or "")
    folder = uploads / secrets.token_hex(8)
    folder.mkdir(parents=True)
    path = folder / name
    if path.resolve().parent != folder.resolve():  # safe_name leaves no separator; this holds whatever it missed
        raise UploadRefused(f"refused the file name {file.filename!r}")
    with open(path, "wb") as out:
        while chunk := await file.read(1 << 20):
            out.write(chunk)
    return path


async def _report(request: Request, form: FormData, data: str) -> HTMLResponse:
    """The data report, or what stops the file from being read (422), in the page: never a server error."""
    try:
        insp, note = await run_in_threadpool(inspect_data, form, data)
    except TuneryError as e:
        return page(request, "_report.html", status=422, insp=None, error=str(e), note=None, data=data)
    except Exception as e:  # noqa: BLE001 - openpyxl, pyarrow, pandas raise their own types on a damaged file
        log.exception("inspecting %s", data)
        return page(request, "_report.html", status=422, insp=None, note=None, data=data,
                    error=f"{Path(data).name} could not be read as training data ({type(e).__name__}: {e})")
    return page(request, "_report.html", insp=insp, error=None, note=note, data=data,
                hist=histogram(insp.lengths, bins=12), rejected=sum(len(v) for v in insp.rejected.values()))


def inspect_data(form: FormData, data: str) -> tuple[Inspection, str | None]:
    """`tunery data inspect` of the form's data with its model's tokenizer (characters when it cannot load)."""
    from tunery.models.load import embedding_rows

    cfg = partial_config(form, INSPECT_FIELDS)
    model, tokenizer, note = chosen_model(form), None, None
    if model:
        try:
            tokenizer = _tokenizer(model, cfg.revision, cfg.trust_remote_code, cfg.prompt_template)
        except ModelError as e:
            note = f"Lengths are in characters: the model's tokenizer did not load ({e})"
    else:
        note = "Pick a model below to count tokens and see the rows as the model is trained on them."
    insp = inspect_file(data, tokenizer, cfg.max_seq_len, cfg.train_on, cfg.eval_data, cfg.eval_split, cfg.seed,
                        sheet=cfg.sheet, json_values=cfg.json_values, columns=cfg.columns,
                        embedding_rows=embedding_rows(model) if tokenizer is not None else None,
                        preview_rows=PREVIEW_ROWS)
    return insp, note


@functools.lru_cache(maxsize=4)
def _tokenizer(model: str, revision: str | None, trust_remote_code: bool, prompt_template: str | None):
    from tunery.data.templates import ensure_chat_template
    from tunery.models.load import load_tokenizer

    tokenizer = load_tokenizer(model, revision, trust_remote_code)
    ensure_chat_template(tokenizer, prompt_template)
    return tokenizer


def chosen_model(form: FormData) -> str:
    """The free Hub id or folder when given, else the picked one."""
    return str(form.get("model_other") or "").strip() or str(form.get("model") or "").strip()


@router.post("/new/estimate", response_class=HTMLResponse)
async def estimate(request: Request) -> HTMLResponse:
    form = await request.form()
    if not chosen_model(form) or not str(form.get("data") or "").strip():
        return page(request, "_estimate.html", est=None, message="Choose the data and a model to see the estimate.")
    try:
        est, limits = await run_in_threadpool(_estimate, settings(request), form)
    except TuneryError as e:
        return page(request, "_estimate.html", est=None, message=str(e), problem=True)
    over = limits["budget_usd"] is not None and est.usd > limits["budget_usd"]
    return page(request, "_estimate.html", est=est, over=over, budget=limits["budget_usd"], message=None)


def _estimate(s: Settings, form: FormData):
    cfg, flavor, backend, limits = _job_settings(s, form)
    _, _, est = submit.prepare(cfg, flavor, backend, base=s.home)
    return est, limits


def _job_settings(s: Settings, form: FormData) -> tuple[RunConfig, str, str, dict[str, Any]]:
    cfg = config_from_form(form, chosen_model(form), str(form.get("data") or "").strip())
    if cfg.output_dir == RunConfig().output_dir:  # the form's default: the console's runs folder
        cfg = cfg.replace(output_dir=str(s.runs_dir))
    timeout, budget = str(form.get("timeout") or "").strip(), str(form.get("budget") or "").strip()
    limits = {"timeout_s": parse_duration(timeout) if timeout else None,
              "budget_usd": parse_money(budget) if budget else None,
              "secrets": [n.strip() for n in str(form.get("secrets") or "").split(",") if n.strip()]}
    return cfg, str(form.get("flavor") or "local"), str(form.get("backend") or "local"), limits


@router.post("/new/yaml", response_class=HTMLResponse)
async def as_yaml(request: Request) -> HTMLResponse:
    """The form as the config.yaml and the `tunery submit` command that would start the same job from a shell."""
    import shlex

    import yaml

    form = await request.form()
    cfg, flavor, backend, limits = await run_in_threadpool(_job_settings, settings(request), form)
    changed = {k: v for k, v in cfg.to_dict().items() if k == "model" or v != getattr(RunConfig(), k)}
    changed["fast_path"] = cfg.fast_path.changed()
    if not changed["fast_path"]:
        del changed["fast_path"]
    return page(request, "_yaml.html", text=yaml.safe_dump(changed, sort_keys=False),
                command=shlex.join(_submit_command(form, flavor, backend, limits["secrets"])))


def _submit_command(form: FormData, flavor: str, backend: str, secret_names: list[str]) -> list[str]:
    command = ["tunery", "submit", "--config", "run.yaml"]
    if backend != "local":
        command += ["--backend", backend]
    if flavor != "local":
        command += ["--flavor", flavor]
    for key in ("timeout", "budget"):
        if str(form.get(key) or "").strip():
            command += [f"--{key}", str(form[key]).strip()]
    return command + [a for name in secret_names for a in ("--secret", name)]


@router.post("/new/start")
async def start(request: Request) -> Response:
    """Submit the job as `tunery submit` does (prepare, the budget check, queue, a worker), then open its page."""
    form = await request.form()
    job_id = await run_in_threadpool(_start, settings(request), form)
    return Response(status_code=200, headers={"HX-Redirect": f"/jobs/{job_id}"})


def _start(s: Settings, form: FormData) -> str:
    cfg, flavor, backend, limits = _job_settings(s, form)
    cfg, run_dir, est = submit.prepare(cfg, flavor, backend, base=s.home)
    budget = limits["budget_usd"]
    if budget is not None and est.usd > budget and not form.get("over_budget"):
        raise TuneryError(f"refused: the estimate {money(est.usd)} exceeds the budget {money(budget)}; raise the "
                          "budget, pick a cheaper flavor, or tick 'start even past the budget'")
    job, _ = control.launch(cfg, run_dir, est, flavor=flavor, backend=backend, timeout_s=limits["timeout_s"],
                            budget_usd=budget, secrets=limits["secrets"],
                            address=str(form.get("address") or "").strip() or None,
                            output_repo=str(form.get("output_repo") or "").strip() or None)
    return job.id
