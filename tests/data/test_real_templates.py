"""The chat templates real models ship (copies in tests/export/test_ollama.py) on tiny models built here: each
renders and masks one awkward ShareGPT conversation exactly as pinned in template_goldens.json (trained text in
⟦ ⟧), trains 5 steps with what was reshaped reported, and a short training stops generating at the template's
end-of-turn token.

To re-pin after a deliberate change: `python -m tests.data.test_real_templates` rewrites the goldens; read the
diff before committing it.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from tests.export.test_ollama import FAMILIES, _tokenizer
from tunery.data.dataset import load_file
from tunery.data.tokenize import IGNORE, Tokenized

pytestmark = pytest.mark.usefixtures("tunery_home")

GOLDENS = Path(__file__).with_name("template_goldens.json")
# template -> (tiny architecture, what the conversations carry); qwen3 twice: with and without a reasoning trace
REAL = {"llama3": "llama", "llama3.1": "llama", "qwen2.5": "qwen2", "qwen3": "qwen3", "qwen3-thinking": "qwen3",
        "mistral-v0.3": "mistral", "gemma2": "gemma2", "gemma3": "gemma3_text", "phi3.5": "phi3", "lfm2": "lfm2"}
AWKWARD = {"conversations": [  # opens with the assistant, a system turn after it, two user turns in a row
    {"from": "gpt", "value": "Hello! How can I help?"},
    {"from": "system", "value": "Answer briefly."},
    {"from": "human", "value": "Name a colour."},
    {"from": "human", "value": "Just one."},
    {"from": "gpt", "value": "Blue."},
    {"from": "human", "value": "And another?"},
    {"from": "gpt", "value": "Green."}]}
THINKING = {"prompt": "Name a colour.", "reasoning": "The sky is blue.", "completion": "Blue."}
REPLIES = ("Blue.", "Green.")


def _family(name: str):
    return FAMILIES[name.removesuffix("-thinking")]


def _rows(name: str, n: int = 1) -> list[dict]:
    """`n` rows like the pinned one, each with its own last reply (a file of copies would fail the data gate)."""
    row = THINKING if name.endswith("-thinking") else AWKWARD
    colours = ["Green.", "Red.", "Teal.", "Gold.", "Grey.", "Pink.", "Navy.", "Plum."]
    if name.endswith("-thinking"):
        return [row] + [{**row, "completion": c} for c in colours[1:n]]
    return [row] + [{"conversations": [*row["conversations"][:-1], {"from": "gpt", "value": c}]}
                    for c in colours[1:n]]


def _write(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def marked(tokenizer, input_ids: list[int], labels: list[int]) -> str:
    """The example's text with each run of trained tokens in ⟦ ⟧ (decoded run by run, special tokens kept)."""
    out, run, trained = [], [], None
    for token, label in [*zip(input_ids, labels), (None, None)]:
        now = label is not None and label != IGNORE
        if token is None or (run and now != trained):
            text = tokenizer.decode(run, skip_special_tokens=False, clean_up_tokenization_spaces=False)
            out.append(f"⟦{text}⟧" if trained else text)
            run = []
        run.append(token)
        trained = now
    return "".join(out)


def _rendered(name: str, tmp_path: Path) -> tuple[str, dict]:
    tok = _tokenizer(_family(name))
    data = load_file(_write(tmp_path / "rows.jsonl", _rows(name)), tok, 512)
    assert data.reasons == [None], data.reasons
    tokens = data.tokens[0]
    return marked(tok, tokens.input_ids, tokens.labels), data.notes


@pytest.mark.parametrize("name", sorted(REAL))
def test_template_renders_and_masks_as_pinned(tmp_path, name):
    text, _ = _rendered(name, tmp_path)
    assert text == json.loads(GOLDENS.read_text())[name]


@pytest.mark.parametrize("name", sorted(REAL))
def test_only_the_replies_and_their_end_of_turn_token_are_trained(tmp_path, name):
    family = _family(name)
    text, _ = _rendered(name, tmp_path)
    trained = [piece.split("⟧")[0] for piece in text.split("⟦")[1:]]
    # (Qwen3 writes an empty <think></think> before the last reply when there is no trace: template text, untrained)
    replies = ["<think>\nThe sky is blue.\n</think>\n\nBlue."] if name.endswith("-thinking") else list(REPLIES)
    assert len(trained) == len(replies), text
    end = family.stops[0]
    for piece, reply in zip(trained, replies):
        assert piece.strip().startswith(reply) and piece.strip()[len(reply):].strip() == end, (piece, reply)


def _tiny_model(name: str, folder: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    from tunery.models.tiny import TinySpec, make_config

    tok = _tokenizer(_family(name))
    spec = TinySpec(family=REAL[name], hidden_size=64, intermediate_size=128, num_layers=2, num_heads=2,
                    num_kv_heads=1)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(make_config(spec, tok), dtype=torch.float32)
    model.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("name", sorted(REAL))
def test_each_template_trains_5_steps_and_reports_what_it_reshaped(tmp_path, name):
    from tunery.config import RunConfig
    from tunery.train import train

    model = _tiny_model(name, tmp_path / "model")
    data = _write(tmp_path / "chats.jsonl", _rows(name, 8))
    run = train(RunConfig(model=str(model), data=data, output_dir=str(tmp_path / "runs"), name="t", max_steps=5,
                          batch_size=2, max_seq_len=256, eval_samples=0, eval_every=0, save_every=0))
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert losses and all(math.isfinite(x) for x in losses)
    notes = json.loads((run / "manifest.json").read_text())["data_report"]["files"][0]["template_notes"]
    if not name.endswith("-thinking"):
        assert notes.get("opening assistant turn dropped (no user turn before it to answer)") == 8, notes
        # the two user turns were merged where the pinned rendering shows them as one
        merged = "Name a colour.\n\nJust one." in json.loads(GOLDENS.read_text())[name]
        assert any("merged" in note for note in notes) == merged, notes


def test_a_short_training_stops_generating_at_the_end_of_turn_token(tmp_path):
    """Gemma's replies end with <end_of_turn>, not its eos: generation must stop there, not run on."""
    from tunery.config import RunConfig
    from tunery.data.templates import render, stop_token_ids
    from tunery.eval.generate import generate_replies
    from tunery.run import load_trained
    from tunery.train import train

    model = _tiny_model("gemma2", tmp_path / "model")
    rows = [{"conversations": [{"from": "human", "value": f"Name colour {i}."}, {"from": "gpt", "value": "Blue."}]}
            for i in range(16)]
    data = _write(tmp_path / "chats.jsonl", rows)
    run = train(RunConfig(model=str(model), data=data, output_dir=str(tmp_path / "runs"), name="g", max_steps=40,
                          batch_size=4, max_seq_len=64, lr=1e-2, eval_samples=0, save_every=0))
    _, tuned, tok = load_trained(run, "cpu")
    chat = [{"role": "user", "content": "Name colour 3."}]
    [reply] = generate_replies(tuned, tok, [chat], 20, "cpu")
    assert reply == "Blue.", reply
    # token by token: the trained reply ends with <end_of_turn> (it carried a label), and generation stops on it
    # (the model's eos is <eos>: without the template's stop, it would run on to 20 tokens)
    prompt = tok(render(tok, chat, add_generation_prompt=True), add_special_tokens=False, return_tensors="pt")
    out = tuned.generate(**prompt, max_new_tokens=20, do_sample=False, eos_token_id=stop_token_ids(tok),
                         pad_token_id=tok.pad_token_id)[0, prompt["input_ids"].shape[1]:].tolist()
    assert tok.decode(out) == "Blue.<end_of_turn>", tok.decode(out)


def _repin() -> None:
    import tempfile

    goldens = {}
    for name in sorted(REAL):
        with tempfile.TemporaryDirectory() as tmp:
            goldens[name] = _rendered(name, Path(tmp))[0]
    GOLDENS.write_text(json.dumps(goldens, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {GOLDENS}", file=sys.stderr)


if __name__ == "__main__":
    _repin()


def test_a_tokenizer_without_a_pad_token_still_trains_its_end_of_turn_eos(tmp_path):
    """Mistral ends a reply with </s>, its eos; with no pad token the eos pads too, and must still carry labels."""
    from tunery.models.load import load_tokenizer
    from tunery.train.batching import collate

    tok = _tokenizer(_family("mistral-v0.3"))
    tok.pad_token = None
    tok.save_pretrained(tmp_path / "tok")
    tok = load_tokenizer(str(tmp_path / "tok"))
    assert tok.pad_token_id == tok.eos_token_id
    data = load_file(_write(tmp_path / "rows.jsonl", _rows("mistral-v0.3", 2)), tok, 512)
    short = Tokenized(data.tokens[1].input_ids[:-4], data.tokens[1].labels[:-4], False)
    batch = collate([data.tokens[0], short], tok.pad_token_id, "cpu")
    labels = batch["labels"][0].tolist()
    assert labels.count(tok.eos_token_id) == 2  # both replies' </s>, though </s> is also the padding
    assert batch["labels"][1].tolist()[len(short.input_ids):] == [IGNORE] * (len(labels) - len(short.input_ids))
