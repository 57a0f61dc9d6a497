"""A local stand-in for the Hugging Face Hub (model/dataset repos and Jobs) that huggingface_hub's real client talks to.

Point a client at it with HF_ENDPOINT=server.url in a subprocess's environment (read when huggingface_hub is imported),
or in-process with HfApi(endpoint=server.url, token="hf_test") or server.patch_client(monkeypatch). The wire formats
follow huggingface_hub 2.4.0 (hf_api.py, _commit_api.py, _upload_pipeline.py, file_download.py, utils/_http.py).
Uploads are always "regular": the preupload answer never asks for LFS or Xet, so file contents travel base64-encoded
inside the commit NDJSON. Nothing is authenticated: any token (or none) is user "tester".

Jobs are real subprocesses run on this machine in root/jobs/<id>/ with a made-up environment (see HubServer._start_job)
and a fake `uv` (root/bin/uv) that runs `uv run ... TARGET` with this interpreter, whose venv has the dependencies.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import traceback
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, unquote, urlsplit

if TYPE_CHECKING:
    import pytest

USER = "tester"
CANCEL_GRACE_S = 20.0  # SIGKILL a cancelled (or timed-out) job this long after its SIGTERM
KEEP_ALIVE_S = 15.0  # SSE comment on an idle log stream (the client's follow read timeout is 120 s)

# `uv run [--with DEP]... [--python X] TARGET ARGS...`: TARGET "python" or a .py file runs with this interpreter (the
# PEP 723 block is ignored: the venv already has the dependencies); any other TARGET is a command looked up on PATH.
FAKE_UV = '''#!{python}
"""Fake uv written by tests/hubserver.py: only `uv run`."""
import os
import sys

if sys.argv[1:2] != ["run"] or len(sys.argv) < 3:
    sys.exit(f"fake uv: only `uv run [OPTIONS] TARGET ARGS...` is supported, got {sys.argv[1:]}")
args = sys.argv[2:]
while len(args) > 1 and args[0].startswith("-"):  # options; these take a value unless written --opt=value
    if args.pop(0) in ("--with", "--python", "-p", "--with-requirements", "--index-url", "--extra-index-url"):
        args.pop(0)
if not args:
    sys.exit("fake uv: no TARGET after the options")
if args[0] in ("python", "python3"):
    os.execv(sys.executable, [sys.executable, *args[1:]])
if args[0].endswith(".py"):
    os.execv(sys.executable, [sys.executable, *args])
os.execvp(args[0], args)
'''


def _now(ahead_s: float = 0.0) -> str:
    """A timestamp in the Hub's format ('2025-07-22T16:06:25.079Z', parsed by utils._datetime.parse_datetime)."""
    moment = datetime.now(timezone.utc) + timedelta(seconds=ahead_s)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _git_oid(data: bytes) -> str:
    """The git blob sha1: a regular file's oid in tree/preupload answers and its ETag (utils.sha.git_hash)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class _Commit:
    sha: str
    files: dict[str, bytes]  # the whole tree at this commit
    title: str
    date: str


@dataclass
class _Repo:
    private: bool
    created_at: str
    commits: list[_Commit] = field(default_factory=list)  # oldest first; the last one is "main"


@dataclass
class _Job:
    id: str
    namespace: str
    spec: dict
    env: dict[str, str]
    created_at: str
    proc: subprocess.Popen | None = None
    lines: list[tuple[str, str]] = field(default_factory=list)  # (timestamp, text) per output line
    stage: str = "RUNNING"
    message: str | None = None
    returncode: int | None = None
    finished_at: str | None = None
    canceled: bool = False
    timed_out: bool = False


def _killpg(job: _Job, sig: int) -> None:
    """Signal the job's whole process group (it runs in a session of its own)."""
    if job.proc is not None:
        try:
            os.killpg(job.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


class HubServer:
    """The fake Hub: state (repos, jobs) plus a ThreadingHTTPServer on 127.0.0.1 serving _Handler's routes."""

    def __init__(self, root: Path, *, job_env: dict[str, str] | None = None, pause_on_checkpoint: bool = False):
        self.root = Path(root)
        self.job_env = dict(job_env or {})
        self.pause_on_checkpoint = pause_on_checkpoint
        self.url = ""
        self._cond = threading.Condition()  # guards repos and jobs; notified on each job log line and job end
        self._repos: dict[tuple[str, str], _Repo] = {}  # (repo_type, repo_id) -> repo
        self._jobs: dict[str, _Job] = {}
        self._paused = False
        self._httpd: _HTTPServer | None = None

    # ------------------------------------------------------------------ lifecycle and test-side API

    def start(self) -> HubServer:
        (self.root / "bin").mkdir(parents=True, exist_ok=True)
        uv = self.root / "bin" / "uv"
        uv.write_text(FAKE_UV.replace("{python}", sys.executable, 1))
        uv.chmod(0o755)
        self._httpd = _HTTPServer(("127.0.0.1", 0), _Handler)
        self._httpd.hub = self
        self.url = f"http://127.0.0.1:{self._httpd.server_port}"
        threading.Thread(target=self._httpd.serve_forever, name="hubserver", daemon=True).start()
        return self

    def stop(self) -> None:
        """Kill the jobs still running (their log streams then end) and close the server."""
        with self._cond:
            running = [job for job in self._jobs.values() if job.proc is not None and job.finished_at is None]
        for job in running:
            _killpg(job, signal.SIGKILL)
        for job in running:
            with self._cond:
                self._cond.wait_for(lambda job=job: job.finished_at is not None, timeout=10)
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def files(self, repo_id: str, repo_type: str = "model") -> dict[str, bytes]:
        """The files of a repo's main branch (KeyError if the repo does not exist)."""
        with self._cond:
            return dict(self._repos[(repo_type, repo_id)].commits[-1].files)

    def jobs(self) -> list[dict]:
        """Every job so far, oldest first; child_env is the whole environment the job's process got."""
        with self._cond:
            return [{
                "id": job.id, "stage": job.stage, "message": job.message,
                "command": [*(job.spec.get("command") or []), *(job.spec.get("arguments") or [])],
                "environment": dict(job.spec.get("environment") or {}), "secrets": dict(job.spec.get("secrets") or {}),
                "flavor": job.spec.get("flavor"), "timeout": job.spec.get("timeoutSeconds"),
                "labels": job.spec.get("labels"), "log": "\n".join(text for _, text in job.lines),
                "returncode": job.returncode, "child_env": dict(job.env),
            } for job in self._jobs.values()]

    def patch_client(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Point this process's huggingface_hub here (module-level functions included) and its child processes too.

        Patching constants.ENDPOINT alone is not enough: hf_hub_url formats HUGGINGFACE_CO_URL_TEMPLATE, built at
        import, and run_job/inspect_job/... are methods of the HfApi made at import (hf_api.api)."""
        from huggingface_hub import constants, hf_api

        monkeypatch.setattr(constants, "ENDPOINT", self.url)
        template = self.url + "/{repo_id}/resolve/{revision}/{filename}"
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(hf_api.api, "endpoint", self.url)
        monkeypatch.setenv("HF_ENDPOINT", self.url)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setenv("HF_TOKEN", "hf_test")  # whoami (run_job's default namespace) needs some token

    def put_repo(self, repo_id: str, folder: Path, repo_type: str = "model") -> None:
        """Seed a repo (created if missing) with one commit adding every file under `folder` (.git left out)."""
        folder = Path(folder)
        files = {path.relative_to(folder).as_posix(): path.read_bytes() for path in sorted(folder.rglob("*"))
                 if path.is_file() and ".git" not in path.relative_to(folder).parts}
        with self._cond:
            self._create(repo_type, repo_id, private=False)
            self._commit(self._repos[(repo_type, repo_id)], files, [], f"Seed from {folder.name}")

    # ------------------------------------------------------------------ repos (callers hold self._cond)

    def _create(self, repo_type: str, repo_id: str, private: bool) -> bool:
        """A new repo with an empty initial commit; False if it already exists."""
        if (repo_type, repo_id) in self._repos:
            return False
        repo = self._repos[(repo_type, repo_id)] = _Repo(private=private, created_at=_now())
        self._commit(repo, {}, [], "initial commit")
        return True

    def _commit(self, repo: _Repo, additions: dict[str, bytes], deletions: list[str], title: str) -> str:
        """Apply deletions (a trailing '/' deletes a folder) then additions on main; returns the new commit sha."""
        files = dict(repo.commits[-1].files) if repo.commits else {}
        for path in deletions:
            for name in [name for name in files if name == path or (path.endswith("/") and name.startswith(path))]:
                del files[name]
        files.update(additions)
        parent = repo.commits[-1].sha if repo.commits else ""
        sha = hashlib.sha1(f"{parent}\n{title}\n{uuid.uuid4()}".encode()).hexdigest()
        repo.commits.append(_Commit(sha=sha, files=files, title=title, date=_now()))
        return sha

    def _pause_jobs_once(self) -> None:
        """pause_on_checkpoint: SIGSTOP every running job, the first time only."""
        with self._cond:
            if self._paused:
                return
            self._paused = True
            running = [job for job in self._jobs.values() if job.proc is not None and job.finished_at is None]
        for job in running:
            _killpg(job, signal.SIGSTOP)

    # ------------------------------------------------------------------ jobs

    def _start_job(self, namespace: str, spec: dict) -> _Job:
        """Start the job's command. Its environment is only: PATH (fake uv first), HOME, LANG, HF_ENDPOINT, then
        job_env, the spec's environment, its secrets (a later source wins over an earlier one)."""
        job_id = uuid.uuid4().hex[:24]
        workdir = self.root / "jobs" / job_id
        workdir.mkdir(parents=True)
        env = {
            "PATH": f"{self.root / 'bin'}{os.pathsep}{os.environ.get('PATH', os.defpath)}",
            "HOME": str(workdir), "LANG": "C.UTF-8", "HF_ENDPOINT": self.url, **self.job_env,
            **{k: str(v) for k, v in (spec.get("environment") or {}).items()},
            **{k: str(v) for k, v in (spec.get("secrets") or {}).items()},
        }
        job = _Job(id=job_id, namespace=namespace, spec=spec, env=env, created_at=_now())
        with self._cond:
            self._jobs[job_id] = job
        command = [*(spec.get("command") or []), *(spec.get("arguments") or [])]
        try:  # Popen looks the executable up on env["PATH"], so "uv" is the fake one
            job.proc = subprocess.Popen(command, cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        except (OSError, IndexError) as e:
            with self._cond:
                job.lines.append((_now(), f"could not start {command}: {e}"))
                job.stage, job.message, job.finished_at = "ERROR", f"could not start the command: {e}", _now()
                self._cond.notify_all()
            return job
        reader = threading.Thread(target=self._read_output, args=(job,), daemon=True)
        reader.start()
        threading.Thread(target=self._wait_job, args=(job, reader), daemon=True).start()
        if spec.get("timeoutSeconds"):
            timer = threading.Timer(float(spec["timeoutSeconds"]), self._time_out, (job,))
            timer.daemon = True
            timer.start()
        return job

    def _read_output(self, job: _Job) -> None:
        assert job.proc is not None and job.proc.stdout is not None
        for raw in job.proc.stdout:
            with self._cond:
                job.lines.append((_now(), raw.decode("utf-8", "replace").rstrip("\r\n")))
                self._cond.notify_all()

    def _wait_job(self, job: _Job, reader: threading.Thread) -> None:
        """When the main process exits, kill what it left behind (like a container ending) and settle the stage."""
        assert job.proc is not None
        returncode = job.proc.wait()
        _killpg(job, signal.SIGKILL)
        reader.join(timeout=5)
        with self._cond:
            job.returncode, job.finished_at = returncode, _now()
            if job.canceled:
                job.stage, job.message = "CANCELED", "Job canceled"
            elif job.timed_out:
                job.stage = "ERROR"
                job.message = f"Job timeout: it ran longer than its timeout of {job.spec['timeoutSeconds']}s"
            elif returncode == 0:
                job.stage = "COMPLETED"
            else:
                job.stage, job.message = "ERROR", f"Job failed with exit code {returncode}"
            self._cond.notify_all()

    def _terminate(self, job: _Job) -> None:
        """SIGTERM then SIGCONT (a paused job must run to handle it); SIGKILL after CANCEL_GRACE_S if still alive."""
        _killpg(job, signal.SIGTERM)
        _killpg(job, signal.SIGCONT)

        def kill_if_alive() -> None:
            if job.finished_at is None:
                _killpg(job, signal.SIGKILL)

        timer = threading.Timer(CANCEL_GRACE_S, kill_if_alive)
        timer.daemon = True
        timer.start()

    def _time_out(self, job: _Job) -> None:
        with self._cond:
            if job.finished_at is not None or job.canceled:
                return
            job.timed_out = True
        self._terminate(job)

    def _job_info(self, job: _Job) -> dict:
        """The JSON the Jobs API returns (huggingface_hub._jobs_api.JobInfo); secret values are not given back."""
        spec = job.spec
        return {
            "id": job.id, "createdAt": job.created_at, "startedAt": job.created_at, "finishedAt": job.finished_at,
            "dockerImage": spec.get("dockerImage"), "spaceId": spec.get("spaceId"), "command": spec.get("command"),
            "arguments": spec.get("arguments", []), "environment": spec.get("environment") or {},
            "secrets": {name: None for name in spec.get("secrets") or {}}, "flavor": spec.get("flavor"),
            "labels": spec.get("labels"), "status": {"stage": job.stage, "message": job.message},
            "owner": {"id": "0" * 24, "name": job.namespace, "type": "user"},
        }


class _HTTPServer(ThreadingHTTPServer):
    hub: HubServer  # daemon_threads is already True: open log streams never block shutdown


_REPO = r"/api/(?P<repo_type>model|dataset)s/(?P<ns>[^/]+)/(?P<name>[^/]+)"
_RESOLVE = r"(?:/(?P<repo_type>dataset)s)?/(?P<ns>[^/]+)/(?P<name>[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)"
_JOB = r"/api/jobs/(?P<ns>[^/]+)/(?P<job_id>[^/]+)"
# (method, path regex matched on the still-quoted path, handler method); named groups are unquoted into kwargs
_ROUTES = [
    ("GET", r"/api/whoami-v2", "whoami"),  # HfApi.whoami, and run_job & co when namespace is None
    ("GET", r"/api/agent-harnesses", "agent_harnesses"),  # utils._detect_agent (user-agent telemetry)
    ("POST", r"/api/repos/create", "create_repo"),  # HfApi.create_repo
    ("POST", r"/api/validate-yaml", "validate_yaml"),  # create_commit when it adds a README.md
    ("POST", _REPO + r"/preupload/(?P<rev>[^/]+)", "preupload"),  # _commit_api._fetch_upload_modes
    ("POST", _REPO + r"/commit/(?P<rev>[^/]+)", "commit"),  # _commit_api._send_commit (upload_file/upload_folder)
    ("GET", _REPO + r"(?:/revision/(?P<rev>[^/]+))?", "repo_info"),  # repo_info, model_info, snapshot_download
    ("GET", _REPO + r"/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?", "tree"),  # list_repo_tree/list_repo_files, snapshots
    # file_download: HEAD for get_hf_file_metadata (file_exists, hf_hub_download), GET for http_get
    ("HEAD", _RESOLVE, "resolve"),
    ("GET", _RESOLVE, "resolve"),
    ("POST", r"/api/jobs/(?P<ns>[^/]+)", "run_job"),  # run_job (and run_uv_job without local files)
    ("GET", r"/api/jobs/(?P<ns>[^/]+)", "list_jobs"),  # list_jobs
    ("GET", _JOB, "inspect_job"),  # inspect_job, and fetch_job_logs' "has the job finished" check
    ("GET", _JOB + r"/logs", "job_logs"),  # fetch_job_logs (SSE)
    ("POST", _JOB + r"/cancel", "cancel_job"),  # cancel_job
]


class _Handler(BaseHTTPRequestHandler):
    """One request: parse, dispatch to a route method, answer. HTTP/1.0, so every answer closes its connection."""

    server: _HTTPServer

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        self._dispatch()

    do_HEAD = do_POST = do_DELETE = do_PUT = do_GET

    def _dispatch(self) -> None:
        self.hub = self.server.hub
        url = urlsplit(self.path)
        self.query = {key: values[-1] for key, values in parse_qs(url.query).items()}
        self.body = self.rfile.read(int(self.headers.get("Content-Length") or 0))  # the client sends no chunked bodies
        for method, pattern, name in _ROUTES:
            if method == self.command and (match := re.fullmatch(pattern, url.path)):
                kwargs = {key: unquote(value) for key, value in match.groupdict().items() if value is not None}
                try:
                    getattr(self, "_" + name)(**kwargs)
                except (BrokenPipeError, ConnectionResetError):
                    pass
                except Exception as e:  # a bug here: say so to the client and on stderr
                    traceback.print_exc()
                    self._send(500, {"error": f"HubServer: {type(e).__name__}: {e}"})
                return
        self._send(404, {"error": f"HubServer: no route for {self.command} {url.path}"})

    def _send(self, status: int, body: bytes | dict | list = b"", headers: dict[str, str] | None = None,
              content_type: str = "application/json") -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        for key, value in {"Content-Type": content_type, "Content-Length": str(len(data)), **(headers or {})}.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _error(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        """utils._http.hf_raise_for_status picks the exception from X-Error-Code (RepoNotFound, EntryNotFound...)."""
        self._send(status, {"error": message}, {"X-Error-Code": code, "X-Error-Message": message, **(headers or {})})

    def _lookup(self, repo_type: str | None, ns: str, name: str, rev: str | None) -> tuple[_Repo, _Commit] | None:
        """The repo and the commit `rev` names ("main" or any commit sha), or None after answering a 404."""
        repo = self.hub._repos.get((repo_type or "model", f"{ns}/{name}"))
        if repo is None:
            self._error(404, "RepoNotFound", "Repository not found")
            return None
        if rev in (None, "main"):
            return repo, repo.commits[-1]
        commit = next((commit for commit in repo.commits if commit.sha == rev), None)
        if commit is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
            return None
        return repo, commit

    # ------------------------------------------------------------------ repo routes

    def _whoami(self) -> None:
        self._send(200, {"type": "user", "id": "0" * 24, "name": USER, "fullname": "Test User", "orgs": [],
                         "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": "write"}}})

    def _agent_harnesses(self) -> None:
        self._send(200, {"standardEnvVars": [], "harnesses": {}})

    def _create_repo(self) -> None:
        """409 with the url when it exists: create_repo(exist_ok=True) then still reads r.json()["url"]."""
        spec = json.loads(self.body)
        repo_type = spec.get("type") or "model"
        repo_id = f"{spec.get('organization') or USER}/{spec['name']}"
        if repo_type not in ("model", "dataset"):
            return self._send(400, {"error": f"HubServer: repo type {repo_type!r} is not supported"})
        url = f"{self.hub.url}/{'datasets/' if repo_type == 'dataset' else ''}{repo_id}"
        private = bool(spec.get("private")) or spec.get("visibility") == "private"
        with self.hub._cond:
            created = self.hub._create(repo_type, repo_id, private)
        if not created:
            return self._send(409, {"error": f"You already created this {repo_type} repo", "url": url})
        self._send(200, {"url": url, "name": repo_id, "id": uuid.uuid4().hex[:24]})

    def _validate_yaml(self) -> None:
        self._send(200, {"errors": [], "warnings": []})

    def _preupload(self, repo_type: str, ns: str, name: str, rev: str) -> None:
        """Every file "regular" (never LFS/Xet); oid = the current blob's so unchanged files are left out of commits."""
        with self.hub._cond:
            if (found := self._lookup(repo_type, ns, name, rev)) is None:
                return
            files = found[1].files
        answer = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                   "oid": _git_oid(files[f["path"]]) if f["path"] in files else None}
                  for f in json.loads(self.body)["files"]]
        self._send(200, {"files": answer})

    def _commit(self, repo_type: str, ns: str, name: str, rev: str) -> None:
        """NDJSON: a header line, then "file" (base64 content), "deletedFile" or "deletedFolder" lines."""
        additions: dict[str, bytes] = {}
        deletions: list[str] = []
        title = "commit"
        for line in self.body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item.get("key"), item.get("value") or {}
            if key == "header":
                title = value.get("summary") or title
            elif key == "file":
                content = value["content"]
                additions[value["path"]] = base64.b64decode(content) if value.get("encoding") == "base64" else (
                    content.encode())
            elif key == "deletedFile":
                deletions.append(value["path"])
            elif key == "deletedFolder":
                deletions.append(value["path"].rstrip("/") + "/")
            elif key in ("lfsFile", "copyFile"):
                return self._send(400, {"error": f"HubServer: {key} operations are not supported"})
        with self.hub._cond:
            if (found := self._lookup(repo_type, ns, name, rev)) is None:
                return
            repo, head = found
            if head is not repo.commits[-1]:
                return self._send(400, {"error": "HubServer: commits go to the main branch only"})
            missing = [path for path in deletions if not path.endswith("/") and path not in head.files]
            if missing:
                return self._error(404, "EntryNotFound", f"A file with this name doesn't exist: {missing[0]}")
            sha = self.hub._commit(repo, additions, deletions, title)
        if self.hub.pause_on_checkpoint and any(path.startswith("checkpoints/") for path in additions):
            self.hub._pause_jobs_once()  # before answering: the committing job stays "mid-training"
        prefix = "datasets/" if repo_type == "dataset" else ""
        self._send(200, {"success": True, "commitOid": sha, "pullRequestUrl": None,
                         "commitUrl": f"{self.hub.url}/{prefix}{ns}/{name}/commit/{sha}"})

    def _repo_info(self, repo_type: str, ns: str, name: str, rev: str | None = None) -> None:
        """ModelInfo/DatasetInfo: snapshot_download takes `sha` from here, then lists the tree at that sha."""
        with self.hub._cond:
            if (found := self._lookup(repo_type, ns, name, rev)) is None:
                return
            repo, commit = found
        siblings = [{"rfilename": path, "size": len(data), "blobId": _git_oid(data)}
                    for path, data in sorted(commit.files.items())]
        self._send(200, {"id": f"{ns}/{name}", "author": ns, "sha": commit.sha, "private": repo.private,
                         "gated": False, "disabled": False, "lastModified": commit.date, "createdAt": repo.created_at,
                         "downloads": 0, "likes": 0, "tags": [], "siblings": siblings})

    def _tree(self, repo_type: str, ns: str, name: str, rev: str, path: str = "") -> None:
        """Files and folders under `path` (recursive=true: the whole subtree), in one page (no Link header)."""
        with self.hub._cond:
            if (found := self._lookup(repo_type, ns, name, rev)) is None:
                return
            files = found[1].files
        prefix = path.strip("/") + "/" if path.strip("/") else ""
        recursive = self.query.get("recursive", "").lower() in ("true", "1")
        entries, folders = [], set()
        for file_path, data in sorted(files.items()):
            if not file_path.startswith(prefix):
                continue
            parts = file_path[len(prefix):].split("/")
            depth = len(parts) if recursive else min(2, len(parts))
            folders.update(prefix + "/".join(parts[:i]) for i in range(1, depth))
            if recursive or len(parts) == 1:
                entries.append({"type": "file", "path": file_path, "size": len(data), "oid": _git_oid(data)})
        if prefix and not entries and not folders:
            return self._error(404, "EntryNotFound", f"{path} does not exist on {rev}")
        entries += [{"type": "directory", "path": folder, "size": 0, "oid": hashlib.sha1(folder.encode()).hexdigest()}
                    for folder in sorted(folders)]
        self._send(200, entries)

    def _resolve(self, ns: str, name: str, rev: str, path: str, repo_type: str | None = None) -> None:
        """A file's bytes; headers X-Repo-Commit and ETag (git oid) are required by get_hf_file_metadata."""
        with self.hub._cond:
            if (found := self._lookup(repo_type, ns, name, rev)) is None:
                return
            commit = found[1]
        data = commit.files.get(path)
        if data is None:  # X-Repo-Commit lets hf_hub_download cache the file's absence
            return self._error(404, "EntryNotFound", "Entry not found", {"X-Repo-Commit": commit.sha})
        self._send(200, data, {"ETag": f'"{_git_oid(data)}"', "X-Repo-Commit": commit.sha}, "application/octet-stream")

    # ------------------------------------------------------------------ job routes

    def _find_job(self, job_id: str) -> _Job | None:
        job = self.hub._jobs.get(job_id)
        if job is None:  # a 404 on a job url is JobNotFoundError
            self._send(404, {"error": f"Job {job_id} not found"})
        return job

    def _run_job(self, ns: str) -> None:
        """The spec of _jobs_api._create_job_spec: command, arguments, environment, secrets, flavor, timeoutSeconds."""
        job = self.hub._start_job(ns, json.loads(self.body))
        with self.hub._cond:
            info = self.hub._job_info(job)
        self._send(200, info)

    def _list_jobs(self, ns: str) -> None:
        with self.hub._cond:
            infos = [self.hub._job_info(job) for job in self.hub._jobs.values() if job.namespace == ns]
        self._send(200, infos)

    def _inspect_job(self, ns: str, job_id: str) -> None:
        if (job := self._find_job(job_id)) is not None:
            with self.hub._cond:
                info = self.hub._job_info(job)
            self._send(200, info)

    def _cancel_job(self, ns: str, job_id: str) -> None:
        """Answered once the job has exited (at most 5 s), so inspect_job right after it usually says CANCELED."""
        if (job := self._find_job(job_id)) is None:
            return
        with self.hub._cond:
            running = job.proc is not None and job.finished_at is None
            job.canceled = job.canceled or running
        if running:
            self.hub._terminate(job)
            with self.hub._cond:
                self.hub._cond.wait_for(lambda: job.finished_at is not None, timeout=5)
        self._send(200, {})

    def _job_logs(self, ns: str, job_id: str) -> None:
        """SSE, one `data: {"data": line, "timestamp": ...}` event per line: the whole log (or its last `tail` lines),
        then new lines as they come, until the job has ended. After the replay of a running job's log comes one
        "===== Job started" event stamped 2 s ahead: fetch_job_logs drops such lines, and with follow=False the client
        stops at the first event later than the answer's Date + 1 s, so it returns at once instead of after its 5 s
        read timeout. (On a reconnection after a dropped stream the client could then skip one line.)"""
        if (job := self._find_job(job_id)) is None:
            return
        with self.hub._cond:
            sent = max(0, len(job.lines) - int(self.query["tail"])) if "tail" in self.query else 0
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        marker_sent = False
        while True:
            with self.hub._cond:
                new, done = job.lines[sent:], job.finished_at is not None
            for timestamp, text in new:
                self._event(text, timestamp)
            sent += len(new)
            if done:
                return
            if not marker_sent:
                self._event("===== Job started (HubServer: end of the replayed log) =====", _now(ahead_s=2))
                marker_sent = True
            with self.hub._cond:
                changed = self.hub._cond.wait_for(lambda n=sent: len(job.lines) > n or job.finished_at is not None,
                                                  timeout=KEEP_ALIVE_S)
            if not changed:
                self.wfile.write(b": keep-alive\n\n")

    def _event(self, text: str, timestamp: str) -> None:
        self.wfile.write(b"data: " + json.dumps({"data": text, "timestamp": timestamp}).encode() + b"\n\n")
