"""A full disk, for real: each stage run under a file-size limit (RLIMIT_FSIZE, what `ulimit -f` sets; the kernel
fails the write with EFBIG exactly as a full filesystem fails it with ENOSPC) smaller than its main output. Each
stops with one line naming the output and the space, leaves the last good outputs byte for byte, leaves no
temporary file, never resumes from the checkpoint it could not finish; with the limit gone, `dvc repro` and the
audit pass."""

from __future__ import annotations

import resource
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.common import paths
from tasks.common.artifacts import sha256_tree
from tests.conftest import dvc, venv_env

pytestmark = pytest.mark.slow

# stage: (file-size limit in bytes, below its main output's size on the sample; the output the message names)
LIMITS = {
    "download": (8 << 10, paths.RAW_ROWS),
    "validate": (16 << 10, paths.CONVERSATIONS),
    "format": (8 << 10, paths.FORMATTED_DIR),
    "train": (200 << 10, paths.CHECKPOINT_DIR),  # the optimizer's state (~270 KiB); DVC's caches stay under it
    "evaluate": (512, paths.GENERATIONS),
    "publish": (64 << 10, paths.RELEASE_DIR),
}
KEPT = [paths.RAW_DIR, paths.VALIDATED_DIR, paths.FORMATTED_DIR, paths.ADAPTER_DIR, paths.EVALUATION,
        paths.GENERATIONS, paths.RELEASE_DIR, paths.TRAIN_METRICS, paths.EVAL_METRICS]  # fmt: skip


def _limited(project: Path, stage: str, limit: int) -> subprocess.CompletedProcess:
    def set_limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    env = venv_env()
    return subprocess.run(
        [sys.executable, "-m", f"tasks.{stage}"], cwd=project, capture_output=True, text=True, env=env,
        preexec_fn=set_limit, timeout=600,
    )  # fmt: skip


def _outputs(project: Path) -> dict[str, dict[str, str]]:
    return {str(p): sha256_tree(project / p, include_hidden=True) for p in KEPT}


def test_each_stage_stops_cleanly_when_the_disk_is_full_and_the_next_run_completes(reproduced_project):
    # DVC keeps caches per project path (its site cache: file hashes, links); a first run in this folder would have
    # made them, and dvclive's calls into DVC during train would otherwise write them under the limit
    dvc(reproduced_project, "status")
    good = _outputs(reproduced_project)
    for stage, (limit, output) in LIMITS.items():
        proc = _limited(reproduced_project, stage, limit)
        assert proc.returncode == 2, f"{stage}: {proc.returncode}\n{proc.stderr[-3000:]}"
        assert "Traceback" not in proc.stderr, f"{stage}:\n{proc.stderr[-3000:]}"
        errors = [line for line in proc.stderr.splitlines() if f"[{stage}] ERROR:" in line]
        assert len(errors) == 1 and "no space to write" in errors[0], f"{stage}:\n{proc.stderr[-3000:]}"
        assert f" {output}:" in errors[0], errors[0]  # the output it could not write
        assert "file-size limit" in errors[0]
        assert _outputs(reproduced_project) == good, f"{stage} changed the last good outputs"
        leftovers = [p for p in reproduced_project.rglob(".*.tmp")] + [p for p in reproduced_project.rglob(".*.old")]
        assert not leftovers, leftovers

    # the checkpoint train could not finish has no completion marker: the next run removes it, never resumes from it
    from tasks.train.checkpoints import COMPLETE

    unfinished = list((reproduced_project / paths.CHECKPOINT_DIR).glob("checkpoint-*"))
    assert unfinished and not any((c / COMPLETE).exists() for c in unfinished)

    # space back: train runs again, removing the unfinished checkpoint instead of resuming from it; `dvc repro`
    # brings the rest up to date and the audit passes
    env = venv_env()
    again = subprocess.run(
        [sys.executable, "-m", "tasks.train"], cwd=reproduced_project, capture_output=True, text=True, env=env
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert "removing incomplete checkpoint" in again.stderr + again.stdout
    dvc(reproduced_project, "repro")
    audit = subprocess.run(
        [sys.executable, "-m", "tasks.publish.audit", "release"], cwd=reproduced_project, capture_output=True, text=True
    )
    assert audit.returncode == 0, audit.stdout[-3000:]
