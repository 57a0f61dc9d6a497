"""RunConfig: YAML round trip, coercion of YAML/CLI spellings, and errors that name the field."""

from __future__ import annotations

import pytest

from tunery.config import ConfigError, RunConfig
from tunery.errors import TuneryError


def test_yaml_round_trip(tmp_path):
    cfg = RunConfig.from_dict({"model": "Qwen/Qwen2.5-0.5B-Instruct", "data": "train.jsonl", "lr": 1e-3,
                               "max_steps": 50, "lora_targets": ["q_proj", "v_proj"], "scheduler": "linear",
                               "gradient_checkpointing": True, "system_prompt": "Be brief.\nAlways."})
    path = tmp_path / "run.yaml"
    cfg.to_yaml(path)
    loaded = RunConfig.from_yaml(path)
    assert loaded == cfg
    assert loaded.lora_targets == ["q_proj", "v_proj"] and loaded.max_steps == 50 and loaded.eval_data is None


def test_defaults_are_valid_and_equal_an_empty_file(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert RunConfig.from_yaml(path) == RunConfig()


@pytest.mark.parametrize("load", ["dict", "yaml"])
def test_unknown_key_is_named(tmp_path, load):
    values = {"model": "m", "learning_rate": 0.1}
    path = tmp_path / "run.yaml"
    path.write_text("model: m\nlearning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="unknown setting.*learning_rate") as err:
        RunConfig.from_dict(values) if load == "dict" else RunConfig.from_yaml(path)
    assert "lr" in str(err.value).split("known settings:")[1]  # lists what would have been right
    assert isinstance(err.value, TuneryError)


def test_bad_literal_names_field_and_choices():
    with pytest.raises(ConfigError) as err:
        RunConfig.from_dict({"scheduler": "cosin"})
    message = str(err.value)
    assert message.startswith("scheduler ")
    assert "cosine, linear, constant" in message and "'cosin'" in message


def test_string_numbers_are_coerced(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("lr: 1e-3\nbatch_size: '8'\nepochs: 2\n")  # PyYAML reads 1e-3 as a string
    cfg = RunConfig.from_yaml(path)
    assert cfg.lr == 0.001 and isinstance(cfg.lr, float)
    assert cfg.batch_size == 8 and isinstance(cfg.batch_size, int)
    assert cfg.epochs == 2.0 and isinstance(cfg.epochs, float)


@pytest.mark.parametrize("value, why", [(2.5, "whole number"), ("2.5", "number"), ("eight", "number"),
                                        (True, "number")])
def test_non_integer_for_int_field_is_rejected(value, why):
    with pytest.raises(ConfigError, match=f"^batch_size must be a {why}"):
        RunConfig.from_dict({"batch_size": value})


def test_whole_float_for_int_field_is_accepted():
    assert RunConfig.from_dict({"batch_size": 4.0}).batch_size == 4


@pytest.mark.parametrize("values, field", [({"batch_size": 0}, "batch_size"), ({"eval_split": 1.0}, "eval_split"),
                                           ({"lr": -1}, "lr"), ({"max_steps": 0}, "max_steps"),
                                           ({"gradient_checkpointing": "yes"}, "gradient_checkpointing"),
                                           ({"model": 3}, "model"), ({"lora_targets": [1]}, "lora_targets")])
def test_out_of_range_or_wrong_type_names_the_field(values, field):
    with pytest.raises(ConfigError, match=f"^{field} "):
        RunConfig.from_dict(values)


def test_comma_separated_list_is_split():
    assert RunConfig.from_dict({"lora_targets": "q_proj, v_proj,"}).lora_targets == ["q_proj", "v_proj"]


def test_replace_ignores_none_and_validates():
    cfg = RunConfig.from_dict({"model": "m", "lr": 1e-3})
    changed = cfg.replace(lr=None, model=None, batch_size=16, data="d.jsonl")
    assert (changed.model, changed.lr, changed.batch_size, changed.data) == ("m", 1e-3, 16, "d.jsonl")
    assert cfg.batch_size == 4 and cfg.data is None  # the original is untouched
    with pytest.raises(ConfigError, match="^batch_size must be positive"):
        cfg.replace(batch_size=0)


def test_require_names_the_cli_flag():
    with pytest.raises(ConfigError, match="model is required") as err:
        RunConfig().require("model")
    assert "--model" in str(err.value)
    with pytest.raises(ConfigError, match="--eval-data"):
        RunConfig(model="m").require("model", "eval_data")
    RunConfig(model="m", data="d").require("model", "data")


def test_missing_or_non_mapping_yaml_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        RunConfig.from_yaml(tmp_path / "nope.yaml")
    path = tmp_path / "list.yaml"
    path.write_text("- lr\n- 0.1\n")
    with pytest.raises(ConfigError, match="mapping"):
        RunConfig.from_yaml(path)


def test_fast_path_options_round_trip_through_yaml_and_name_bad_keys(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: m\nfast_path:\n  compile: false\n  capture_after: '3'\n  output_fetch: block\n")
    cfg = RunConfig.from_yaml(path)
    assert (cfg.fast_path.compile, cfg.fast_path.capture_after, cfg.fast_path.output_fetch) == (False, 3, "block")
    assert cfg.fast_path.offload  # the rest keep their defaults
    cfg.to_yaml(tmp_path / "again.yaml")
    assert RunConfig.from_yaml(tmp_path / "again.yaml") == cfg
    assert cfg.fast_path.changed() == {"compile": False, "capture_after": 3, "output_fetch": "block"}
    with pytest.raises(ConfigError, match="unknown option.*compiel.*known:.*compile"):
        RunConfig.from_dict({"fast_path": {"compiel": False}})
    with pytest.raises(ConfigError, match="fast_path.output_fetch must be one of"):
        RunConfig.from_dict({"fast_path": {"output_fetch": "never"}})
    with pytest.raises(ConfigError, match="fast_path.max_graphs must be 0 or more"):
        RunConfig.from_dict({"fast_path": {"max_graphs": -1}})


def test_replace_changes_only_the_fast_path_options_given():
    cfg = RunConfig.from_dict({"fast_path": {"compile": False}})
    merged = cfg.replace(fast_path={"cuda_graphs": False})
    assert not merged.fast_path.compile and not merged.fast_path.cuda_graphs and merged.fast_path.offload


def test_every_fast_path_option_is_a_train_flag():
    import dataclasses

    from typer.testing import CliRunner

    from tunery.cli.app import app
    from tunery.kernels.options import FastPathOptions

    help_text = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "400"}).output
    for f in dataclasses.fields(FastPathOptions):
        assert "--fast-" + f.name.replace("_", "-") in help_text, f.name
