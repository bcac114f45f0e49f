"""Train, evaluate and publish on the tiny model, on the CPU, through real bitsandbytes 4-bit layers."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from tasks import paths
from tasks.artifacts import read_json, sha256_file, write_json
from tasks.config import with_overrides
from tasks.errors import PipelineError
from tests.conftest import ROOT


@pytest.fixture(scope="module")
def trained(tmp_path_factory, params):
    """download -> validate -> format -> train (a few steps) -> evaluate, once for the module."""
    from tasks.download import download
    from tasks.evaluate import evaluate
    from tasks.format import format_rows
    from tasks.train import train
    from tasks.validate import validate

    root = tmp_path_factory.mktemp("project")
    (root / "data/sample").mkdir(parents=True)
    shutil.copy2(ROOT / paths.SAMPLE_DATA, root / paths.SAMPLE_DATA)
    if (ROOT / paths.TINY_BASE_DIR).exists():
        shutil.copytree(ROOT / paths.TINY_BASE_DIR, root / paths.TINY_BASE_DIR)
    with pytest.MonkeyPatch.context() as mp:  # the stages use paths relative to the project root
        mp.chdir(root)
        p = with_overrides(params, **{"train.max_steps": 6, "train.save_steps": 3, "train.logging_steps": 1})
        download(p.download)
        validate(p)
        format_rows(p.format, p.model)
        metrics = train(p)
        evaluation = evaluate(p)
    return root, p, metrics, evaluation


def test_base_loads_as_bitsandbytes_4bit(trained, params, monkeypatch):
    import bitsandbytes as bnb

    from tasks.base_model import load_base_model

    root, *_ = trained
    monkeypatch.chdir(root)
    model = load_base_model(params.model, params.quant)
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, bnb.nn.Linear4bit)
    assert q_proj.weight.quant_state.quant_type == "nf4"


def test_train_writes_adapter_and_metrics(trained):
    root, p, metrics, _ = trained
    adapter = root / paths.ADAPTER_DIR
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert (adapter / "adapter_model.safetensors").stat().st_size > 0
    assert config["r"] == p.lora.r and config["lora_alpha"] == p.lora.alpha
    assert sorted(config["target_modules"]) == sorted(p.lora.target_modules)
    assert metrics["steps"] == 6 and metrics["tokens_seen"] > 0 and metrics["train_loss"] > 0
    assert read_json(root / paths.TRAIN_METRICS) == metrics
    run = read_json(adapter / "training_run.json")
    assert run["train_rows_sha256"] == sha256_file(root / paths.TRAIN_ROWS) and run["libraries"]["bitsandbytes"]
    assert not (root / paths.CHECKPOINT_DIR).exists(), "a finished run leaves nothing to resume"
    assert (root / paths.DVCLIVE_DIR / "plots" / "metrics" / "train" / "loss.tsv").exists()


def test_evaluate_compares_base_and_tuned_on_same_rows(trained):
    root, p, _, ev = trained
    assert ev["base"]["answer_tokens"] == ev["tuned"]["answer_tokens"] > 0
    assert ev["base"]["loss"] != ev["tuned"]["loss"]
    assert ev["loss_improvement"] == pytest.approx(ev["base"]["loss"] - ev["tuned"]["loss"], abs=1e-5)
    gens = [json.loads(line) for line in (root / paths.GENERATIONS).read_text().splitlines()]
    assert [g["prompt"] for g in gens] == p.evaluate.prompts


def test_publish_writes_release_with_lineage(trained, monkeypatch):
    from tasks.publish import publish

    root, p, _, ev = trained
    monkeypatch.chdir(root)
    if ev["tuned"]["loss"] >= ev["base"]["loss"]:
        pytest.fail(f"six steps did not improve the tiny model: {ev}")
    lineage = publish(p)
    release = root / paths.RELEASE_DIR
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "README.md", "lineage.json"):
        assert (release / name).exists(), name
    assert sha256_file(release / "adapter_model.safetensors") == sha256_file(
        root / paths.ADAPTER_DIR / "adapter_model.safetensors"
    )
    assert lineage["files_sha256"]["adapter_model.safetensors"] == sha256_file(release / "adapter_model.safetensors")
    assert lineage["raw_data"]["sha256"] == sha256_file(root / paths.RAW_ROWS)
    assert lineage["validation"]["success"] is True
    assert lineage["params"]["lora"]["r"] == p.lora.r
    assert lineage["evaluation"]["tuned"]["loss"] == ev["tuned"]["loss"]
    assert "Evaluation" in (release / "README.md").read_text()


def test_publish_refuses_a_worse_adapter_and_keeps_the_last_release(trained, monkeypatch, tmp_path):
    from tasks.publish import publish

    shared, p, _, ev = trained
    root = tmp_path / "project"  # this test rewrites the eval metrics: on its own copy, not the module's project
    shutil.copytree(shared, root)
    monkeypatch.chdir(root)
    publish(p)
    before = {f.name: f.read_bytes() for f in (root / paths.RELEASE_DIR).iterdir()}
    good = read_json(root / paths.EVAL_METRICS)
    write_json(root / paths.EVAL_METRICS, {**good, "tuned": {**good["tuned"], "loss": good["base"]["loss"] + 1}})
    with pytest.raises(PipelineError, match="refusing to publish"):
        publish(p)
    assert {f.name: f.read_bytes() for f in (root / paths.RELEASE_DIR).iterdir()} == before
    publish(with_overrides(p, **{"publish.require_improvement": False}))  # the override works


def test_publish_to_hub_uploads_privately_without_writing_the_token(trained, monkeypatch):
    """The Hub upload endpoint is the one thing mocked: it cannot be reached from here."""
    import huggingface_hub

    from tasks.publish import publish

    root, p, *_ = trained
    monkeypatch.chdir(root)
    calls = {}

    class FakeApi:
        def __init__(self, token=None):
            calls["token"] = token

        def create_repo(self, repo_id, private, exist_ok):
            calls["create"] = (repo_id, private)

        def upload_folder(self, folder_path, repo_id, commit_message):
            calls["files"] = sorted(os.listdir(folder_path))
            return "https://hub.example/commit/1"

    secret = "hf_plantedSECRETtoken123"
    monkeypatch.setenv("HF_TOKEN", secret)
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    publish(with_overrides(p, **{"publish.push_to_hub": True, "publish.hub_repo_id": "me/adapter"}))
    assert calls["token"] == secret and calls["create"] == ("me/adapter", True)
    assert "adapter_model.safetensors" in calls["files"]
    for path in (root / paths.RELEASE_DIR).rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


def test_release_is_readable_by_other_users(trained, monkeypatch):
    """0644 files and 0755 folders (under the usual umask 022), even from an adapter folder left private."""
    from tasks.publish import ADAPTER_FILES, publish

    root, p, _, _ = trained
    monkeypatch.chdir(root)
    adapter = [root / paths.ADAPTER_DIR / name for name in ADAPTER_FILES]
    modes = [f.stat().st_mode for f in adapter]
    old_umask = os.umask(0o022)
    try:
        for f in adapter:
            f.chmod(0o600)  # as tempfile left them before: the release must not inherit it
        publish(with_overrides(p, **{"publish.require_improvement": False}))
    finally:
        os.umask(old_umask)
        for f, mode in zip(adapter, modes):
            f.chmod(mode)
    release = root / paths.RELEASE_DIR
    found = {
        p.relative_to(release).as_posix() or ".": oct(p.stat().st_mode & 0o777) for p in [release, *release.rglob("*")]
    }
    assert "adapter_model.safetensors" in found and "lineage.json" in found
    assert {k: v for k, v in found.items() if v != ("0o755" if (release / k).is_dir() else "0o644")} == {}
