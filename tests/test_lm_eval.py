"""Standard benchmarks in evaluate (evaluate.benchmarks) through the real lm-evaluation-harness, on the tiny Llama
with a random non-zero LoRA adapter (so base and tuned differ), offline (conftest sets HF_HUB_OFFLINE=1).

The hub caches here are made by huggingface_hub's own client (tests/hub_cache.py); nothing is mocked. Each test
that names a harness task pays lm-eval's task index (~10 s: it reads every one of its ~15k task configs).
"""

from __future__ import annotations

import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from tasks.common import paths
from tasks.common.artifacts import read_json
from tasks.common.config import with_overrides
from tasks.common.errors import PipelineError
from tasks.common.formatted import load_rows
from tasks.evaluate import benchmarks
from tests.conftest import scratch_project
from tests.hub_cache import Repo, fill_hub_cache

SPLITS = ("train", "validation", "test")  # arc_easy reads test, and its few-shot examples from train


@pytest.fixture(scope="module")
def project(tmp_path_factory, params):
    """download -> validate -> format on the sample, and a random LoRA adapter (B not zero) in artifacts/adapter."""
    import torch
    from peft import LoraConfig, get_peft_model

    from tasks.common.base_model import load_base_model
    from tasks.download.stage import download
    from tasks.format.stage import format_rows
    from tasks.validate.stage import validate

    root = scratch_project(tmp_path_factory.mktemp("project"))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        download(params.download)
        validate(params)
        format_rows(params.format, params.model)
        torch.manual_seed(0)
        lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        get_peft_model(load_base_model(params.model, params.quant), lora).save_pretrained(paths.ADAPTER_DIR)
    return root


@pytest.fixture
def offline_caches(tmp_path, monkeypatch):
    """An empty hub cache and an empty datasets cache: nothing but what a test puts there can be had."""
    import datasets
    from huggingface_hub import constants

    assert datasets.config.HF_HUB_OFFLINE  # the suite runs offline (conftest)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    return tmp_path / "hub"


def test_the_held_out_task_scores_base_and_tuned_into_the_metrics_and_the_card(project, params, monkeypatch):
    """heldout_answers through the evaluate stage: lm-eval's log-likelihood of each answer given its rendered
    prompt is, summed, the stage's own answer loss (the same tokens, no BOS added, nothing cut), for base and tuned."""
    from tasks.evaluate.stage import evaluate
    from tasks.publish.stage import benchmarks_table

    monkeypatch.chdir(project)
    p = with_overrides(params, **{"evaluate.benchmarks.tasks": [benchmarks.HELDOUT]})
    evaluation = evaluate(p)

    bench = read_json(paths.EVALUATION)["benchmarks"]
    assert bench == evaluation["benchmarks"] and bench["requested"] == [benchmarks.HELDOUT]
    task = bench["tasks"][benchmarks.HELDOUT]
    docs = benchmarks.answer_docs(load_rows(paths.EVAL_ROWS)[: p.evaluate.max_rows])
    assert task["n_samples"] == len(docs) > 0
    answer_bytes = sum(len(d["answer"].encode()) for d in docs)
    for model in ("base", "tuned"):
        bpb = task["metrics"]["bits_per_byte"][model]
        assert math.isfinite(bpb) and bpb > 0
        nats = bpb * math.log(2) * answer_bytes  # bits per byte back to the summed negative log-likelihood
        stage = evaluation[model]["loss"] * evaluation[model]["answer_tokens"]
        assert nats == pytest.approx(stage, rel=1e-4), model
    pair = task["metrics"]["byte_perplexity"]
    assert pair["base"] != pair["tuned"]  # the adapter is scored, and disabled for the base

    headline = read_json(paths.EVAL_METRICS)["benchmarks"][benchmarks.HELDOUT]
    assert headline["bits_per_byte"] == {k: round(task["metrics"]["bits_per_byte"][k], 4) for k in ("base", "tuned")}
    table = benchmarks_table(bench)
    row = next(line for line in table.splitlines() if line.startswith(f"| {benchmarks.HELDOUT} | bits_per_byte"))
    assert f"{pair['tuned']:.4f}" in table and f"| {len(docs)} |" in row


def test_a_harness_task_whose_data_cannot_be_had_offline_stops_naming_it(project, offline_caches):
    rows = load_rows(project / paths.EVAL_ROWS)
    with pytest.raises(PipelineError) as err:
        benchmarks.prepare(["hellaswag"], rows)
    message = str(err.value)
    assert "'hellaswag'" in message and str(offline_caches) in message
    assert "hf download --repo-type dataset" in message and "evaluate.benchmarks.tasks" in message


def _arc_easy() -> tuple[str, str]:
    """arc_easy's Hub dataset and config, from lm-eval's own task config."""
    import lm_eval

    cfg = yaml.safe_load((Path(lm_eval.__file__).parent / "tasks/arc/arc_easy.yaml").read_text())
    return cfg["dataset_path"], cfg["dataset_name"]


def _parquet(rows: list[dict]) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows), sink)
    return sink.getvalue().to_pybytes()


def test_a_harness_task_runs_offline_from_the_hub_cache(project, params, offline_caches, monkeypatch):
    """arc_easy with its dataset in a hub cache as `hf download` leaves it (datasets alone would not read it
    offline): base and tuned score the cached questions, and the snapshot's commit is recorded."""
    from peft import PeftModel

    from tasks.common.base_model import load_base_model, load_tokenizer

    dataset, config = _arc_easy()
    questions = [
        {
            "id": f"q{i}",
            "question": f"What is {i} plus {i}?",
            "choices": {"text": [str(2 * i), str(2 * i + 1), "seven"], "label": ["A", "B", "C"]},
            "answerKey": "A",
        }
        for i in range(6)
    ]
    card = yaml.safe_dump(
        {"configs": [{"config_name": config, "data_files": [{"split": s, "path": f"{config}/{s}-*"} for s in SPLITS]}]}
    )
    files = {"README.md": f"---\n{card}---\n".encode()}
    files |= {f"{config}/{s}-00000-of-00001.parquet": _parquet(questions) for s in SPLITS}
    repo = Repo(dataset, "dataset", files)
    fill_hub_cache(offline_caches, [repo])

    monkeypatch.chdir(project)
    p = with_overrides(params, **{"evaluate.benchmarks.tasks": ["arc_easy"], "evaluate.benchmarks.limit": 4})
    prepared = benchmarks.prepare(p.evaluate.benchmarks.tasks, load_rows(paths.EVAL_ROWS))
    assert prepared.hub_snapshots == {"arc_easy": {"dataset": dataset, "revision": None, "commit": repo.commit}}
    model = PeftModel.from_pretrained(load_base_model(p.model, p.quant), paths.ADAPTER_DIR).eval()
    result = benchmarks.run(model, load_tokenizer(p.model), prepared, p)

    arc = result["tasks"]["arc_easy"]
    assert arc["n_samples"] == 4 and arc["higher_is_better"]["acc"] is True
    for pair in arc["metrics"].values():
        assert all(0 <= pair[k] <= 1 for k in ("base", "tuned"))
    assert set(benchmarks.headline(result)["arc_easy"]) == {"acc", "acc_norm"}
