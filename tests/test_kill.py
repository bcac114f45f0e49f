"""SIGKILL at chosen points of every stage, as DVC runs it (issue 27): no clean-up runs, as when the OOM killer, a
scheduler's hard stop or a machine going down ends the stage. Each stage is run by `dvc repro -s <stage> --force` in
its own process group and killed, the stage alone or with its dvc, at three points of its own progress: early
(started, or holding the workspace lock before it writes), in the middle (a marker of its work: a temporary output
appearing, a training step logged past a checkpoint, or half its measured time), late (its last output being
written, or the stage done while dvc records it). After each kill no output is half-written: every output is as the
kill found it, or (the killed stage's own) a whole new version, byte for byte what the stage gives where that is
deterministic; what the kill left is only temporary names DVC does not see, which the next stage removes. The killed
train resumes to the uninterrupted run's adapter, byte for byte; at the end `dvc repro` completes, nothing is left
over and the audit passes."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from tasks.common import paths
from tasks.common.artifacts import sha256_file, sha256_tree
from tasks.common.run_lock import HOLDER_FILE
from tests.conftest import ROOT, dvc, venv_env

pytestmark = pytest.mark.slow

# A killed stage's temporary names (tasks/common/artifacts.py), as .dvcignore hides them from DVC
LEFTOVER = re.compile(r"\..+\.(?:[0-9a-f]{16}\.tmp|old|candidates)")
# The outputs, or files of them, a rerun on the same inputs writes anew: times, timestamps, signatures, and PEFT's
# target_modules (a set: its order in the JSON follows each process's string hashing). Everything else must come
# back byte for byte.
VARYING = ("data/raw/source.json", "reports/validation/", "reports/training.json", "metrics/train.json",
           "dvclive/train/", "release/", "artifacts/adapter/adapter_config.json")  # fmt: skip
CHECKPOINT_LOSS = paths.CHECKPOINT_DIR / "dvclive" / "plots" / "metrics" / "loss.tsv"

# stage: its kill points in the order run, each (what it waits for, what is killed: the stage alone or its whole
# process group, dvc included). "recorded": the stage has ended and its dvc is hashing and recording the outputs.
KILLS = {
    "download": [("started", "stage"), ("locked", "group"), ("recorded", "group")],
    "validate": [("locked", "stage"), ("candidates", "group"), ("report staged", "group")],
    "format": [("started", "stage"), ("locked", "group"), ("recorded", "group")],
    "train": [("locked", "stage"), ("past checkpoint-10", "group"), ("adapter staged", "group")],
    "evaluate": [("locked", "stage"), ("recorded", "group"), ("half its time", "group")],
    "publish": [("locked", "stage"), ("release staged", "group"), ("recorded", "group")],
}


def _declared() -> dict[str, list[str]]:
    """dvc.yaml's outputs (outs, metrics, plots) by stage."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    return {
        name: [next(iter(e)) for kind in ("outs", "metrics", "plots") for e in stage.get(kind, [])]
        for name, stage in stages.items()
    }


OUTPUTS = _declared()


def _outputs(project: Path) -> dict[str, dict[str, str] | None]:
    """Every output's files and their sha256 as DVC sees them (dotfiles left out, as .dvcignore leaves out the
    temporary names); None for an output that is absent."""
    out = {}
    for rel in (p for outs in OUTPUTS.values() for p in outs):
        path = project / rel
        if not path.exists():
            out[rel] = None
            continue
        files = sha256_tree(path)
        out[rel] = {(f"{rel}/{name}" if path.is_dir() else rel): digest for name, digest in files.items()}
    return out


def _recover_dvc_own_files(project: Path) -> list[str]:
    """docs/reliability.md's recovery for what no product code can guard: DVC rewrites dvc.lock and its lock table
    .dvc/tmp/rwlock in place, so a group kill at "recorded" that lands inside one of those writes (milliseconds; more
    often on a loaded machine) leaves it cut short, and every dvc command refuses with DVC's own message. No dvc runs
    now: the documented steps apply (rwlock deleted, dvc.lock back from git). Returns what was recovered."""
    recovered = []
    rwlock = project / ".dvc" / "tmp" / "rwlock"
    try:
        json.loads(rwlock.read_text() or "x")
    except FileNotFoundError:
        pass
    except ValueError:
        rwlock.unlink()
        recovered.append(str(rwlock.relative_to(project)))
    try:
        whole = isinstance(yaml.safe_load((project / "dvc.lock").read_text()), dict)
    except yaml.YAMLError:
        whole = False
    if not whole:
        subprocess.run(["git", "checkout", "dvc.lock"], cwd=project, check=True, capture_output=True)
        recovered.append("dvc.lock")
    return recovered


def _leftovers(project: Path) -> list[str]:
    return sorted(
        p.relative_to(project).as_posix()
        for p in project.rglob(".*")
        if LEFTOVER.fullmatch(p.name) and ".git" not in p.relative_to(project).parts
    )


def _whole(path: Path) -> None:
    """Every JSON file under path parses, every .jsonl line: a file cut short by the kill would not."""
    for f in [path] if path.is_file() else sorted(path.rglob("*")):
        if f.suffix == ".json":
            json.loads(f.read_text(encoding="utf-8"))
        elif f.suffix == ".jsonl":
            for line in f.read_text(encoding="utf-8").splitlines():
                json.loads(line)


def _stage_process(dvc_proc: psutil.Process, stage: str) -> psutil.Process | None:
    """The `python -m tasks.<stage>` dvc runs (under a shell or not)."""
    try:
        for child in dvc_proc.children(recursive=True):
            cmd = child.cmdline()
            if len(cmd) >= 3 and "python" in Path(cmd[0]).name and cmd[1:3] == ["-m", f"tasks.{stage}"]:
                return child
    except psutil.Error:
        pass
    return None


def _ended(process: psutil.Process) -> bool:
    try:
        return process.status() == psutil.STATUS_ZOMBIE  # dvc has not reaped it yet
    except psutil.NoSuchProcess:
        return True


class StageRun:
    """`dvc repro -s <stage> --force` in its own process group, watched for a kill point."""

    def __init__(self, project: Path, stage: str, log: Path):
        self.project, self.stage = project, stage
        env = venv_env()
        with open(log, "w") as out:
            self.dvc = subprocess.Popen(
                ["dvc", "repro", "-s", stage, "--force"], cwd=project, env=env, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        self.started_at = time.monotonic()
        self.process: psutil.Process | None = None  # the stage's, once seen
        self.locked_at: float | None = None
        self.ended_at: float | None = None

    def _locked(self) -> bool:
        try:
            return json.loads((self.project / HOLDER_FILE).read_text())["pid"] == self.process.pid
        except (OSError, ValueError, KeyError):
            return False

    def _appeared(self, pattern: str) -> bool:
        return any(self.project.glob(pattern))

    def _logged_past(self, step: int) -> bool:
        try:
            rows = (self.project / CHECKPOINT_LOSS).read_text().splitlines()[1:]
        except OSError:
            return False
        return any(int(r.split("\t")[0]) > step for r in rows if r.split("\t")[0].isdigit())

    def reached(self, point: str, half: float | None) -> bool:
        if self.process is None:
            self.process = _stage_process(psutil.Process(self.dvc.pid), self.stage)
            if self.process is None:
                return False
        if self.locked_at is None and self._locked():
            self.locked_at = time.monotonic()
        if self.ended_at is None and _ended(self.process):
            self.ended_at = time.monotonic()
        return {
            "started": lambda: True,
            "locked": lambda: self.locked_at is not None,
            "recorded": lambda: self.ended_at is not None,
            "candidates": lambda: self._appeared(f"{paths.VALIDATED_DIR}/.{paths.CONVERSATIONS.name}.candidates"),
            "report staged": lambda: self._appeared(f"reports/.{paths.VALIDATION_REPORT_DIR.name}.*.tmp"),
            "past checkpoint-10": lambda: self._logged_past(10),
            "adapter staged": lambda: self._appeared(f"artifacts/.{paths.ADAPTER_DIR.name}.*.tmp"),
            "release staged": lambda: self._appeared(f".{paths.RELEASE_DIR.name}.*.tmp"),
            "half its time": lambda: self.locked_at is not None and time.monotonic() - self.locked_at >= half,
        }[point]()

    def kill_at(self, point: str, whom: str, half: float | None = None) -> None:
        deadline = time.monotonic() + 300
        while not self.reached(point, half):
            assert self.dvc.poll() is None, f"{self.stage} ended before {point!r}: see its log"
            assert time.monotonic() < deadline, f"{self.stage}: {point!r} not reached in 300 s"
            time.sleep(0.005)  # a staged folder may stand for a fraction of a second
        if whom == "group":  # dvc and the stage, as the OOM killer or a lost machine would end them
            os.killpg(self.dvc.pid, signal.SIGKILL)
        else:  # the stage alone: dvc sees its command die
            self.process.send_signal(signal.SIGKILL)
        self.dvc.wait(timeout=120)


def _check_after_kill(project: Path, stage: str, point: str, before: dict) -> dict:
    """No output half-written: each as the kill found it, or one of the killed stage's replaced whole (JSON that
    parses; the same bytes as before where a rerun gives the same bytes); what is left over is only temporary names,
    beside or inside what the next stage sweeps (paths.WRITTEN). Returns the outputs now."""
    now = _outputs(project)
    for rel, files in now.items():
        if files == before[rel]:
            continue
        where = f"{stage} killed at {point!r}: {rel}"
        assert rel in OUTPUTS[stage], f"{where} changed, and it is not {stage}'s"
        assert files is not None, f"{where} is gone"
        _whole(project / rel)
        changed = {f for f in files.keys() | (before[rel] or {}).keys() if files.get(f) != (before[rel] or {}).get(f)}
        assert all(f.startswith(VARYING) for f in changed), f"{where}: {sorted(changed)} differ"
    written = [Path(p) for p in (*paths.WRITTEN, HOLDER_FILE)]
    for rel in _leftovers(project):
        swept = any(Path(rel).parent in (w.parent, w) for w in written)
        assert swept, f"{stage} killed at {point!r} left {rel}, which no stage removes"
    return now


def test_sigkill_at_chosen_points_of_every_stage_leaves_no_half_written_output(reproduced_project, tmp_path):
    good = _outputs(reproduced_project)
    good_adapter = sha256_file(reproduced_project / paths.ADAPTER_DIR / paths.ADAPTER_WEIGHTS)
    good_loss = (reproduced_project / paths.LOSS_TSV).read_bytes()
    before = good
    times = {}
    start = time.monotonic()
    for stage, points in KILLS.items():
        for n, (point, whom) in enumerate(points):
            run = StageRun(reproduced_project, stage, tmp_path / f"{stage}-{n}.log")
            run.kill_at(point, whom, half=times.get(stage))
            if point == "recorded":  # the stage's own time, from its lock to its end, for a point halfway
                times[stage] = (run.ended_at - run.locked_at) / 2
            if recovered := _recover_dvc_own_files(reproduced_project):
                print(f"{stage} killed at {point!r} inside DVC's own write: {recovered} recovered as documented")
            now = _check_after_kill(reproduced_project, stage, point, before)
            changed = [rel for rel in now if now[rel] != before[rel]]
            print(f"{stage} killed ({whom}) at {point!r}, {time.monotonic() - run.started_at:.1f} s in: replaced "
                  f"whole {changed}, left {_leftovers(reproduced_project)}")  # fmt: skip
            before = now

        if stage == "train":  # the killed run resumes from its last complete checkpoint to the very same adapter
            dvc(reproduced_project, "repro", "-s", "train", "--force")
            assert json.loads((reproduced_project / paths.TRAINING).read_text())["resumed"] is True
            assert sha256_file(reproduced_project / paths.ADAPTER_DIR / paths.ADAPTER_WEIGHTS) == good_adapter
            assert (reproduced_project / paths.LOSS_TSV).read_bytes() == good_loss  # each step once, as uninterrupted
            before = _outputs(reproduced_project)

    print(f"kills: {time.monotonic() - start:.0f} s")
    out = dvc(reproduced_project, "repro", with_stderr=True)
    print("the next dvc repro ran", re.findall(r"Running stage '(\w+)'", out))
    assert _leftovers(reproduced_project) == []
    assert not (reproduced_project / paths.CHECKPOINT_DIR).exists()
    final = _outputs(reproduced_project)
    for rel, files in final.items():
        changed = {f for f in files.keys() | good[rel].keys() if files.get(f) != good[rel].get(f)}
        assert all(f.startswith(VARYING) for f in changed), f"{rel}: {sorted(changed)} differ from the first run"
    audit = subprocess.run(
        [sys.executable, "-m", "tasks.publish.audit", "release"], cwd=reproduced_project, capture_output=True, text=True
    )
    assert audit.returncode == 0, audit.stdout[-3000:]
