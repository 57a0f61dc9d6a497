"""The model catalogue (`tunery models`): every known model as data, and models described from a config.json."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from tunery.advisor.models import catalogue, describe
from tunery.advisor.shape import shape_of
from tunery.errors import ModelError
from tunery.models.catalog import FAMILIES, KNOWN_MODELS, LICENCES, architectures, family_of, known_model
from tunery.models.tiny import TinySpec, make_config, train_tokenizer


def test_every_known_model_is_complete_and_pairs_are_mutual():
    for m in KNOWN_MODELS:
        assert m.license in LICENCES and family_of(m.config[0]).name == m.family, m.hub_id
        assert bool(m.template) or not m.instruct, f"{m.hub_id}: an instruct model has a chat template"
        if m.pair:
            pair = known_model(m.pair)
            assert pair is not None and pair.pair == m.hub_id and pair.instruct != m.instruct, m.hub_id
        assert m.prequantized == m.hub_id.endswith("bnb-4bit")
    for m in KNOWN_MODELS:  # the record's size agrees with the config it names (built on the meta device)
        shape = shape_of(*m.config)
        assert shape.params_b == pytest.approx(m.params_b, rel=0.05), m.hub_id
        assert shape.context == describe(m.hub_id).context >= 32768


def test_commercial_filter_drops_limited_licences():
    everything, commercial = catalogue(), catalogue(commercial=True)
    dropped = {i.model for i in everything} - {i.model for i in commercial}
    assert dropped and all(not LICENCES[known_model(m).license].commercial for m in dropped)
    assert all(i.commercial for i in commercial)


def test_a_prequantized_checkpoint_says_it_trains_as_qlora_only():
    info = describe("unsloth/Qwen2.5-7B-Instruct-bnb-4bit")
    assert info.prequantized and info.supports["qlora"] and not info.supports["gguf"]


@pytest.mark.parametrize("model_type", [a.model_type for a in architectures()])
def test_packing_support_is_what_training_checks(model_type):
    """The catalogue's `packing` flag agrees with train/batching.packing_problem on a real (tiny) model."""
    import transformers

    from tunery.train.batching import packing_problem

    config = make_config(TinySpec(family=model_type, hidden_size=32, intermediate_size=64, num_layers=2,
                                  vocab_size=300), train_tokenizer(["a b c"], 300))
    model = transformers.AutoModelForCausalLM.from_config(config)
    assert (packing_problem(model) is None) == family_of(model_type).packing


def test_an_unlisted_model_folder_is_described_from_its_config(tmp_path):
    folder = tmp_path / "my-model"
    folder.mkdir()
    _, values = next(f for f in FAMILIES if f.name == "llama").bench["llama-1b"]
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", **values, "num_hidden_layers": 4}))
    info = describe(str(folder))
    assert (info.family, info.kind, info.source, info.commercial) == ("llama", "unknown", "config.json", None)
    assert 0.3 < info.params_b < 0.6 and info.context == 131072 and info.supports["gguf"]
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": "<|im_start|>{{ m }}"}))
    assert (describe(str(folder)).kind, describe(str(folder)).template) == ("instruct", "chatml")
    with pytest.raises(ModelError, match="not in tunery's catalogue"):
        describe(str(tmp_path / "nothing-here"))


def test_models_command_lists_and_describes(monkeypatch):
    from tunery import progress
    from tunery.cli.app import app

    # a wide terminal whatever runs the test (a pytest worker has none, and rich then draws 80 columns)
    monkeypatch.setattr(progress.report, "_width", 250)

    runner = CliRunner()
    listed = runner.invoke(app, ["models", "--json", "--commercial"], env={"COLUMNS": "200"})
    assert listed.exit_code == 0, listed.output
    rows = json.loads(listed.output)
    assert {r["model"] for r in rows} == {i.model for i in catalogue(commercial=True)}
    one = runner.invoke(app, ["models", "Qwen/Qwen2.5-7B"], env={"COLUMNS": "250"})
    assert one.exit_code == 0 and "Qwen2.5-7B-Instruct" in one.output and "apache-2.0" in one.output
