"""The Prefect flow: the same six stages as `dvc repro`, run through DVC, one Prefect task a stage.

Why through DVC rather than calling tasks.* directly: DVC already knows, per stage, whether its
code, params and inputs changed, and writes dvc.lock. Asking it to run each stage (`dvc repro -s`)
means a scheduled run skips exactly what `dvc repro` would skip and leaves the same lineage, while
Prefect adds what DVC lacks: schedules, retries, logs, artifacts and a run history. The one thing DVC
cannot see is a Hub dataset that moved on; `check_source` compares the source's fingerprint with the
one the last download recorded and, when it changed, has DVC re-run the download. No stage logic
lives here.

One run at a time: the flow holds the workspace lock (tasks/common/run_lock.py) from before it composes params to its
end, because between its `dvc repro --single-item` calls DVC's own lock is free. A run that finds the workspace
taken changes nothing and ends "skipped" (see `_skipped`).
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import time
from pathlib import Path

from prefect import flow, get_run_logger, runtime, task
from prefect.artifacts import create_markdown_artifact
from prefect.states import Completed
from prefect.tasks import exponential_backoff

from flows import history
from tasks.common import paths, run_lock
from tasks.common.compose import compose_params
from tasks.common.config import load_params
from tasks.download.stage import recorded_fingerprint, source_fingerprint

# A Hub download can fail for passing reasons; nothing else is worth retrying (bad data stays bad).
RETRIES = {"download": 3}
NOISE = ("it/s]", "examples/s]", "s/it]")


class StageFailed(RuntimeError):
    pass


# DVC's per-file lock: a stage of another dvc command holds files this stage reads or writes. It fails at once.
BUSY = "is busy, it is being blocked by"
BUSY_WAIT_S = 300


def _dvc(args: list[str], project_dir: Path) -> subprocess.CompletedProcess:
    """`dvc` inside this run: the stages DVC runs belong to this run's workspace lock (tasks/common/run_lock.py).

    Another dvc command that got in between two of our stages cannot run a stage (ours refuses it at its start:
    we hold the workspace) but can hold DVC's locks for a few seconds, until it gets there and stops; so this
    waits for them rather than failing: --wait-for-lock for DVC's repo lock, a retry for its per-file locks."""
    deadline = time.monotonic() + BUSY_WAIT_S
    env = run_lock.child_env(project_dir)
    if runtime.flow_run.id:  # the stage's provenance names this flow run (a deployment sets it; a direct call not)
        env["PREFECT__FLOW_RUN_ID"] = str(runtime.flow_run.id)
    while True:
        proc = subprocess.run(
            ["dvc", "--wait-for-lock", *args], cwd=project_dir, capture_output=True, text=True, env=env
        )
        if proc.returncode == 0 or BUSY not in proc.stdout + proc.stderr or time.monotonic() > deadline:
            return proc
        get_run_logger().info("waiting: another dvc command holds this stage's files (%s)", proc.stderr.strip()[:300])
        time.sleep(2)


@task
def check_source(project_dir: str) -> bool:
    """True when the source's content differs from what the last download recorded."""
    logger = get_run_logger()
    root = Path(project_dir)
    params = load_params(root / "params.yaml").download
    if params.source == "local" and not Path(params.path).is_absolute():
        params = params.model_copy(update={"path": str(root / params.path)})
    now, before = source_fingerprint(params), recorded_fingerprint(root / paths.SOURCE_RECORD)
    changed = now is not None and before is not None and now != before
    logger.info(
        "source fingerprint now %s, at the last download %s: %s",
        now,
        before,
        "changed" if changed else "unchanged" if now else "cannot tell (keeping what we have)",
    )
    return changed


@task(task_run_name="{stage}")
def run_stage(stage: str, project_dir: str, force: bool = False) -> bool:
    """Run one DVC stage if anything it depends on changed (or `force`); returns whether it ran."""
    logger = get_run_logger()
    proc = _dvc(["repro", "--single-item", *(["--force"] if force else []), stage], Path(project_dir))
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip() and not any(n in ln for n in NOISE)]
    for line in lines:
        logger.info(line)
    if proc.returncode != 0:
        # The stage's own message (file, rows, report location) is in its stderr: carry it into the task's failure.
        detail = "\n".join(ln for ln in lines if not ln.startswith(("Running stage", "> python", "Updating lock")))
        raise StageFailed(f"stage {stage!r} failed:\n{detail[-4000:]}")
    return f"Running stage '{stage}'" in proc.stdout


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def summary_markdown(project_dir: Path, ran: dict[str, bool], outcome: str) -> str:
    val, ev = _read(project_dir / paths.VALIDATION_SUMMARY), _read(project_dir / paths.EVALUATION)
    lengths = _read(project_dir / paths.LENGTH_REPORT)
    lineage = _read(project_dir / paths.RELEASE_DIR / paths.LINEAGE)
    lines = ["# Guanaco QLoRA pipeline run", "", f"**Outcome**: {outcome}", "", "| stage | ran |", "|---|---|"]
    lines += [f"| {s} | {'yes' if r else 'up to date'} |" for s, r in ran.items()]
    if val:
        lines += [
            "",
            f"**Validation**: {'passed' if val['success'] else 'FAILED'} on {val['rows']} rows "
            f"({val.get('rows_excluded', 0)} left out); report `{paths.VALIDATION_RESULT}`.",
        ]
    if lengths:
        lines += [
            f"**Token lengths** ({lengths['tokenizer']}): p50 {lengths['percentiles']['p50']:.0f}, "
            f"p95 {lengths['percentiles']['p95']:.0f}, max {lengths['max']}; {lengths['policy_effect']}."
        ]
    if ev:
        lines += [
            "",
            f"**Evaluation** ({ev['eval_rows']} held-out rows): loss base {ev['base']['loss']:.4f} -> "
            f"tuned {ev['tuned']['loss']:.4f}; stop rate {ev['tuned']['stop_rate']:.0%}.",
        ]
    if lineage:
        lines += ["", f"**Release**: `{lineage['release']['id']}` in `{project_dir / paths.RELEASE_DIR}`."]
    return "\n".join(lines)


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def _record(root: Path, started: str, outcome: str, ran: dict[str, bool], **extra) -> None:
    lineage = _read(root / paths.RELEASE_DIR / paths.LINEAGE)
    history.append(
        root,
        {
            "flow_run": str(runtime.flow_run.name or "local"),
            "flow_run_id": str(runtime.flow_run.id or ""),
            "started_at": started,
            "finished_at": _now(),
            "outcome": outcome,
            "stages_ran": [s for s, r in ran.items() if r],
            "release_id": lineage["release"]["id"] if lineage else None,
            **extra,
        },
    )


SKIPPED = "skipped: another run is in progress"


def _skipped(root: Path, started: str, busy: run_lock.RunInProgress):
    """End a run that found the workspace taken: recorded, summarised, and Completed (named "Skipped").

    Skipped rather than failed: a schedule firing while the last run still trains is the schedule working as
    designed (that run will produce the result), and a failure would alert someone for nothing and make the
    failure count meaningless. The skip stays visible: the state's name, the history record (with who held the
    workspace) and the summary artifact. A workspace that stays taken shows as a row of skips in the history."""
    get_run_logger().warning("%s", busy)
    _record(root, started, SKIPPED, {}, detail=str(busy))
    create_markdown_artifact(
        f"# Guanaco QLoRA pipeline run\n\n**Outcome**: {SKIPPED}\n\n{busy}",
        key="guanaco-pipeline-summary",
        description="skipped: the workspace was taken",
    )
    return Completed(name="Skipped", message=str(busy), data={"ran": {}, "outcome": SKIPPED, "detail": str(busy)})


@flow(name="guanaco-qlora-pipeline")
def pipeline(preset: str | None = None, overrides: list[str] | None = None, project_dir: str = ".") -> dict:
    """Run the pipeline; `preset`/`overrides` recompose params.yaml exactly as `dvc exp run -S` would."""
    root = Path(project_dir).resolve()
    started = _now()
    try:
        lock = run_lock.hold_for_flow(root, str(runtime.flow_run.name or "local"))
    except run_lock.RunInProgress as busy:
        return _skipped(root, started, busy)
    with lock:
        return _run(root, preset, overrides, started, lock.stale)


def _run(root: Path, preset: str | None, overrides: list[str] | None, started: str, stale: str | None) -> dict:
    logger = get_run_logger()
    if stale:  # a killed run's leftovers: said here and kept in this run's record, since the killed one wrote none
        logger.warning("%s", stale)
    if preset or overrides:
        compose_params(root, ([f"preset={preset}"] if preset else []) + list(overrides or []))
        logger.info("params.yaml composed with preset=%s overrides=%s", preset, overrides)
    ran: dict[str, bool] = {}
    outcome = "up to date"
    try:
        source_moved = check_source(str(root))
        for stage in paths.STAGES:
            stage_task = run_stage.with_options(
                retries=RETRIES.get(stage, 0),
                retry_delay_seconds=exponential_backoff(backoff_factor=10) if stage in RETRIES else 0,
            )
            ran[stage] = stage_task(stage, str(root), force=source_moved and stage == "download")
        if any(ran.values()):
            outcome = "published" if ran["publish"] else "ran " + ", ".join(s for s, r in ran.items() if r)
    except Exception:
        outcome = f"failed at {next((s for s in paths.STAGES if s not in ran), 'the end')}"
        raise
    finally:
        _record(root, started, outcome, ran, **({"stale_lock": stale} if stale else {}))
        create_markdown_artifact(
            summary_markdown(root, ran, outcome),
            key="guanaco-pipeline-summary",
            description="validation verdict, lengths, eval metrics and release of this run",
        )
    logger.info("%s: stages run: %s", outcome, [s for s, r in ran.items() if r] or "none")
    return {"ran": ran, "outcome": outcome}


if __name__ == "__main__":
    pipeline()
