"""The leaderboard over run folders (written by the test): ranking by each metric, the same-held-out-rows check,
sample answers side by side, the report and its PNG; `compare --models`' one split."""

from __future__ import annotations

import builtins
import json

import pytest

from tunery.advisor.compare import runs_of, split_once
from tunery.advisor.leaderboard import leaderboard, write_report
from tunery.config import RunConfig
from tunery.errors import RunError, TuneryError


def _run(root, name, *, em, rouge, loss, held="abc", answers=("1985-06-03",), curve=(3.0, 2.0)):
    run = root / name
    (run / "eval").mkdir(parents=True)
    (run / "adapter").mkdir()
    (run / "adapter" / "adapter_model.safetensors").write_bytes(b"0" * 2_000_000)
    RunConfig(model=f"org/{name}-model").to_yaml(run / "config.yaml")
    (run / "result.json").write_text(json.dumps({"steps": len(curve), "eval_loss": loss + 0.1}))
    (run / "manifest.json").write_text(json.dumps({"created": "2026-12-07T10:00:00+00:00"}))
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": i + 1, "loss": v}) + "\n"
                                               for i, v in enumerate(curve)))
    examples = [{"prompt": f"p{i}", "reference": "1985-06-03", "base": "?", "fine_tuned": a,
                 "base_correct": False, "fine_tuned_correct": a == "1985-06-03"} for i, a in enumerate(answers)]
    report = {"run": str(run), "model": "m", "eval_examples": 20, "generated": len(examples),
              "base": {"loss": 5.0, "exact_match": 0.0, "rouge_l": 0.1}, "examples": examples,
              "fine_tuned": {"loss": loss, "exact_match": em, "rouge_l": rouge, "perplexity": 2.0}}
    if held:
        report["held_out_sha256"] = held
    (run / "eval" / "report.json").write_text(json.dumps(report))
    return run


def test_ranked_by_the_chosen_metric(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNERY_HOME", str(tmp_path / "home"))
    a = _run(tmp_path, "a", em=0.5, rouge=0.6, loss=1.2, answers=("1985-06-03", "x"))
    b = _run(tmp_path, "b", em=0.7, rouge=0.5, loss=1.5, answers=("1985", "y"))
    c = _run(tmp_path, "c", em=0.5, rouge=0.9, loss=1.0, answers=("1985-06-03", "z"))
    runs = [a, b, c]
    assert [e.name for e in leaderboard(runs, "exact_match").entries] == ["b", "c", "a"]  # ties: lower loss
    assert [e.name for e in leaderboard(runs, "rouge_l").entries] == ["c", "a", "b"]
    assert [e.name for e in leaderboard(runs, "loss").entries] == ["c", "a", "b"]
    board = leaderboard(runs)
    assert board.same_held_out and "same 20 held-out rows" in board.held_out_note()
    assert board.entries[0].adapter_mb == pytest.approx(2.0) and board.entries[0].train_s > 0
    (first, second) = board.samples()
    assert first["prompt"] == "p0" and first["answers"] == ["1985", "1985-06-03", "1985-06-03"]
    with pytest.raises(RunError, match="rank by one of"):
        leaderboard(runs, "bleu")


def test_different_or_missing_held_out_rows_are_said(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNERY_HOME", str(tmp_path / "home"))
    a = _run(tmp_path, "a", em=0.5, rouge=0.6, loss=1.2)
    b = _run(tmp_path, "b", em=0.7, rouge=0.5, loss=1.5, held="other")
    c = _run(tmp_path, "c", em=0.1, rouge=0.5, loss=1.5, held=None)
    assert "different held-out rows" in leaderboard([a, b]).held_out_note()
    assert "not evaluated: c" in leaderboard([a, c]).held_out_note()


def test_report_with_and_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNERY_HOME", str(tmp_path / "home"))
    runs = [_run(tmp_path, "a", em=0.5, rouge=0.6, loss=1.2), _run(tmp_path, "b", em=0.7, rouge=0.5, loss=1.5)]
    report = write_report(leaderboard(runs), tmp_path / "out").read_text()
    assert "| 1 | b | b-model | lora | 1.5000 | 70.0% | 0.500 |" in report
    assert "| p0 | 1985-06-03 | 1985-06-03 | 1985-06-03 |" in report
    assert (tmp_path / "out" / "loss.png").read_bytes()[:4] == b"\x89PNG"
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    report = write_report(leaderboard(runs), tmp_path / "bare").read_text()
    assert "tunery[plot]" in report and not (tmp_path / "bare" / "loss.png").exists()


def test_one_split_for_every_model(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}) + "\n" for i in range(40)))
    train, held, n_train, n_held = split_once(str(data), tmp_path / "cmp", 0.25, 42)
    again = split_once(str(data), tmp_path / "cmp2", 0.25, 42)
    assert (n_train, n_held) == (30, 10) and held.read_text() == again[1].read_text()
    assert not set(train.read_text().splitlines()) & set(held.read_text().splitlines())
    with pytest.raises(TuneryError, match="held-out rows"):
        split_once(str(data), tmp_path / "cmp3", 0.0, 42)
    (tmp_path / "cmp" / "compare.json").write_text(json.dumps({"runs": ["r1", "r2"]}))
    assert runs_of([str(tmp_path / "cmp")]) == ["r1", "r2"]
    with pytest.raises(RunError, match="two or more"):
        runs_of(["r1"])


def test_console_compare_page_shows_the_same_leaderboard(tmp_path, monkeypatch):
    from fastapi.testclient import TestClient

    from tunery.advisor.leaderboard import table_rows
    from tunery.server.app import create_app

    home = tmp_path / "home"
    monkeypatch.setenv("TUNERY_HOME", str(home))
    (home / "runs").mkdir(parents=True)
    runs = [_run(home / "runs", "a", em=0.5, rouge=0.9, loss=1.2), _run(home / "runs", "b", em=0.7, rouge=0.5,
                                                                         loss=1.5)]
    client = TestClient(create_app(home, upload_limit=2**20), base_url="http://localhost")
    for metric, first in (("exact_match", "b"), ("rouge_l", "a")):
        page = client.get(f"/compare?run=a&run=b&metric={metric}").text
        table = page[page.index('id="leaderboard-table"'):page.index('id="held-out-note"')]
        for cells in table_rows(leaderboard(runs, metric)):  # the CLI's cells, in the CLI's order
            assert "<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>" in table.replace('<td class="num">',
                                                                                                "<td>")
        assert table.index(f"<td>{first}</td>") < table.index(f"<td>{'a' if first == 'b' else 'b'}</td>")
        assert "same 20 held-out rows" in page and 'id="leaderboard-samples"' in page


def test_a_refused_comparison_leaves_nothing(tmp_path, monkeypatch):
    from tunery.advisor.compare import queue_models

    monkeypatch.setenv("TUNERY_HOME", str(tmp_path / "home"))
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i}", "completion": "a " * 40}) + "\n" for i in range(40)))
    base = RunConfig(data=str(data), method="full", batch_size=8, max_seq_len=2048, output_dir=str(tmp_path / "r"))
    with pytest.raises(TuneryError, match="needs ~"):  # a 7B full fine-tune on one T4: refused before queueing
        queue_models(["Qwen/Qwen2.5-0.5B", "Qwen/Qwen2.5-7B"], base, tmp_path / "cmp", flavor="t4-small",
                     backend="hf-jobs", start_worker=False)
    assert not (tmp_path / "cmp").exists() and not (tmp_path / "r").exists()
