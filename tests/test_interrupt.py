"""Ctrl-C in the middle of a stage: a one-line message and exit 130, no traceback, no half-written output, and the
last good outputs in place."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import yaml

from tasks.common import paths
from tasks.common.config import with_overrides
from tests.conftest import ROOT, wait_for


def _stage(name: str, cwd, **kw):
    cmd = [sys.executable, "-m", f"tasks.{name}"]
    # SIGINT back to its default in the stage, as in a terminal: a suite started in the background by a shell without
    # job control inherits SIGINT ignored, and Python then leaves it ignored, so Ctrl-C would never reach the stage.
    return subprocess.Popen(
        cmd,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        **kw,
    )


def _set_input(workdir, params, path) -> None:
    p = with_overrides(params, **{"download.source": "local", "download.path": str(path)})
    (workdir / "params.yaml").write_text(yaml.safe_dump(p.as_dict(), sort_keys=False))


def test_ctrl_c_in_validate_keeps_the_last_good_outputs(workdir, params):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # the stages run from the scratch dir, as dvc runs them
    _set_input(workdir, params, paths.SAMPLE_DATA)
    for stage in ("download", "validate"):  # a good run first
        proc = _stage(stage, workdir, env=env)
        _, err = proc.communicate(timeout=600)  # communicate, not wait: a full pipe would block the stage
        assert proc.returncode == 0, err
    validated = workdir / "data" / "validated"
    good = (validated / "conversations.jsonl").read_bytes()

    sample = (workdir / paths.SAMPLE_DATA).read_text(encoding="utf-8").splitlines()
    big = workdir / "big.jsonl"
    with open(big, "w", encoding="utf-8") as f:  # enough rows that validate is still scanning when interrupted
        for i in range(40_000):
            row = json.loads(sample[i % len(sample)])
            row["text"] += f" ({i})"
            f.write(json.dumps(row) + "\n")
    _set_input(workdir, params, big)
    proc = _stage("download", workdir, env=env)
    assert proc.communicate(timeout=600) and proc.returncode == 0

    proc = _stage("validate", workdir, env=env)
    wait_for(lambda: list(validated.glob(".*.tmp")), timeout=300, what="validate's scan to start", every=0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "[validate] interrupted: no output is half-written" in err
    assert "Traceback" not in err
    assert sorted(p.name for p in validated.iterdir()) == ["conversations.jsonl"]  # no temp file left
    assert (validated / "conversations.jsonl").read_bytes() == good


def test_sigterm_in_download_leaves_no_temp_file_and_the_last_good_outputs(workdir, params):
    """SIGTERM (a scheduler or container stopping the job): Python's default ended the process at once and left a
    31 MB data/raw/.rows.jsonl.<hex>.tmp behind (found by a messy-input probe). Now it unwinds as Ctrl-C does."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    _set_input(workdir, params, paths.SAMPLE_DATA)
    proc = _stage("download", workdir, env=env)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    raw = workdir / "data" / "raw"
    good = {p.name: p.read_bytes() for p in raw.iterdir()}

    line = json.dumps({"text": "### Human: hi ### Assistant: " + "hello " * 200}) + "\n"
    big = workdir / "big.jsonl"
    big.write_text(line * 200_000, encoding="utf-8")  # about 250 MB: still writing when the signal comes
    _set_input(workdir, params, big)
    proc = _stage("download", workdir, env=env)
    wait_for(lambda: list(raw.glob(".*.tmp")), timeout=300, what="download's write to start", every=0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "[download] interrupted: no output is half-written" in err and "Traceback" not in err
    assert {p.name: p.read_bytes() for p in raw.iterdir()} == good  # no temp file, the last good outputs intact


def test_the_next_stage_removes_what_a_killed_run_left_and_puts_back_a_folder_moved_aside(workdir):
    """SIGKILL runs no clean-up: the killed stage's temporary names stay beside (or inside) the outputs, hidden from
    DVC (.dvcignore), which may never run that stage again. The next stage to start, holding the workspace lock,
    removes them before anything else, whichever stage it is; a folder killed between staged_dir's two renames gets
    its last good copy back. Names that are not the pipeline's stay."""
    hexa = "0123456789abcdef"
    (workdir / ".dvc" / "tmp").mkdir(parents=True)
    files = [  # (a killed run's leftover, a file in it when it is a folder)
        (f"data/raw/.rows.jsonl.{hexa}.tmp", None),
        (f"data/validated/..conversations.jsonl.candidates.{hexa}.tmp", None),
        ("data/validated/.conversations.jsonl.candidates", None),
        (f"data/.formatted.{hexa}.tmp", "train.jsonl"),
        (f"artifacts/checkpoints/.run.json.{hexa}.tmp", None),
        (f".release.{hexa}.tmp", "lineage.json"),
        (".release.old", "lineage.json"),  # beside a release in place: stale
        (f"models/.tiny-llama.{hexa}.tmp", "config.json"),
        (f".dvc/tmp/.pipeline-run.json.{hexa}.tmp", None),
        ("artifacts/.adapter.old", "adapter_config.json"),  # the adapter itself is missing: its last good copy
    ]
    kept = ["release/lineage.json", "data/.notes.tmp", f".scratch.{hexa}.tmp", "data/raw/rows.jsonl"]
    for rel in [f"{left}/{inside}" if inside else left for left, inside in files] + kept:
        (workdir / rel).parent.mkdir(parents=True, exist_ok=True)
        (workdir / rel).write_text(rel)

    proc = _stage("format", workdir, env={**os.environ, "PYTHONPATH": str(ROOT)})
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 2, err  # nothing to format: it stops, after the sweep
    assert "removed what a killed run left unfinished" in err
    assert [left for left, _ in files if (workdir / left).exists()] == []
    restored = workdir / "artifacts" / "adapter" / "adapter_config.json"
    assert restored.read_text() == "artifacts/.adapter.old/adapter_config.json"  # the last good copy, back
    for rel in kept:
        assert (workdir / rel).read_text() == rel
