"""Hub datasets as `data`: `org/name[@revision][:subset][:split]`, downloaded into the Hugging Face cache through
huggingface_hub (here from the local Hub in tests/hubserver.py), read by `datasets`, the revision read pinned in
the manifest, and usable offline from the cache."""

from __future__ import annotations

import json

import pytest

from tests.hubserver import HubServer
from tunery.data.load import _hub_snapshot, content_hash, hub_dataset, load_rows
from tunery.errors import DataError

pytestmark = pytest.mark.usefixtures("tunery_home")

MEDICAL = [{"Question": f"Patient {i} has a fever. Next step?", "Complex_CoT": f"Case {i}: check for infection.",
            "Response": f"Order blood cultures for patient {i}."} for i in range(12)]
MAPPING = ["prompt=Question", "completion=Response", "reasoning=Complex_CoT"]


@pytest.fixture
def hub(tmp_path, monkeypatch):
    import datasets
    from huggingface_hub import constants

    folder = tmp_path / "medical"
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in MEDICAL[:10]))
    (folder / "data" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in MEDICAL[10:]))
    server = HubServer(tmp_path / "hub").start()
    server.put_repo("tester/medical", folder, repo_type="dataset")
    server.patch_client(monkeypatch)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets-cache")
    _hub_snapshot.cache_clear()
    yield server
    _hub_snapshot.cache_clear()
    server.stop()


def test_a_hub_id_reads_its_split_and_pins_the_commit(hub):
    assert [r["Question"] for r in load_rows("tester/medical:test")] == [r["Question"] for r in MEDICAL[10:]]
    rows = load_rows("tester/medical", columns=MAPPING)  # the train split by default, columns mapped
    assert len(rows) == 10 and rows[0]["reasoning"] == MEDICAL[0]["Complex_CoT"]
    identity = content_hash("tester/medical:test")
    commit = hub_dataset("tester/medical").snapshot().name
    assert identity == f"hub:tester/medical@{commit}::test" and len(commit) == 40
    assert hub_dataset("data/missing.jsonl") is None and hub_dataset("tester/medical@v1:sub:train").subset == "sub"


def test_offline_the_cache_serves_and_a_missing_dataset_says_how_to_get_it(hub, monkeypatch):
    from huggingface_hub import constants

    load_rows("tester/medical")
    _hub_snapshot.cache_clear()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    hub.stop()  # nothing to reach any more: the cache must do
    assert len(load_rows("tester/medical")) == 10
    with pytest.raises(DataError, match="not in the local Hugging Face cache.*hf download tester/other"):
        load_rows("tester/other")


def test_unknown_split_and_missing_dataset_are_data_errors(hub):
    with pytest.raises(DataError, match="validation"):
        load_rows("tester/medical:validation")
    with pytest.raises(DataError, match="no dataset tester/nothing on the Hub"):
        load_rows("tester/nothing")


def test_training_on_a_hub_dataset_records_its_revision_and_eval_refuses_a_newer_one(hub, tmp_path):
    from tunery.config import RunConfig
    from tunery.eval.evaluate import check_data_unchanged
    from tunery.models.tiny import TinySpec, build_tiny_model
    from tunery.train import train

    model = build_tiny_model(tmp_path / "model", [r["Question"] for r in MEDICAL],
                             TinySpec(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1))
    cfg = RunConfig(model=str(model), data="tester/medical", columns=MAPPING, output_dir=str(tmp_path / "runs"),
                    name="hub", max_steps=2, batch_size=2, max_seq_len=128, eval_samples=0)
    run = train(cfg.with_absolute_paths(tmp_path))
    commit = hub_dataset("tester/medical").snapshot().name
    assert json.loads((run / "manifest.json").read_text())["data_sha256"] == {
        "tester/medical": f"hub:tester/medical@{commit}::train"}
    assert "data: tester/medical\n" in (run / "config.yaml").read_text()  # not made into a local path
    check_data_unchanged(run)

    (tmp_path / "medical" / "data" / "train.jsonl").write_text(json.dumps(MEDICAL[0]) + "\n")
    hub.put_repo("tester/medical", tmp_path / "medical", repo_type="dataset")  # a new commit
    _hub_snapshot.cache_clear()
    with pytest.raises(DataError, match=f"tester/medical@{commit}:train"):
        check_data_unchanged(run)
