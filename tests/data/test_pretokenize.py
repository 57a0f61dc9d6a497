"""The data tokenized in a second process while the training process loads the model (tunery/data/pretokenize.py):
the child fills the token cache with what the training process would have made, and the training process then
reads it instead of tokenizing; a child that fails changes nothing the user sees."""

from __future__ import annotations

import json

import pytest

from tests.train.test_units import tiny  # noqa: F401  (the module fixture of a tiny model and data)
from tunery.config import RunConfig
from tunery.data import dataset as dataset_module
from tunery.data import pretokenize
from tunery.data.dataset import prepare_data
from tunery.data.templates import ensure_chat_template
from tunery.errors import DataError
from tunery.models.load import load_tokenizer
from tunery.train import loop


class _Retokenized(Exception):
    pass


def _refuse(*args, **kwargs):
    raise _Retokenized


def _tokenizer(model):
    tokenizer = load_tokenizer(str(model))
    ensure_chat_template(tokenizer, None)
    return tokenizer


def test_the_child_fills_the_cache_with_what_the_training_process_would_make(tiny, tmp_path,  # noqa: F811
                                                                             monkeypatch):
    _, model, data = tiny
    monkeypatch.setenv("TUNERY_HOME", str(tmp_path / "home"))
    cfg = RunConfig(model=str(model), data=str(data), eval_split=0.2, max_seq_len=64)
    child = pretokenize.start(cfg)
    pretokenize.wait(child)
    assert child.returncode == 0
    assert list((tmp_path / "home" / "cache" / "tokenized").glob(f"*/{dataset_module.TOKENS_FILE}"))
    with monkeypatch.context() as m:
        m.setattr(dataset_module, "tokenize_examples", _refuse)  # this process reads the child's tokens
        cached = prepare_data(cfg, _tokenizer(model))
    monkeypatch.setenv("TUNERY_HOME", str(tmp_path / "fresh"))
    fresh = prepare_data(cfg, _tokenizer(model))
    assert (cached.train, cached.eval) == (fresh.train, fresh.eval) and len(fresh.train) > 20
    assert cached.report() == fresh.report()


def test_a_run_that_tokenizes_ahead_trains_on_the_childs_tokens(tiny, tmp_path, monkeypatch):  # noqa: F811
    """The whole setup with the second process (what a GPU run does), here on the CPU: this process never
    tokenizes, and the run trains as without it."""
    _, model, data = tiny
    monkeypatch.setenv("TUNERY_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(loop, "tokenizes_ahead", lambda device, dist: True)
    monkeypatch.setattr(dataset_module, "tokenize_examples", _refuse)
    cfg = RunConfig(model=str(model), data=str(data), eval_split=0, max_steps=2, lora_dropout=0.0, save_every=0,
                    output_dir=str(tmp_path / "runs"), name="ahead")
    run = loop.train(cfg)
    result = json.loads((run / "result.json").read_text())
    assert result["steps"] == 2 and result["final_loss"] > 0
    assert set(result["timing"]["setup"]) == {"imports_s", "data_s", "load_s", "prepare_s"}


def test_bad_data_fails_in_the_training_process_with_the_usual_message(tiny, tmp_path, monkeypatch):  # noqa: F811
    _, model, _ = tiny
    monkeypatch.setenv("TUNERY_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(loop, "tokenizes_ahead", lambda device, dist: True)
    missing = tmp_path / "nowhere.jsonl"
    cfg = RunConfig(model=str(model), data=str(missing), eval_split=0, max_steps=2, output_dir=str(tmp_path / "r"))
    with pytest.raises(DataError, match="does not exist"):
        loop.train(cfg)


def test_a_setup_that_fails_stops_the_child(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNERY_HOME", str(tmp_path / "home"))
    started = []
    real_start = pretokenize.start
    monkeypatch.setattr(pretokenize, "start", lambda cfg: started.append(real_start(cfg)) or started[-1])
    monkeypatch.setattr(loop, "tokenizes_ahead", lambda device, dist: True)
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": "hello"}) + "\n")
    cfg = RunConfig(model=str(tmp_path / "no-model"), data=str(data), output_dir=str(tmp_path / "r"))
    with pytest.raises(Exception, match="no-model"):
        loop.train(cfg)
    assert started and started[0].poll() is not None  # not left running


@pytest.mark.parametrize("ours", [True, False])
def test_the_child_encodes_on_all_cores_unless_the_user_said_otherwise(monkeypatch, ours):
    """The CLI quiets tokenizers' fork warning with TOKENIZERS_PARALLELISM=false where the user had not set it;
    the child forks nothing, so it gets "true" then, and the user's own setting otherwise."""
    import tunery

    seen = {}

    class Popen:
        def __init__(self, args, env, **kw):
            seen.update(env)
            self.stdin = open(__import__("os").devnull, "wb")  # noqa: SIM115 - closed by start()

    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    monkeypatch.setattr(tunery, "DEFAULTED_ENV", {"TOKENIZERS_PARALLELISM"} if ours else set())
    monkeypatch.setattr(pretokenize.subprocess, "Popen", Popen)
    pretokenize.start(RunConfig(model="m", data="d.jsonl"))
    assert seen["TOKENIZERS_PARALLELISM"] == ("true" if ours else "false")
