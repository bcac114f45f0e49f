"""The path a new user takes first: the preset's Hub dataset and Hub model, read offline (HF_HUB_OFFLINE=1) from a
Hugging Face cache laid out as huggingface_hub leaves it (tests/hub_cache.py: made by the client's own
hf_hub_download), revision pinning included. Real huggingface_hub, datasets and transformers code; no mocks."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from tasks.common import paths
from tasks.common.artifacts import read_jsonl
from tasks.common.config import with_overrides
from tasks.common.errors import PipelineError
from tests.conftest import ROOT, SHARED_DATA, venv_env
from tests.hub_cache import Repo, fill_hub_cache

DATASET_ID = "mlabonne/guanaco-llama2-1k"  # conf/config.yaml's download.hub_id and model.base
MODEL_ID = "NousResearch/Llama-2-7b-chat-hf"
ABSENT = "0123456789abcdef0123456789abcdef01234567"  # a commit sha no cache here holds


def _card(rows: int) -> bytes:
    # The dataset card's YAML as the Hub repo has it: the parquet export's configs and split sizes.
    return (
        "---\ndataset_info:\n  features:\n  - name: text\n    dtype: string\n  splits:\n  - name: train\n"
        f"    num_examples: {rows}\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n"
        "    path: data/train-*\n---\n# Guanaco-1k: Lazy Llama 2 Formatting\n"
    ).encode()


@dataclass
class HubHome:
    home: Path  # HF_HOME; the hub cache is its hub/
    rows: list[dict]  # the dataset's rows, as published
    dataset_commit: str
    model_commit: str

    @property
    def cache(self) -> Path:
        return self.home / "hub"

    def env(self, **extra: str) -> dict[str, str]:
        return {**os.environ, "HF_HOME": str(self.home), "HF_HUB_CACHE": str(self.cache), "HF_HUB_OFFLINE": "1"} | extra


@pytest.fixture(scope="session")
def hub_home(tmp_path_factory) -> HubHome:
    """HF_HOME holding the preset's dataset (the real 1k rows when ../shared/data has them, else the shipped sample)
    and a tiny random-weight Llama under the preset's model id, as hf_hub_download leaves them."""
    from tasks.common.artifacts import read_json
    from tasks.common.base_model import BUILD_RECORD, build_tiny_base, tiny_fingerprint

    home = tmp_path_factory.mktemp("hf_home")
    real = SHARED_DATA / "guanaco-llama2-1k" / "train.parquet"
    if real.is_file():
        data = real.read_bytes()
        rows = pq.read_table(real).to_pylist()
    else:  # a fresh clone: the sample in the repo's shape, one text column
        rows = read_jsonl(ROOT / paths.SAMPLE_DATA)
        sink = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_pylist(rows), sink)
        data = sink.getvalue().to_pybytes()
    parquet = f"data/train-00000-of-00001-{hashlib.sha256(data).hexdigest()[:16]}.parquet"
    dataset = Repo(DATASET_ID, "dataset", {"README.md": _card(len(rows)), parquet: data})

    tiny = ROOT / paths.TINY_BASE_DIR  # the checkout's built tiny base when current, else built afresh
    if not (tiny / BUILD_RECORD).is_file() or read_json(tiny / BUILD_RECORD).get("fingerprint") != tiny_fingerprint():
        tiny = build_tiny_base(tmp_path_factory.mktemp("tiny") / "llama")
    files = {p.relative_to(tiny).as_posix(): p.read_bytes() for p in tiny.rglob("*") if p.is_file()}
    files.pop(BUILD_RECORD)  # the tiny builder's own record; a Hub repo has none
    model = Repo(MODEL_ID, "model", files)

    fill_hub_cache(home / "hub", [dataset, model])
    return HubHome(home, rows, dataset.commit, model.commit)


def test_the_cache_is_laid_out_as_the_hub_client_leaves_it(hub_home):
    repo = hub_home.cache / "datasets--mlabonne--guanaco-llama2-1k"
    assert (repo / "refs" / "main").read_text() == hub_home.dataset_commit
    snapshot = repo / "snapshots" / hub_home.dataset_commit
    (parquet,) = (snapshot / "data").glob("train-00000-of-00001-*.parquet")
    assert parquet.is_symlink() and not Path(os.readlink(parquet)).is_absolute()
    # An LFS file's blob is named by its sha256, a regular file's by its git blob sha1
    assert Path(os.readlink(parquet)).name == hashlib.sha256(parquet.read_bytes()).hexdigest()
    model = hub_home.cache / "models--NousResearch--Llama-2-7b-chat-hf"
    assert (model / "refs" / "main").read_text() == hub_home.model_commit
    assert (model / "snapshots" / hub_home.model_commit / "model.safetensors").is_symlink()


# --- download, through its door: `python -m tasks.download`, what dvc.yaml runs -------------------------------


def _download(project: Path, hub_home: HubHome, revision: str | None) -> subprocess.CompletedProcess:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["download"] |= {"source": "hub", "hub_id": DATASET_ID, "revision": revision, "split": "train"}
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = hub_home.env(PYTHONPATH=str(ROOT), HF_DATASETS_CACHE=str(project / "datasets_cache"))
    return subprocess.run(
        [sys.executable, "-m", "tasks.download"], cwd=project, env=env, capture_output=True, text=True, timeout=300
    )


def test_download_reads_the_preset_dataset_from_the_hub_cache_and_records_its_commit(hub_home, tmp_path):
    proc = _download(tmp_path, hub_home, revision=None)
    assert proc.returncode == 0, proc.stderr
    assert read_jsonl(tmp_path / paths.RAW_ROWS) == hub_home.rows
    source = json.loads((tmp_path / paths.SOURCE_RECORD).read_text())
    assert source["source"] == "hub" and source["hub_id"] == DATASET_ID and source["split"] == "train"
    assert source["requested_revision"] is None and source["revision"] == hub_home.dataset_commit
    assert source["row_count"] == len(hub_home.rows)

    pinned = _download(tmp_path, hub_home, revision=hub_home.dataset_commit)
    assert pinned.returncode == 0, pinned.stderr
    source = json.loads((tmp_path / paths.SOURCE_RECORD).read_text())
    assert source["requested_revision"] == source["revision"] == hub_home.dataset_commit
    assert read_jsonl(tmp_path / paths.RAW_ROWS) == hub_home.rows

    kept = (tmp_path / paths.RAW_ROWS).read_bytes()
    absent = _download(tmp_path, hub_home, revision=ABSENT)
    assert absent.returncode != 0
    assert "Traceback" not in absent.stderr  # a PipelineError: one message, no traceback
    assert DATASET_ID in absent.stderr and ABSENT in absent.stderr
    assert (tmp_path / paths.RAW_ROWS).read_bytes() == kept  # the last good download stays


def test_the_real_1k_rows_come_through_the_hub_cache(hub_home):
    if not (SHARED_DATA / "guanaco-llama2-1k" / "train.parquet").is_file():
        pytest.skip(f"{SHARED_DATA} has no guanaco-llama2-1k/train.parquet: the cache held the shipped sample instead")
    assert len(hub_home.rows) == 1000 and set(hub_home.rows[0]) == {"text"}


def test_the_flows_fingerprint_is_the_cached_commit(params, hub_home, monkeypatch):
    # source_fingerprint (what the flow compares with the last download) resolves offline from refs/, no network
    from huggingface_hub import constants

    from tasks.download.stage import source_fingerprint

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub_home.cache))
    for revision, expected in ((None, hub_home.dataset_commit), ("main", hub_home.dataset_commit), (ABSENT, None)):
        p = with_overrides(params, **{"download.source": "hub", "download.hub_id": DATASET_ID})
        p = with_overrides(p, **{"download.revision": revision})
        assert source_fingerprint(p.download) == expected, revision


# --- the base model: tokenizer, config and weights from the cache, by id, pinned or not -----------------------


@pytest.fixture
def hub_model(params, hub_home, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub_home.cache))  # transformers reads it at each call
    return lambda revision: with_overrides(params, **{"model.base": MODEL_ID, "model.revision": revision})


@pytest.mark.parametrize("pinned", [False, True])
def test_the_base_model_loads_from_the_hub_cache(hub_model, hub_home, pinned):
    from tasks.common.base_model import load_base_model, load_config, load_tokenizer, resolve_base

    p = hub_model(hub_home.model_commit if pinned else None)
    assert resolve_base(p.model) == MODEL_ID  # a Hub id, not mistaken for a local path
    tok = load_tokenizer(p.model)
    assert tok.pad_token_id != tok.eos_token_id and tok("hello").input_ids
    config = load_config(p.model)
    assert config.num_hidden_layers == 2 and config.vocab_size == len(tok)
    model = load_base_model(p.model, p.quant, device="cpu")
    assert model.config._name_or_path == MODEL_ID and model.config.num_hidden_layers == 2
    # the weights are the cached snapshot's (the tiny builder's seeded ones), not fresh random ones
    from safetensors.torch import load_file

    snapshot = hub_home.cache / "models--NousResearch--Llama-2-7b-chat-hf" / "snapshots" / hub_home.model_commit
    saved = load_file(snapshot / "model.safetensors")
    name = "model.embed_tokens.weight"  # not quantized
    assert (model.state_dict()[name].float() == saved[name].float()).all()


@pytest.mark.parametrize("load", ["load_tokenizer", "load_config", "load_base_model"])
def test_a_revision_the_cache_lacks_is_a_pipeline_error_naming_id_and_revision(hub_model, load):
    from tasks.common import base_model

    p = hub_model(ABSENT)
    args = (p.model, p.quant) if load == "load_base_model" else (p.model,)
    with pytest.raises(PipelineError) as err:
        getattr(base_model, load)(*args)
    assert MODEL_ID in str(err.value) and ABSENT in str(err.value)


def test_the_lineage_names_the_commit_the_cache_held_for_the_base(hub_model, hub_home, params):
    from tasks.common.base_model import cached_commit

    for revision in (None, "main", hub_home.model_commit):
        assert cached_commit(hub_model(revision).model) == hub_home.model_commit, revision
    assert cached_commit(hub_model(ABSENT).model) is None
    assert cached_commit(params.model) is None  # the tiny local base: its files' hashes stand for it


# --- the whole pipeline through the cache: dvc repro, then the audit ------------------------------------------


@pytest.mark.slow
def test_dvc_repro_through_the_hub_cache_to_an_audited_release(hub_home, project_copy):
    project = project_copy
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["download"] |= {"source": "hub", "hub_id": DATASET_ID, "revision": hub_home.dataset_commit}
    params["model"] |= {"base": MODEL_ID, "revision": hub_home.model_commit}
    params["train"] |= {"max_steps": 3, "epochs": 1}
    params["evaluate"] |= {"max_rows": 8, "max_new_tokens": 8}
    params["publish"]["require_improvement"] = False  # 3 steps on random weights: what counts here is the lineage
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    subprocess.run(["git", "commit", "-qam", "the preset's Hub ids"], cwd=project, check=True, env=os.environ | git)
    env = hub_home.env(
        HF_DATASETS_CACHE=str(project.parent / "datasets_cache"),
        PATH=venv_env()["PATH"],
    )
    repro = subprocess.run(["dvc", "repro"], cwd=project, env=env, capture_output=True, text=True)
    assert repro.returncode == 0, repro.stdout + repro.stderr

    lineage = json.loads((project / paths.RELEASE_DIR / "lineage.json").read_text())
    assert lineage["source"]["hub_id"] == DATASET_ID and lineage["source"]["revision"] == hub_home.dataset_commit
    assert lineage["source"]["row_count"] == len(hub_home.rows)
    base = lineage["base_model"]
    assert base["id"] == MODEL_ID and base["revision"] == base["commit"] == hub_home.model_commit
    audit = subprocess.run(
        [sys.executable, "-m", "tasks.publish.audit", str(paths.RELEASE_DIR)],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
    )
    assert audit.returncode == 0, audit.stdout + audit.stderr
    assert f"Hub dataset {DATASET_ID} split train at revision {hub_home.dataset_commit}" in audit.stdout
    assert f"base {MODEL_ID} at commit {hub_home.model_commit}" in audit.stdout
