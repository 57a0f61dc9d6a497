"""One run: its settings and manifest, its loss curve, the before/after evaluation, a chat with the base and the
fine-tuned model side by side, exports (merged, GGUF, Ollama Modelfile, Hub push with a dry-run preview) and
downloads. Eval and export run as background tasks (tunery/server/tasks.py) that call the CLI's own verbs."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import tempfile
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, HTMLResponse
from starlette.background import BackgroundTask

from tunery.config import RunConfig
from tunery.errors import TuneryError
from tunery.export.pipeline import SMALLEST_FIRST
from tunery.run import open_run, trained_weights
from tunery.server.listing import metrics_of, read_json
from tunery.server.web import NotFound, find_run, job_store, page

router = APIRouter()

QUANTS = SMALLEST_FIRST  # every GGUF type `tunery export --gguf` writes
EXAMPLES_SHOWN = 20


def _context(request: Request, key: str) -> dict:
    run, cfg = open_run(find_run(request, key))
    try:
        kind, weights = trained_weights(run)
    except TuneryError:
        kind, weights = None, None
    return {"key": key, "run": run, "cfg": cfg, "kind": kind, "weights": weights}


@router.get("/runs/{key}", response_class=HTMLResponse)
def run_page(request: Request, key: str) -> HTMLResponse:
    c = _context(request, key)
    run, cfg = c["run"], c["cfg"]
    defaults = RunConfig()
    rows = [(f.name, getattr(cfg, f.name), getattr(cfg, f.name) != getattr(defaults, f.name))
            for f in dataclasses.fields(RunConfig) if f.name != "fast_path"]
    job = next((j for j in job_store(request).list(limit=100_000) if Path(j.run_dir) == run), None)
    return page(request, "run.html", **c, **_eval_context(request, run), **_export_context(request, c),
                settings_rows=rows, fast_changed=cfg.fast_path.changed(), job=job,
                manifest=read_json(run / "manifest.json"), result=read_json(run / "result.json"),
                metrics=[{k: m.get(k) for k in ("step", "loss", "eval_loss")} for m in metrics_of(run)])


# --- evaluation ----------------------------------------------------------------------------------------------


def _eval_context(request: Request, run: Path) -> dict:
    report = read_json(run / "eval" / "report.json")
    return {"report": report or None, "examples": (report or {}).get("examples", [])[:EXAMPLES_SHOWN],
            "eval_task": request.app.state.tasks.latest(run, ("eval",))}


@router.get("/runs/{key}/eval", response_class=HTMLResponse)
def eval_section(request: Request, key: str) -> HTMLResponse:
    c = _context(request, key)
    return page(request, "_eval.html", **c, **_eval_context(request, c["run"]))


@router.post("/runs/{key}/eval", response_class=HTMLResponse)
async def start_eval(request: Request, key: str) -> HTMLResponse:
    """`tunery eval RUN` in the background; the section shows its log until the report is written."""
    form = await request.form()
    c = _context(request, key)
    args = ["eval", str(c["run"])]
    samples = str(form.get("samples") or "").strip()
    if samples:
        args += ["--samples", samples]
    if form.get("allow_changed_data"):
        args.append("--allow-changed-data")
    request.app.state.tasks.start("eval", "evaluation", c["run"], args)
    return page(request, "_eval.html", **c, **_eval_context(request, c["run"]))


# --- chat ----------------------------------------------------------------------------------------------------


@router.post("/runs/{key}/chat", response_class=HTMLResponse)
async def chat(request: Request, key: str) -> HTMLResponse:
    form = await request.form()
    c = _context(request, key)
    prompt = str(form.get("prompt") or "").strip()
    if not prompt:
        raise TuneryError("type a message for both models to answer")
    if c["kind"] is None:
        raise TuneryError("this run has no trained weights yet; chat opens when its training has finished")
    system = str(form.get("system") or "").strip() or c["cfg"].system_prompt
    turns = _turns(str(form.get("history") or "[]"))
    limit = _positive(str(form.get("max_new_tokens") or c["cfg"].max_new_tokens), "max new tokens")
    replies = await run_in_threadpool(request.app.state.chat.replies, c["run"], turns, prompt, system, limit)
    turns.append({"user": prompt, **replies})
    return page(request, "_chat_replies.html", **c, turns=turns)


def _turns(text: str) -> list[dict]:
    """The conversation so far, as the page keeps it; anything malformed starts a new one."""
    try:
        turns = json.loads(text)
    except json.JSONDecodeError:
        return []
    keys = ("user", "base", "fine_tuned")
    ok = isinstance(turns, list) and all(isinstance(t, dict) and all(isinstance(t.get(k), str) for k in keys)
                                         for t in turns)
    return [{k: t[k] for k in keys} for t in turns] if ok else []


def _positive(text: str, what: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise TuneryError(f"{what} must be a whole number above 0, not {text!r}")
    return int(text)


# --- export --------------------------------------------------------------------------------------------------


def _export_context(request: Request, c: dict) -> dict:
    run = c["run"]
    folder = run / "export"
    files = sorted(p for p in folder.iterdir()) if folder.is_dir() else []
    return {"export_files": [(p, p.is_dir(), _size(p)) for p in files if not p.name.endswith(".tmp")],
            "export_task": request.app.state.tasks.latest(run, ("export", "push")), "quants": QUANTS,
            "ollama_name": re.sub(r"[^A-Za-z0-9._-]+", "-", run.name).strip("-.").lower() or "my-model"}


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


@router.get("/runs/{key}/export", response_class=HTMLResponse)
def export_section(request: Request, key: str) -> HTMLResponse:
    c = _context(request, key)
    return page(request, "_export.html", **c, **_export_context(request, c))


@router.post("/runs/{key}/export", response_class=HTMLResponse)
async def start_export(request: Request, key: str) -> HTMLResponse:
    """`tunery export RUN` with the chosen outputs, in the background, into RUN/export."""
    form = await request.form()
    c = _context(request, key)
    run, what = c["run"], str(form.get("what") or "")
    if c["kind"] is None:
        raise TuneryError("this run has no trained weights yet; export it when its training has finished")
    if what == "merged":
        args, label = ["export", str(run), "--merged", str(run / "export" / "merged"), "--overwrite"], "the merge"
    elif what == "gguf":
        quant = str(form.get("quant") or "q8_0")
        if quant not in QUANTS:
            raise TuneryError(f"unknown GGUF type {quant!r}; choose one of {', '.join(QUANTS)}")
        args, label = ["export", str(run), "--gguf", quant], f"the {quant} GGUF export"
        name = str(form.get("ollama") or "").strip()
        if name:
            args += ["--ollama", name]
    else:
        raise TuneryError("say what to export: merged weights or a GGUF file")
    request.app.state.tasks.start("export", label, run, args)
    return page(request, "_export.html", **c, **_export_context(request, c))


@router.post("/runs/{key}/hub", response_class=HTMLResponse)
async def hub(request: Request, key: str) -> HTMLResponse:
    """Preview (the dry run's plan and model card, at once) or push (a background `tunery export --push-to-hub`)."""
    form = await request.form()
    c = _context(request, key)
    repo = str(form.get("repo") or "").strip()
    if not repo:
        raise TuneryError("give the Hub repo to push to, as OWNER/NAME")
    public = bool(form.get("public"))
    if form.get("action") == "push":
        args = ["export", str(c["run"]), "--push-to-hub", repo] + (["--public"] if public else [])
        request.app.state.tasks.start("push", f"the push to {repo}", c["run"], args)
        return page(request, "_export.html", **c, **_export_context(request, c))
    plan = await run_in_threadpool(_hub_plan, c["run"], repo, public)
    return page(request, "_hub_plan.html", plan=plan)


def _hub_plan(run: Path, repo: str, public: bool) -> str:
    from tunery.export.hub import format_plan, plan_upload
    from tunery.export.pipeline import push_files

    what, files = push_files(run, None, {}, None)  # what `tunery export RUN --push-to-hub REPO` uploads
    return format_plan(plan_upload(run, repo, what, files, private=not public))


# --- downloads -----------------------------------------------------------------------------------------------


def _inside(run: Path, relative: str) -> Path:
    path = (run / relative).resolve()
    if not path.is_relative_to(run.resolve()) or not path.exists():
        raise NotFound(f"no file {relative!r} in this run")
    return path


@router.get("/runs/{key}/files/{relative:path}")
def download(request: Request, key: str, relative: str) -> FileResponse:
    """A file of the run (an export, the Modelfile, the report), as a download."""
    path = _inside(find_run(request, key), relative)
    if not path.is_file():
        raise NotFound(f"{relative} is a folder; download it as a .zip")
    return FileResponse(path, filename=path.name)


@router.get("/runs/{key}/zip/{relative:path}")
async def download_zip(request: Request, key: str, relative: str) -> FileResponse:
    """A folder of the run (the adapter, merged weights) as one .zip."""
    run = find_run(request, key)
    folder = _inside(run, relative)
    if not folder.is_dir():
        raise NotFound(f"{relative} is not a folder of this run")
    scratch = Path(tempfile.mkdtemp(prefix="tunery-zip-"))
    archive = await run_in_threadpool(shutil.make_archive, str(scratch / f"{run.name}-{folder.name}"), "zip",
                                      str(folder))
    return FileResponse(archive, filename=Path(archive).name, media_type="application/zip",
                        background=BackgroundTask(shutil.rmtree, scratch, ignore_errors=True))
