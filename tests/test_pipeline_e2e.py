"""End to end on a fresh clone: `dvc repro`, the Prefect flow, and what re-runs when a param changes."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest
import yaml

from tasks.common import paths
from tasks.common.paths import STAGES
from tests.conftest import FIRST_REPRO_OUTPUT, dvc, dvc_fails

pytestmark = pytest.mark.slow


def ran(output: str) -> list[str]:
    return re.findall(r"Running stage '(\w+)'", output)


def test_dvc_repro_from_a_fresh_clone(reproduced_template, reproduced_project):
    """The fresh clone's first `dvc repro` is the one reproduced_template ran (shared with the tests that start after
    a first good run); what follows it runs on this test's own copy."""
    out = (reproduced_template.parent / FIRST_REPRO_OUTPUT).read_text()
    assert ran(out) == list(STAGES)
    # Library messages go to each stage's log file, not the terminal (tasks/common/stage_log.py): no Python warning line
    # (its own format, "<file>:<line>: <Category>: ...") reaches the output, whatever a library's words.
    assert not re.search(r"^\S+:\d+: \w+: ", out, re.M), out
    for stage in STAGES:
        assert (reproduced_project / paths.LOG_DIR / f"{stage}.log").stat().st_size > 0, stage
    release = reproduced_project / paths.RELEASE_DIR
    for name in (
        paths.ADAPTER_WEIGHTS,
        "adapter_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "README.md",
        "lineage.json",
    ):
        assert (release / name).is_file(), name
    for out_path in (
        paths.RAW_ROWS,
        paths.SOURCE_RECORD,
        paths.CONVERSATIONS,
        paths.VALIDATION_RESULT,
        paths.LENGTH_REPORT,
        paths.LENGTH_HISTOGRAM,
        paths.TRAIN_ROWS,
        paths.EVAL_ROWS,
        paths.TRAIN_METRICS,
        paths.EVAL_METRICS,
        paths.EVALUATION,
        paths.VALIDATION_SUMMARY,
        paths.TRAINING,
        paths.GENERATIONS,
    ):
        assert (reproduced_project / out_path).is_file(), out_path
    assert (reproduced_project / paths.VALIDATION_REPORT_DIR / "data_docs" / "index.html").is_file()
    # train.gemm_warmup is on by default and CUDA only: the report says it did not run here
    training = json.loads((reproduced_project / paths.TRAINING).read_text())
    assert "gemm_warmup" in training and training["gemm_warmup"] is None

    # One table of every stage's headline figures that fits an 80-column terminal (every figure: reports/)
    table = dvc(reproduced_project, "metrics", "show")
    assert max(len(line) for line in table.splitlines()) <= 80, table
    header = table.splitlines()[0].split()
    assert set(header) == {"Path", "ok", "excluded", "loss", "tok/s", "stops"}, header  # peak_GiB: null on the CPU

    edges = re.findall(r'"(\w+)" -> "(\w+)"', dvc(reproduced_project, "dag", "--dot"))
    for a, b in zip(STAGES, STAGES[1:]):
        assert (a, b) in edges, f"{a} -> {b} missing from dvc dag"

    again = dvc(reproduced_project, "repro")
    assert ran(again) == [] and "up to date" in again

    params = yaml.safe_load((reproduced_project / "params.yaml").read_text())
    params["train"]["learning_rate"] = 1.0e-3
    (reproduced_project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert ran(dvc(reproduced_project, "repro")) == ["train", "evaluate", "publish"]

    # A failed stage leaves every output of every stage as the last good run left it (dvc.yaml: all persist).
    outputs = [
        paths.ADAPTER_DIR,
        paths.TRAIN_METRICS,
        paths.DVCLIVE_DIR,
        paths.LOSS_CURVE,
        paths.EVAL_METRICS,
        paths.EVALUATION,
        paths.GENERATIONS,
        paths.EVAL_RUN,
        paths.RELEASE_DIR,
    ]
    good = snapshot(reproduced_project, outputs)
    assert good[str(paths.TRAIN_METRICS)] and any(k.startswith(str(paths.DVCLIVE_DIR)) for k in good)
    params["train"]["optimizer"] = "paged_adamw_32bit"  # stops in train's preflight on the CPU
    (reproduced_project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    failed = dvc_fails(reproduced_project, "repro")
    assert "paged_adamw_32bit needs a CUDA GPU" in failed
    assert snapshot(reproduced_project, outputs) == good

    params["train"]["optimizer"] = "adamw_torch"  # train is up to date again; now evaluate fails on broken rows
    (reproduced_project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (reproduced_project / paths.EVAL_ROWS).write_text("{not json\n")
    failed = dvc_fails(reproduced_project, "repro", "--single-item", "evaluate")
    assert "Running stage 'evaluate'" in failed
    assert snapshot(reproduced_project, outputs) == good


def snapshot(project: Path, rels: list) -> dict[str, str]:
    """sha256 of every file under the given outputs (relative path -> hash)."""
    from tasks.common.artifacts import sha256_file

    files = {}
    for rel in rels:
        root = project / rel
        for f in [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file()):
            files[str(f.relative_to(project))] = sha256_file(f)
    return files


def test_prefect_flow_runs_the_same_stages_and_leaves_the_same_lineage(project_copy, prefect_harness):
    from flows.pipeline import pipeline

    state = pipeline(project_dir=str(project_copy), return_state=True)
    first = state.result()
    assert first["ran"] == {s: True for s in STAGES}
    assert (project_copy / paths.RELEASE_DIR / "lineage.json").is_file()
    # The release's provenance names the flow run that made it, also when the flow is called directly.
    from tasks.publish import provenance

    envelope = json.loads((project_copy / paths.RELEASE_DIR / provenance.FILE).read_text())
    statement = json.loads(base64.b64decode(envelope["payload"]))
    metadata = statement["predicate"]["runDetails"]["metadata"]
    assert metadata["invocationId"] == str(state.state_details.flow_run_id)
    # The flow went through DVC: dvc.lock is complete, and `dvc repro` finds nothing to do.
    lock = yaml.safe_load((project_copy / "dvc.lock").read_text())
    assert sorted(lock["stages"]) == sorted(STAGES)
    assert ran(dvc(project_copy, "repro")) == []
    second = pipeline(project_dir=str(project_copy))
    assert second["ran"] == {s: False for s in STAGES}


def test_a_failed_validation_fails_its_task_with_the_report_location_and_nothing_downstream_runs(
    project_copy, prefect_harness
):
    import anyio
    from prefect.client.orchestration import get_client

    from flows import history
    from flows.pipeline import pipeline

    sample = project_copy / paths.SAMPLE_DATA
    bad = [json.dumps({"text": f"### Human: ### Assistant: answer {i}"}) for i in range(8)]  # empty user turns
    sample.write_text(sample.read_text() + "\n".join(bad) + "\n")
    state = pipeline(project_dir=str(project_copy), return_state=True)
    assert state.is_failed()
    message = str(state.result(raise_on_failure=False))
    assert "stage 'validate' failed" in message and "reports/validation/result.json" in message
    assert not (project_copy / paths.FORMATTED_DIR).exists() and not (project_copy / paths.RELEASE_DIR).exists()
    assert history.read(project_copy)[-1]["outcome"] == "failed at validate"

    async def task_states() -> dict[str, str]:
        async with get_client() as client:
            runs = await client.read_task_runs()
        return {r.name: r.state.type.value for r in runs if r.flow_run_id == state.state_details.flow_run_id}

    states = anyio.run(task_states)
    assert states["download"] == "COMPLETED" and states["validate"] == "FAILED"
    assert "format" not in states  # never started
