"""Two runs at once on one workspace: real processes and the real lock (tasks/common/run_lock.py), nothing mocked."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tasks.common import paths, run_lock
from tests.conftest import venv_env

ENV = venv_env()
ENV.pop(run_lock.COVER_ENV, None)

# A stage process of another run: takes the workspace lock exactly as a stage entry does, then stays in its stage.
HOLD_AS_STAGE = "import sys, time; from tasks.common import run_lock; lock = run_lock.hold_for_stage(sys.argv[1]); print('held', flush=True); time.sleep(600)"  # noqa: E501
# A dvc command in progress: DVC's repo lock taken through DVC's own lock library, as `dvc repro` takes it.
HOLD_AS_DVC = (
    "import time, zc.lockfile; lock = zc.lockfile.LockFile('.dvc/tmp/lock'); print('held', flush=True); time.sleep(600)"  # noqa: E501
)
# A dvc command running a stage: DVC has let go of its repo lock and holds the stage's files in its per-file lock,
# under its command line as DVC records it (" ".join(sys.argv), which the flow checks against the live process).
HOLD_AS_DVC_STAGE = """
import os, sys, time
from dvc.fs import localfs
from dvc.rwlock import rwlock
os.makedirs('.dvc/tmp', exist_ok=True)
with rwlock('.dvc/tmp', localfs, ' '.join(sys.argv), [], [os.path.abspath('data/raw')], False):
    print('held', flush=True)
    time.sleep(600)
"""


@contextlib.contextmanager
def holding(project: Path, code: str, *args: str):
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *args],
        cwd=project,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        assert line.strip() == "held", f"the holder did not take the lock: {line}{proc.stdout.read()}"
        yield proc
    finally:
        proc.kill()
        proc.wait()


def stage(project: Path, name: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", f"tasks.{name}"], cwd=project, env=ENV, capture_output=True, text=True)


def snapshot(project: Path) -> dict[str, bytes]:
    """Every file of the workspace but git's, the lock's own and the run history: what a refused run must not touch."""
    skip = (".git", ".dvc/tmp", "runs")
    return {
        str(p.relative_to(project)): p.read_bytes()
        for p in sorted(project.rglob("*"))
        if p.is_file() and not str(p.relative_to(project)).startswith(skip)
    }


def dvc(project: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        ["dvc", *args], cwd=project, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def test_a_stage_refuses_while_another_run_holds_the_workspace_and_a_killed_holder_blocks_nothing(project_copy):
    before = snapshot(project_copy)
    with holding(project_copy, HOLD_AS_STAGE, "train") as holder:
        refused = stage(project_copy, "download")
        assert refused.returncode == 2, refused.stderr
        assert re.search(
            rf"another run is in progress \(started \S+, pid {holder.pid}\): stage 'train'", refused.stderr
        ), refused.stderr
        assert "changed nothing" in refused.stderr and "Traceback" not in refused.stderr
        assert snapshot(project_copy) == before  # the refused stage wrote nothing
        holder.send_signal(signal.SIGKILL)  # killed mid-stage: its sidecar stays behind, naming a dead pid
        holder.wait()
        assert json.loads((project_copy / run_lock.HOLDER_FILE).read_text())["pid"] == holder.pid
        ran = stage(project_copy, "download")  # the kernel released the flock: the stale sidecar is not trusted
        assert ran.returncode == 0, ran.stderr
        assert (project_copy / paths.RAW_ROWS).is_file()
    assert not (project_copy / run_lock.HOLDER_FILE).exists()  # released on the way out


# Takes the lock as the train stage does, then re-executes itself (as train does for one GPU) into CHECK_COVER.
REEXEC = (
    "import os, sys; from tasks.common import run_lock; run_lock.hold_for_stage('train'); "
    "os.execv(sys.executable, [sys.executable, '-c', sys.argv[1]])"
)
CHECK_COVER = """
import json, os, subprocess, sys
from tasks.common import run_lock
covered = run_lock.hold_for_stage('train') is None  # the same run, after exec: the inherited lock covers it
def refused(env):
    p = subprocess.run([sys.executable, '-m', 'tasks.download'], env=env, capture_output=True, text=True)
    return p.returncode == 2 and 'another run is in progress' in p.stderr
outsider = {k: v for k, v in os.environ.items() if k != run_lock.COVER_ENV}
hold = 'from tasks.common import run_lock; print(run_lock.hold_for_stage("format"))'
child = subprocess.run([sys.executable, '-c', hold], capture_output=True, text=True).stdout.strip()
print(json.dumps({"covered": covered, "child": child, "outsider_refused": refused(outsider),
                  "forged_refused": refused({**outsider, run_lock.COVER_ENV: "1-forged"})}))
"""


def test_the_holder_covers_its_children_and_its_re_executed_self_but_no_one_else(project_copy):
    out = subprocess.run(
        [sys.executable, "-c", REEXEC, CHECK_COVER], cwd=project_copy, env=ENV, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {
        "covered": True,
        "child": "None",
        "outsider_refused": True,
        "forged_refused": True,
    }
    assert not (project_copy / paths.RAW_DIR).exists()


LOCK_MESSAGES = re.compile(r"Unable to acquire lock|is busy, it is being blocked by|another run is in progress")


@pytest.mark.slow
def test_two_dvc_repro_at_once_run_each_stage_once_and_leave_the_workspace_consistent(project_copy):
    # Started together, one runs; the other, depending on when it looks, stops with DVC's repo lock message (after
    # DVC's 3 s of retries), DVC's "is busy" (a stage of the first holds its files), or ours, and wrote nothing.
    procs = [dvc(project_copy, "repro", "validate") for _ in range(2)]
    outs = [(p.wait(timeout=600), p.stdout.read()) for p in procs]
    for rc, out in outs:
        assert rc == 0 or LOCK_MESSAGES.search(out), out
    succeeded = "".join(out for rc, out in outs if rc == 0)
    assert succeeded.count("Running stage 'download'") == 1 and succeeded.count("Running stage 'validate'") == 1, outs
    status = dvc(project_copy, "status", "validate")  # validate and what it depends on
    assert status.wait(timeout=120) == 0 and "Data and pipelines are up to date" in status.stdout.read()


def _flow_in_thread(project: Path) -> tuple[threading.Thread, dict]:
    from flows.pipeline import pipeline

    box: dict = {}

    def run():
        box["state"] = pipeline(project_dir=str(project), return_state=True)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, box


@pytest.mark.slow
def test_a_flow_skips_while_a_stage_or_a_dvc_command_is_at_work_and_touches_nothing(project_copy, prefect_harness):
    from flows import history
    from flows.pipeline import SKIPPED, pipeline

    before = snapshot(project_copy)
    for code, args, names in (
        (HOLD_AS_STAGE, ["train"], "stage 'train'"),
        (HOLD_AS_DVC, [], "holding DVC's lock"),
        (
            HOLD_AS_DVC_STAGE,
            ["dvc", "repro", "(a stage starting up)"],
            "dvc repro (a stage starting up)` running a stage",
        ),
    ):
        with holding(project_copy, code, *args) as holder:
            state = pipeline(project_dir=str(project_copy), overrides=["train.max_steps=2"], return_state=True)
        assert state.is_completed() and state.name == "Skipped"
        result = state.result()
        assert result["outcome"] == SKIPPED and result["ran"] == {}
        assert f"pid {holder.pid}" in result["detail"] and names in result["detail"], result["detail"]
        record = history.read(project_copy)[-1]
        assert record["outcome"] == SKIPPED and f"pid {holder.pid}" in record["detail"]
        assert snapshot(project_copy) == before  # params not recomposed, no stage ran, nothing written


@pytest.mark.slow
def test_while_a_flow_holds_the_workspace_a_stage_and_a_second_flow_refuse_and_the_flow_goes_on(
    project_copy, prefect_harness
):
    from flows import history
    from flows.pipeline import SKIPPED, pipeline

    # Keep the flow short: rows that fail validation end it after two stages.
    sample = project_copy / paths.SAMPLE_DATA
    bad = [json.dumps({"text": f"### Human: ### Assistant: answer {i}"}) for i in range(8)]
    sample.write_text(sample.read_text() + "\n".join(bad) + "\n")

    # Pin the flow between its stages: as soon as it holds the workspace, a "dvc command" takes DVC's repo lock
    # (the flow's next `dvc repro` waits for it: --wait-for-lock), and holds data/raw in DVC's per-file lock table
    # (which fails a `dvc repro` at once: the flow retries). Meanwhile the flow holds the workspace.
    pin = subprocess.Popen(
        [sys.executable, "-c", PIN_WHEN_FLOW_HOLDS],
        cwd=project_copy,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        thread, box = _flow_in_thread(project_copy)
        assert pin.stdout.readline().strip() == "held", pin.stdout.read()
        assert "Prefect flow run" in (project_copy / run_lock.HOLDER_FILE).read_text()

        before = snapshot(project_copy)
        refused = stage(project_copy, "download")
        assert refused.returncode == 2, refused.stderr
        assert re.search(
            rf"another run is in progress \(started \S+, pid {os.getpid()}\): Prefect flow run", refused.stderr
        ), refused.stderr
        second = pipeline(project_dir=str(project_copy), return_state=True)
        assert second.name == "Skipped" and f"pid {os.getpid()}" in second.result()["detail"]
        assert pin.stdout.readline().strip() == "repo lock released", pin.stdout.read()  # after 4 s: > DVC's retries
        time.sleep(5)  # the flow's dvc now finds data/raw busy, again and again
        assert snapshot(project_copy) == before and thread.is_alive()
    finally:
        pin.kill()
        pin.wait()
    thread.join(timeout=300)
    first = box["state"]
    assert first.is_failed() and "stage 'validate' failed" in str(first.result(raise_on_failure=False))
    outcomes = [r["outcome"] for r in history.read(project_copy)]
    assert outcomes == [SKIPPED, "failed at validate"]
    assert not (project_copy / run_lock.HOLDER_FILE).exists()
    with run_lock.hold_for_flow(project_copy, "after"):  # a failed flow released the workspace
        pass


PIN_WHEN_FLOW_HOLDS = """
import os, time, zc.lockfile
from dvc.fs import localfs
from dvc.rwlock import rwlock
from tasks.common import run_lock
deadline = time.time() + 120
while not (run_lock.HOLDER_FILE.exists() and 'Prefect flow run' in run_lock.HOLDER_FILE.read_text()):
    assert time.time() < deadline, 'the flow never took the workspace'
    time.sleep(0.005)
while True:  # the flow's own dvc may hold it for a moment
    try:
        repo_lock = zc.lockfile.LockFile('.dvc/tmp/lock')
        break
    except zc.lockfile.LockError:
        time.sleep(0.005)
with rwlock('.dvc/tmp', localfs, 'dvc repro (pin)', [], [os.path.abspath('data/raw')], False):
    print('held', flush=True)
    time.sleep(4)
    repo_lock.close()
    print('repo lock released', flush=True)
    time.sleep(600)
"""


def test_a_dvc_lock_table_cut_short_by_a_kill_stops_a_flow_with_what_to_do_and_holds_nothing(tmp_path):
    """DVC rewrites its per-file lock table in place: a dvc command killed in that instant leaves a prefix of the
    JSON, and every dvc command then refuses. A flow starting on it stopped with a traceback, and kept the workspace
    lock while its process lived; now it says which file to delete and when, and holds nothing."""
    from tasks.common.errors import PipelineError

    (tmp_path / ".dvc" / "tmp").mkdir(parents=True)
    (tmp_path / run_lock.DVC_RWLOCK_GUARD).write_text("")
    (tmp_path / run_lock.DVC_RWLOCK).write_text('{"write": {"/w/data/raw": {"pid": 12')  # as json.dump left it
    with pytest.raises(PipelineError) as refused:
        run_lock.hold_for_flow(tmp_path, "flow-1")
    assert str(run_lock.DVC_RWLOCK) in str(refused.value) and "changed nothing" in str(refused.value)
    assert not run_lock._taken(tmp_path / run_lock.LOCK_FILE)
    (tmp_path / run_lock.DVC_RWLOCK).unlink()
    run_lock.hold_for_flow(tmp_path, "flow-2").release()
