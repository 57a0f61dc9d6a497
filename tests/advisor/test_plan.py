"""`tunery plan`'s rules on synthetic data: model kind by size and format, max_seq_len from the 99th percentile,
method and batch that fit the GPU, and a plan that cannot fit saying why."""

from __future__ import annotations

import json
import random

import pytest
from typer.testing import CliRunner

from tunery.advisor.plan import HEADROOM, make_plan, write_configs
from tunery.config import RunConfig
from tunery.errors import TuneryError
from tunery.jobs.flavors import get_flavor
from tunery.models.catalog import known_model


def _write(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _plain(tmp_path, n: int, answer_words=(3, 30), name="data") -> str:
    rng = random.Random(n)
    rows = [{"prompt": f"question {i}: " + "word " * rng.randint(5, 40),
             "completion": "answer " * rng.randint(*answer_words)} for i in range(n)]
    return _write(tmp_path / f"{name}-{n}.jsonl", rows)


@pytest.mark.parametrize(("rows", "kind"), [(200, "instruct"), (600, "either"), (2000, "base")])
def test_model_kind_follows_the_data_size(tmp_path, rows, kind):
    plan = make_plan(_plain(tmp_path, rows), flavor="a10g-small")
    assert plan.kind == kind and plan.data.rows == rows
    assert 2 <= len(plan.candidates) <= 3
    assert [c.params_b for c in plan.candidates] == sorted(c.params_b for c in plan.candidates)
    for c in plan.candidates:  # the catalogue's candidates are of the kind recommended (instruct for "either")
        assert known_model(c.model).instruct == (kind != "base"), c.model
    assert plan.epochs == {200: 3, 600: 2, 2000: 1}[rows]


def test_conversations_get_an_instruct_model_whatever_their_number(tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"q {i}"}, {"role": "assistant", "content": "a"}]}
            for i in range(2000)]
    plan = make_plan(_write(tmp_path / "chat.jsonl", rows), flavor="a10g-small")
    assert plan.data.chat and plan.kind == "instruct" and "conversations" in plan.kind_reason


def test_max_seq_len_covers_99_percent_of_long_answers(tmp_path):
    data = _plain(tmp_path, 1000, answer_words=(200, 1500), name="long")
    plan = make_plan(data, flavor="h100")
    lengths = plan.data.lengths
    covered = sum(n <= plan.max_seq_len for n in lengths) / len(lengths)
    assert covered >= 0.99 and plan.max_seq_len < max(lengths) + 64 and plan.max_seq_len % 64 == 0
    assert plan.truncated == sum(n > plan.max_seq_len for n in lengths) <= 10
    assert plan.max_seq_len > 1000  # answers of up to 1,500 words: not a default 512 or 1,024
    for c in plan.candidates:
        assert f"--max-seq-len {plan.max_seq_len}" in c.command


def test_a_7b_full_fine_tune_on_24_gb_gets_qlora_with_the_reason(tmp_path):
    plan = make_plan(_plain(tmp_path, 600), models=["Qwen/Qwen2.5-7B"], flavor="a10g-small", method="full")
    (c,) = plan.candidates
    assert c.method == "qlora" and "--method qlora" in c.command
    assert c.peak_gib <= HEADROOM * get_flavor("a10g-small").memory_per_gpu_gib
    (why,) = c.notes
    assert "full fine-tune needs ~" in why and "a10g-small has 24 GB" in why and "use --method qlora" in why


def test_batch_fits_the_gpu_and_bigger_gpus_allow_bigger_batches(tmp_path):
    data = _plain(tmp_path, 600, answer_words=(400, 900), name="mid")
    small = make_plan(data, models=["Qwen/Qwen2.5-7B"], flavor="t4-small").candidates[0]
    big = make_plan(data, models=["Qwen/Qwen2.5-7B"], flavor="h100").candidates[0]
    assert (small.method, big.method) == ("qlora", "lora")
    assert small.batch_size * small.grad_accum == big.batch_size * big.grad_accum == 8
    assert small.peak_gib <= HEADROOM * 16e9 / 2**30 and big.seconds < small.seconds and big.usd > 0


def test_licence_filter_budget_and_what_cannot_fit(tmp_path):
    data = _plain(tmp_path, 200)
    plan = make_plan(data, flavor="a10g-small", commercial=True)
    assert all(known_model(c.model).licence.commercial for c in plan.candidates)
    plan = make_plan(data, models=["LiquidAI/LFM2-1.2B"], commercial=True, flavor="a10g-small")
    assert not plan.candidates and "licence" in plan.refused[0]
    plan = make_plan(data, models=["Qwen/Qwen2.5-7B"], flavor="h100", budget_usd=0.01)
    assert not plan.candidates and "over the budget" in plan.refused[0]
    plan = make_plan(data, models=["Qwen/Qwen2.5-7B"], flavor="t4-small", method="full")
    assert plan.candidates[0].method == "qlora"
    with pytest.raises(TuneryError, match="unknown GPU"):
        make_plan(data, gpu="V100")
    assert make_plan(data, gpu="a100").candidates[0].flavor == "a100-large"


def test_written_configs_are_run_configs_that_match_the_commands(tmp_path):
    plan = make_plan(_plain(tmp_path, 600), flavor="l4x1")
    written = write_configs(plan, str(tmp_path / "plans"))
    assert len(written) == len(plan.candidates)
    for path, c in zip(written, plan.candidates):
        cfg = RunConfig.from_yaml(path)
        assert (cfg.model, cfg.method, cfg.batch_size, cfg.grad_accum, cfg.max_seq_len) == (
            c.model, c.method, c.batch_size, c.grad_accum, c.max_seq_len)
        assert cfg.gradient_checkpointing and f"--batch-size {c.batch_size}" in c.command


def test_plan_command_prints_a_short_plan_and_json(tmp_path):
    from tunery.cli.app import app

    data = _plain(tmp_path, 2000)
    runner = CliRunner()
    shown = runner.invoke(app, ["plan", "--data", data, "--gpu", "A10G"], env={"COLUMNS": "200"})
    assert shown.exit_code == 0, shown.output
    lines = shown.output.strip().splitlines()
    assert len(lines) <= 16 and "model kind: base" in shown.output and "tunery train --model" in shown.output
    as_json = runner.invoke(app, ["plan", "--data", data, "--flavor", "h100", "--json", "--write",
                                  str(tmp_path / "p")])
    plan = json.loads(as_json.output)
    assert plan["kind"] == "base" and len(plan["written"]) == len(plan["candidates"]) >= 2
    assert plan["candidates"][0]["submit"].startswith(f"tunery submit --config {tmp_path / 'p'}/")
