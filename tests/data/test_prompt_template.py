"""A prompt template for base models ("### Question / ### Response" with slots) instead of a chat template:
rendered, masked (the reply and the eos trained), refused with reasons when malformed, and carried into the run's
tokenizer so eval, chat and export render what training saw."""

from __future__ import annotations

import json

import pytest

from tests.data.test_real_templates import marked
from tunery.config import ConfigError
from tunery.data.dataset import load_file
from tunery.data.templates import compile_prompt_template, ensure_chat_template, render

pytestmark = pytest.mark.usefixtures("tunery_home")

LAYOUT = "{system}\n\n### Question:\n{prompt}\n\n### Response:\n{completion}"


def _tok(tiny_tokenizer, template=LAYOUT):
    import copy

    tok = copy.deepcopy(tiny_tokenizer)
    ensure_chat_template(tok, template)
    return tok


def test_the_layout_renders_with_the_reply_and_eos_trained(tiny_tokenizer, tmp_path):
    tok = _tok(tiny_tokenizer)
    path = tmp_path / "rows.jsonl"
    rows = [{"system": "Be terse.", "instruction": "Name a colour.", "output": "Blue."},
            {"conversations": [{"from": "human", "value": "Name a colour."}, {"from": "gpt", "value": "Blue."},
                               {"from": "human", "value": "Another one?"}, {"from": "gpt", "value": "Green."}]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = load_file(str(path), tok, 256)
    texts = [marked(tok, t.input_ids, t.labels) for t in data.tokens]
    assert texts[0] == "Be terse.\n\n### Question:\nName a colour.\n\n### Response:\n⟦Blue.<|im_end|>⟧"
    assert texts[1] == ("### Question:\nName a colour.\n\n### Response:\n⟦Blue.<|im_end|>⟧"
                        "\n\n### Question:\nAnother one?\n\n### Response:\n⟦Green.<|im_end|>⟧")
    prompt = render(tok, [{"role": "user", "content": "Name a colour."}], add_generation_prompt=True)
    assert prompt.endswith("### Response:\n")  # what generation continues from


def test_without_a_system_slot_the_system_text_joins_the_prompt_and_is_reported(tiny_tokenizer, tmp_path):
    tok = _tok(tiny_tokenizer, "Q: {prompt}\nA: {completion}")
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"system": "Be terse.", "instruction": "Name a colour.", "output": "Blue."}) + "\n")
    data = load_file(str(path), tok, 256)
    assert marked(tok, data.tokens[0].input_ids, data.tokens[0].labels) == \
        "Q: Be terse.\n\nName a colour.\nA: ⟦Blue.<|im_end|>⟧"
    assert list(data.notes) == ["system turn merged into the next user turn (the template has no system role)"]


@pytest.mark.parametrize("template, match", [
    ("Q: {question}\nA: {completion}", "unknown slot {question}"),
    ("Q: {prompt}\nA:", "needs {prompt} and {completion}"),
    ("A: {completion} Q: {prompt}", "must end with {completion}"),
    ("Q: {prompt} {system} A: {completion}", "{system} must come before {prompt}"),
])
def test_a_malformed_layout_is_refused_with_what_is_wrong(template, match):
    with pytest.raises(ConfigError, match=match.replace("{", r"\{").replace("}", r"\}")):
        compile_prompt_template(template)


def test_literal_braces_and_quotes_survive(tiny_tokenizer):
    tok = _tok(tiny_tokenizer, 'JSON {{"q": "{prompt}"}} -> {completion}')
    assert render(tok, [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]) == \
        'JSON {"q": "x"} -> y<|im_end|>'


def test_a_run_keeps_its_layout_for_eval_and_chat(tmp_path):
    from tunery.config import RunConfig
    from tunery.eval.generate import generate_replies
    from tunery.models.tiny import TinySpec, build_tiny_model
    from tunery.run import load_trained
    from tunery.train import train

    model = build_tiny_model(tmp_path / "model", ["Name a colour."], TinySpec(hidden_size=32, intermediate_size=64,
                                                                               num_layers=1, num_heads=2,
                                                                               num_kv_heads=1))
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Colour {i}?", "completion": "Blue."}) + "\n" for i in range(8)))
    run = train(RunConfig(model=str(model), data=str(data), output_dir=str(tmp_path / "runs"), name="base",
                          max_steps=2, batch_size=4, max_seq_len=64, eval_samples=0, prompt_template=LAYOUT))
    _, tuned, tok = load_trained(run, "cpu")
    assert tok.chat_template == compile_prompt_template(LAYOUT)
    assert render(tok, [{"role": "user", "content": "Colour 1?"}], add_generation_prompt=True) == \
        "### Question:\nColour 1?\n\n### Response:\n"
    assert len(generate_replies(tuned, tok, [[{"role": "user", "content": "Colour 1?"}]], 4, "cpu")) == 1


def test_inspect_previews_the_layout(tmp_path):
    from typer.testing import CliRunner

    from tunery.cli.app import app
    from tunery.models.tiny import train_tokenizer

    train_tokenizer(["Name a colour.", "Blue."]).save_pretrained(tmp_path / "tok")
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"prompt": "Name a colour.", "completion": "Blue."}) + "\n")
    result = CliRunner().invoke(app, ["data", "inspect", str(data), "--model", str(tmp_path / "tok"),
                                      "--prompt-template", "Q: {prompt}\nA: {completion}"])
    assert result.exit_code == 0, result.output
    assert "Q: Name a colour.\nA: ⟦Blue.<|im_end|>⟧" in result.output


def test_a_layout_typed_with_backslash_n_means_newlines():
    typed, meant = "Q: {prompt}\\nA: {completion}", "Q: {prompt}\nA: {completion}"
    assert compile_prompt_template(typed) == compile_prompt_template(meant)
