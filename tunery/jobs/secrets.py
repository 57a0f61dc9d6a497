"""A job's secrets: named at submit, read from the submitter's environment, handed to that job's process only.

    tunery submit run.yaml --secret HF_TOKEN      # HF_TOKEN's value goes to this job, and nowhere else

The store holds only the names. The values wait in TUNERY_HOME/secrets/<job id>.json (mode 0600, in a 0700
folder) from submit until the job ends, when the file is deleted; `tunery retry` reads them again from the
environment of whoever retries, so a rotated token takes effect on the next attempt. A job's process gets a
minimal environment (`job_environment`) plus exactly the secrets it named: not the worker's whole environment.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping

from tunery.errors import TuneryError
from tunery.paths import tunery_home

# what a training process needs from its environment, by name; every other variable stays behind
_PASSED = {
    "PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ", "TMPDIR", "TERM", "PYTHONPATH", "VIRTUAL_ENV",
    "LD_LIBRARY_PATH", "CUDA_VISIBLE_DEVICES", "CUDA_HOME", "CUDA_DEVICE_ORDER", "TUNERY_HOME", "HF_HOME",
    "HF_HUB_CACHE", "HF_HUB_OFFLINE", "HF_ENDPOINT", "HF_DATASETS_CACHE", "HF_DATASETS_OFFLINE",
    "HF_HUB_DISABLE_TELEMETRY", "TRANSFORMERS_OFFLINE", "TOKENIZERS_PARALLELISM", "OMP_NUM_THREADS",
    "MKL_NUM_THREADS", "PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF", "TORCHINDUCTOR_CACHE_DIR",
    "TRITON_CACHE_DIR", "XDG_CACHE_HOME", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE",
}
_PASSED_PREFIXES = ("LC_", "NCCL_")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_CONVENTIONAL = re.compile(r"[A-Z_][A-Z0-9_]*")


def check_names(names: list[str], environ: Mapping[str, str] | None = None) -> None:
    """Each is an environment variable name that is set; never echoes what it was given otherwise (it may be
    the secret's value: `--secret $HF_TOKEN`, `--secret NAME=value`)."""
    environ = os.environ if environ is None else environ
    for i, name in enumerate(names, 1):
        if not _NAME.fullmatch(name):
            raise TuneryError(f"--secret takes the NAME of an environment variable (`--secret HF_TOKEN`), whose "
                              f"value is read from your environment and never stored; --secret number {i} is not "
                              "a name (not shown here, in case it is the secret's value)")
    missing = [(i, n) for i, n in enumerate(names, 1) if not environ.get(n)]
    if missing:
        # a name is echoed only when it reads like one (upper case): `hf_abc123...` is a valid name too, and more
        # likely a token pasted in its place
        shown = [n if _CONVENTIONAL.fullmatch(n) else f"--secret number {i} (not shown: it may be a value)"
                 for i, n in missing]
        raise TuneryError(f"secret(s) {', '.join(shown)} not set in this shell's environment; export them "
                          "(the job reads them from here, now) and submit again")


def _folder():
    folder = tunery_home() / "secrets"
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    return folder


def _path(job_id: str):
    return _folder() / f"{job_id}.json"


def store_secrets(job_id: str, names: list[str], environ: Mapping[str, str] | None = None) -> None:
    """Write the named values (from `environ`) for `job_id`, readable by this user only."""
    environ = os.environ if environ is None else environ
    check_names(names, environ)
    path = _path(job_id)
    if not names:
        drop_secrets(job_id)
        return
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump({n: environ[n] for n in names}, fh)
    os.replace(tmp, path)


def load_secrets(job_id: str, names: list[str]) -> dict[str, str]:
    """The values `job_id` named; TuneryError naming what is missing (never a value)."""
    if not names:
        return {}
    try:
        values = json.loads(_path(job_id).read_text())
    except (OSError, json.JSONDecodeError):
        values = {}
    missing = [n for n in names if n not in values]
    if missing:
        raise TuneryError(f"the secret(s) {', '.join(missing)} of job {job_id} are no longer stored (they are "
                          "deleted when a job ends); run `tunery retry` from a shell where they are set")
    return {n: values[n] for n in names}


def drop_secrets(job_id: str) -> None:
    try:
        _path(job_id).unlink()
    except FileNotFoundError:
        pass


def job_environment(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The minimal environment a job's process starts from: `_PASSED` names and prefixes only, less what this
    process's CLI set to its own defaults (the job's `tunery` sets those again, as the user would get them)."""
    import tunery

    environ = os.environ if environ is None else environ
    return {k: v for k, v in environ.items()
            if (k in _PASSED or k.startswith(_PASSED_PREFIXES)) and k not in tunery.DEFAULTED_ENV}
