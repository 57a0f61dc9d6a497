"""Push a run's export to the Hugging Face Hub: a plan (files, sizes, model card) shown by --dry-run, then one commit.

The model card is written from the run folder alone: config.yaml (the exact `tunery train` command), manifest.json
(data hashes, library versions), result.json and eval/report.json (metrics). The token is passed to HfApi and
nowhere else: not into the plan, the card, messages or logs.

    python -c "from pathlib import Path; from tunery.export.hub import plan_upload, format_plan; \
print(format_plan(plan_upload(Path('runs/RUN'), 'me/my-model', ['adapter'], {'': Path('runs/RUN/adapter')})))"
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
from collections.abc import Sequence
from pathlib import Path

import yaml

from tunery.config import RunConfig
from tunery.errors import ExportError
from tunery.models.catalog import known_model
from tunery.run import open_run

KINDS = ("adapter", "merged", "gguf")  # what an upload holds: a PEFT adapter, full weights, a GGUF (+ Modelfile)
CARD = "README.md"


def model_card(run_dir: Path, kind: str | Sequence[str], base_model: str, repo_id: str | None = None) -> str:
    """The README.md of the Hub repo: YAML front matter (base_model, license, tags) and what was trained, on what
    data, with which results, how to reproduce it and how to load it. `kind`: one of KINDS or several."""
    run, cfg = open_run(run_dir)
    kinds = _kinds(kind)
    manifest, result = _json(run / "manifest.json"), _json(run / "result.json")
    report = _json(run / "eval" / "report.json")
    title = (repo_id or run.name).split("/")[-1]
    sections = [f"# {title}", "", _summary(kinds, base_model, cfg), "", *_training(cfg, manifest, result),
                *_results(result, report), "## Reproduce", "", "```bash", train_command(cfg), "```", "",
                *_usage(kinds, repo_id or "REPO_ID")]
    return _front_matter(kinds, base_model) + "\n".join(sections).rstrip() + "\n"


def train_command(cfg: RunConfig) -> str:
    """The `tunery train` command line that reproduces `cfg`: --model, --data and every non-default setting."""
    defaults = RunConfig()
    parts = ["tunery", "train"]
    for f in dataclasses.fields(RunConfig):
        value = getattr(cfg, f.name)
        if f.name == "fast_path":  # its options are flags of their own: --fast-<option>
            parts += [a for k, v in value.changed().items() for a in _flag(f"fast_{k}", v)]
        elif value is not None and (value != getattr(defaults, f.name) or f.name in ("model", "data")):
            parts += _flag(f.name, value)
    return shlex.join(parts)


def _flag(name: str, value) -> list[str]:
    flag = "--" + name.replace("_", "-")
    if isinstance(value, bool):
        return [flag if value else f"--no-{flag[2:]}"]
    if isinstance(value, list):
        return [flag, ",".join(value)]
    return [flag, str(value)]


def plan_upload(run_dir: Path, repo_id: str, what: list[str], files: dict[str, Path], private: bool = True) -> dict:
    """What `push` would upload: each file (repo path, local path, bytes), the total, the card, the repo and its
    visibility. `files` maps a path in the repo to a local file, or a folder prefix ("" = repo root) to a folder
    whose files go under it. The card replaces any README.md a folder holds."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise ExportError(f"{repo_id!r} is not a Hub repo id (use NAME or OWNER/NAME): {e}") from None
    run, cfg = open_run(run_dir)
    kinds = _kinds(what)
    entries = _expand(files)
    card = model_card(run, kinds, cfg.model, repo_id)
    entries.append({"path_in_repo": CARD, "local": None, "bytes": len(card.encode())})
    return {"repo_id": repo_id, "private": private, "what": kinds, "run": str(run), "base_model": cfg.model,
            "files": entries, "total_bytes": sum(e["bytes"] for e in entries), "card": card}


def format_plan(plan: dict) -> str:
    """The plan as `--dry-run` prints it: destination, files with sizes, total, then the card."""
    visibility = "private" if plan["private"] else "public"
    lines = [f"would push to https://huggingface.co/{plan['repo_id']} ({visibility} model repo, one commit):"]
    for entry in plan["files"]:
        source = entry["local"] or "generated model card"
        lines.append(f"  {_size(entry['bytes']):>10}  {entry['path_in_repo']}  <- {source}")
    lines += [f"  {_size(plan['total_bytes']):>10}  total, {len(plan['files'])} files", "",
              f"--- {CARD} ---", plan["card"].rstrip()]
    return "\n".join(lines) + "\n"


def push(plan: dict, token: str | None) -> str:
    """Create the repo (exist_ok) and upload the plan's files and card in one commit; the repo's URL.
    `token` None uses the saved login or HF_TOKEN. Offline or unreachable Hub: ExportError at once."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE"):
        raise ExportError("HF_HUB_OFFLINE is set, so nothing can be pushed to the Hugging Face Hub; unset it on a "
                          "machine with network access (the export files stay where they are)")
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    repo_id = plan["repo_id"]
    operations = [CommitOperationAdd(path_in_repo=e["path_in_repo"], path_or_fileobj=e["local"])
                  for e in plan["files"] if e["local"] is not None]
    operations.append(CommitOperationAdd(path_in_repo=CARD, path_or_fileobj=plan["card"].encode()))
    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, private=plan["private"], repo_type="model", exist_ok=True)
        api.create_commit(repo_id, operations, commit_message=f"Upload {', '.join(plan['what'])} from tunery",
                          repo_type="model")
    except (*_network_errors(), HfHubHTTPError, OfflineModeIsEnabled, OSError) as e:
        raise _push_error(e, repo_id, token) from None  # one clear message, with the token scrubbed out
    return str(getattr(url, "url", url))


# --- card pieces ---------------------------------------------------------------------------------------------


def _kinds(kind: str | Sequence[str]) -> list[str]:
    kinds = [kind] if isinstance(kind, str) else list(kind)
    bad = [k for k in kinds if k not in KINDS]
    if not kinds or bad:
        raise ExportError(f"what to push must be one or more of {', '.join(KINDS)}, not {bad or kinds}")
    return kinds


def _json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ExportError(f"{path} is not readable JSON ({e}); re-run the step that writes it") from None


def _is_local(base_model: str) -> bool:
    return Path(base_model).expanduser().is_dir()


def base_license(base_model: str) -> str:
    """The base model's licence: tunery's catalog, else a local folder's README front matter or config, else
    "other" (the Hub shows that the licence must be checked)."""
    known = known_model(base_model)
    if known:
        return known.license
    folder = Path(base_model).expanduser()
    if folder.is_dir():
        meta = _readme_meta(folder / "README.md")
        config = _json(folder / "config.json") if (folder / "config.json").is_file() else {}
        for candidate in (meta.get("license"), config.get("license")):
            if isinstance(candidate, str) and candidate:
                return candidate
        named = known_model(str(config.get("_name_or_path", "")))
        if named:
            return named.license
    return "other"


def _readme_meta(path: Path) -> dict:
    if not path.is_file():
        return {}
    text = path.read_text(errors="replace")
    if not text.startswith("---"):
        return {}
    block = text[3:].split("\n---", 1)[0]
    try:
        meta = yaml.safe_load(block)
    except yaml.YAMLError:
        return {}
    return meta if isinstance(meta, dict) else {}


def _front_matter(kinds: list[str], base_model: str) -> str:
    meta: dict = {}
    if not _is_local(base_model):
        meta["base_model"] = base_model
    meta["license"] = base_license(base_model)
    if kinds[0] != "gguf":
        meta["library_name"] = "peft" if kinds[0] == "adapter" else "transformers"
    meta["pipeline_tag"] = "text-generation"
    tags = ["tunery", "fine-tuned"]
    tags += ["lora", "peft"] if "adapter" in kinds else []
    tags += ["gguf", "ollama"] if "gguf" in kinds else []
    known = known_model(base_model)
    tags += [known.family] if known else []
    meta["tags"] = tags
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n\n"


def _summary(kinds: list[str], base_model: str, cfg: RunConfig) -> str:
    names = {"adapter": "a LoRA adapter (PEFT format)", "merged": "full model weights (safetensors)",
             "gguf": "a GGUF file for llama.cpp and Ollama"}
    base = f"`{base_model}`" if _is_local(base_model) else f"[`{base_model}`](https://huggingface.co/{base_model})"
    method = (f"{'QLoRA' if cfg.method == 'qlora' else 'LoRA'} r={cfg.lora_r}, alpha={cfg.lora_alpha}"
              if cfg.method != "full" else "full fine-tuning")
    return f"This repo holds {' and '.join(names[k] for k in kinds)}: {base} fine-tuned with tunery ({method})."


def _training(cfg: RunConfig, manifest: dict, result: dict) -> list[str]:
    rows = [("base model", f"`{cfg.model}`" + (f" (revision `{cfg.revision}`)" if cfg.revision else "")),
            ("method", _method(cfg)),
            ("steps", str(result.get("steps") or cfg.max_steps or f"{cfg.epochs:g} epochs")),
            ("learning rate", f"{cfg.lr:g} ({cfg.scheduler} schedule, {cfg.warmup_ratio:.0%} warmup)"),
            ("batch", f"{cfg.batch_size} x {cfg.grad_accum} accumulation"),
            ("max sequence length", str(cfg.max_seq_len)), ("loss on", f"{cfg.train_on} tokens"),
            ("seed", str(cfg.seed))]
    if cfg.system_prompt:
        rows.append(("system prompt", f"`{cfg.system_prompt}`"))
    lines = ["## Training", "", "| setting | value |", "|---|---|", *[f"| {k} | {_cell(v)} |" for k, v in rows], "",
             "Training data (SHA-256 of each file, from the run's manifest.json):", ""]
    hashes = manifest.get("data_sha256") or {}
    lines += [f"- `{Path(p).name}`: `{h}`" for p, h in hashes.items()] or ["- unknown (the run has no manifest.json)"]
    lines.append("")
    report = manifest.get("data_report") or {}
    if "train_examples" in report:
        lines += [f"{report['train_examples']} training examples, {report.get('eval_examples', 0)} held out.", ""]
    versions = manifest.get("versions") or {}
    shown = ", ".join(f"{k} {v}" for k, v in versions.items() if v and k in ("tunery", "torch", "transformers", "peft"))
    if shown:
        lines += [f"Library versions: {shown}.", ""]
    return lines


def _method(cfg: RunConfig) -> str:
    if cfg.method == "full":
        return "full fine-tuning"
    targets = ", ".join(cfg.lora_targets) if cfg.lora_targets else "all linear layers"
    base = "QLoRA (4-bit NF4 base)" if cfg.method == "qlora" else "LoRA"
    return f"{base} r={cfg.lora_r}, alpha={cfg.lora_alpha}, dropout={cfg.lora_dropout:g}, on {targets}"


def _results(result: dict, report: dict) -> list[str]:
    if not result and not report:
        return []
    lines = ["## Results", ""]
    if result:
        lines += ["| metric | value |", "|---|---|"]
        for key, label in (("final_loss", "final training loss"), ("eval_loss", "held-out loss")):
            if result.get(key) is not None:
                lines.append(f"| {label} | {result[key]:.4f} |")
        lines.append("")
    if report.get("base") and report.get("fine_tuned"):
        lines += [f"`tunery eval` on {report.get('eval_examples', '?')} held-out examples "
                  f"({report.get('generated', '?')} generated):", "", "| metric | base | fine-tuned |", "|---|---|---|"]
        for key in ("loss", "perplexity", "exact_match", "rouge_l"):
            if key in report["base"] and key in report["fine_tuned"]:
                lines.append(f"| {key} | {report['base'][key]:.4f} | {report['fine_tuned'][key]:.4f} |")
        lines.append("")
    return lines


def _usage(kinds: list[str], repo_id: str) -> list[str]:
    lines = ["## Use", ""]
    if "adapter" in kinds or "merged" in kinds:
        module, cls = ("peft", "AutoPeftModelForCausalLM") if "adapter" in kinds else ("transformers",
                                                                                        "AutoModelForCausalLM")
        lines += ["```python", f"from {module} import {cls}", "from transformers import AutoTokenizer", "",
                  f'model = {cls}.from_pretrained("{repo_id}")',
                  f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")',
                  'messages = [{"role": "user", "content": "Hello!"}]',
                  'inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", '
                  "return_dict=True)",
                  "out = model.generate(**inputs, max_new_tokens=128)",
                  'print(tokenizer.decode(out[0][inputs["input_ids"].shape[1]:], skip_special_tokens=True))', "```", ""]
    if "gguf" in kinds:
        lines += ["```bash", f"ollama run hf.co/{repo_id}",
                  "# or, when the repo has a Modelfile (chat template, stops and system prompt as in training):",
                  f"hf download {repo_id} --local-dir model && ollama create my-model -f model/Modelfile",
                  f"llama-cli -hf {repo_id}", "```", ""]
    return lines


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


# --- upload pieces -------------------------------------------------------------------------------------------


def _expand(files: dict[str, Path]) -> list[dict]:
    if not files:
        raise ExportError("nothing to push: no files were given")
    entries: dict[str, dict] = {}
    for key, local in files.items():
        local, folder_key, key = Path(local), str(key).endswith("/"), str(key).strip("/")
        if key == CARD:
            raise ExportError(f"{CARD} is the generated model card; do not pass one")
        if local.is_file():
            pairs = [(f"{key}/{local.name}" if folder_key else key or local.name, local)]
        elif local.is_dir():
            pairs = [(f"{key}/{f.relative_to(local).as_posix()}".lstrip("/"), f) for f in sorted(local.rglob("*"))
                     if f.is_file() and not any(part.startswith(".") for part in f.relative_to(local).parts)]
            pairs = [(p, f) for p, f in pairs if p != CARD]
        else:
            raise ExportError(f"{local}: no such file or folder to push")
        for path_in_repo, f in pairs:
            if path_in_repo in entries:
                raise ExportError(f"two files would be uploaded as {path_in_repo}: {entries[path_in_repo]['local']} "
                                  f"and {f}")
            entries[path_in_repo] = {"path_in_repo": path_in_repo, "local": str(f.resolve()),
                                     "bytes": f.stat().st_size}
    if not entries:
        raise ExportError(f"nothing to push: {', '.join(map(str, files.values()))} hold no files")
    return list(entries.values())


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def _network_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module, name in (("httpx2", "TransportError"), ("httpx", "TransportError"),
                         ("requests.exceptions", "ConnectionError"), ("requests.exceptions", "Timeout")):
        try:
            errors.append(getattr(__import__(module, fromlist=[name]), name))
        except (ImportError, AttributeError):
            continue
    return tuple(errors)


def _push_error(error: Exception, repo_id: str, token: str | None) -> ExportError:
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    chain, e = [], error
    while e is not None and e not in chain:
        chain.append(e)
        e = e.__cause__ or e.__context__
    detail = _scrub(f"{type(error).__name__}: {error}", token)
    if any(isinstance(e, OfflineModeIsEnabled) for e in chain):
        return ExportError("huggingface_hub is in offline mode (HF_HUB_OFFLINE), so nothing can be pushed; unset it")
    if any(isinstance(e, _network_errors()) for e in chain):
        return ExportError(f"cannot reach the Hugging Face Hub ({detail}); this machine looks offline. Push from a "
                           "machine with network access (the export files stay where they are)")
    if isinstance(error, HfHubHTTPError):
        status = getattr(getattr(error, "response", None), "status_code", None)
        if status in (401, 403):
            return ExportError(f"the Hub refused the token for {repo_id} (HTTP {status}): log in with `hf auth "
                               "login` or set HF_TOKEN to a token with write access")
        return ExportError(f"the Hub refused the upload to {repo_id} ({detail})")
    return ExportError(f"pushing to {repo_id} failed ({detail})")


def _scrub(text: str, token: str | None) -> str:
    for secret in {token, os.environ.get("HF_TOKEN")}:
        if secret:
            text = text.replace(secret, "***")
    return text
