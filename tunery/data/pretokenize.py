"""Tokenizing the run's data in a process of its own while the training process loads the model.

On a GPU run, setup is mostly Python: reading and tokenizing the data, importing transformers and loading the
weights. One process does them one after the other, whatever the cores. `start` hands the data to a child
process (`python -m tunery.data.pretokenize`, the run's config on stdin) that does exactly what the training
process would (the tokenizer, its chat template, `prepare_data`), so the tokens land in the cache under
TUNERY_HOME; the training process loads the model meanwhile, then waits for the child and reads the cache.

The child only warms the cache: it prints nothing and its outcome is not read. Whatever it did, the training
process prepares the data itself after it (a cache hit when the child finished), so a bad file fails there with
the usual message, and a child that failed or was killed costs only the time it ran.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys


def start(cfg) -> subprocess.Popen | None:
    """The child tokenizing `cfg`'s data, or None where it cannot start."""
    import tunery

    env = os.environ.copy()
    if "TOKENIZERS_PARALLELISM" in tunery.DEFAULTED_ENV:  # the CLI's quiet default, not the user's: this process
        env["TOKENIZERS_PARALLELISM"] = "true"  # forks nothing, so its batches are encoded on all cores
    try:
        proc = subprocess.Popen([sys.executable, "-m", "tunery.data.pretokenize"], stdin=subprocess.PIPE,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    except OSError:
        return None
    try:
        proc.stdin.write(json.dumps(cfg.to_dict()).encode())
        proc.stdin.close()
    except OSError:  # it died at once: the training process tokenizes
        pass
    return proc


def wait(proc: subprocess.Popen | None) -> None:
    """Until the child is done; a status line says so where it is still tokenizing."""
    if proc is None or proc.poll() is not None:
        return
    from tunery.progress import console

    with console.status("tokenizing the data (in a second process, while the model loaded)"):
        proc.wait()


def stop(proc: subprocess.Popen | None) -> None:
    """The child ended early: setup failed or was interrupted, so no one will read its tokens."""
    if proc is not None and proc.poll() is None:
        proc.kill()
        proc.wait()


def run_tokenizer(cfg):
    """(the run's tokenizer with its chat template, whether tunery's default template was given it): what the
    training process and the child both tokenize with, so the child's tokens are the cache entry setup reads."""
    from tunery.data.templates import ensure_chat_template
    from tunery.models.load import load_tokenizer

    tokenizer = load_tokenizer(cfg.model, cfg.revision, cfg.trust_remote_code)
    return tokenizer, ensure_chat_template(tokenizer, cfg.prompt_template)


def main() -> None:
    from tunery.config import RunConfig
    from tunery.data.dataset import prepare_data

    cfg = RunConfig.from_dict(json.loads(sys.stdin.read()))
    prepare_data(cfg, run_tokenizer(cfg)[0])


if __name__ == "__main__":
    main()
