"""The Prefect flow: the same six stages as `dvc repro`, run through DVC, one Prefect task a stage.

Why through DVC rather than calling tasks.* directly: DVC already knows, per stage, whether its
code, params and inputs changed, and writes dvc.lock. Asking it to run each stage (`dvc repro -s`)
means a scheduled run skips exactly what `dvc repro` would skip and leaves the same lineage, while
Prefect adds what DVC lacks: schedules, retries, logs and a run history. No stage logic lives here.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.tasks import exponential_backoff

from flows.params import compose_params
from tasks import paths

STAGES = ("download", "validate", "format", "train", "evaluate", "publish")
# A Hub download can fail for passing reasons; nothing else is worth retrying (bad data stays bad).
RETRIES = {"download": 3}


class StageFailed(RuntimeError):
    pass


def _dvc(args: list[str], project_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["dvc", *args], cwd=project_dir, capture_output=True, text=True)


@task(task_run_name="{stage}")
def run_stage(stage: str, project_dir: str) -> bool:
    """Run one DVC stage if anything it depends on changed; returns whether it ran."""
    logger = get_run_logger()
    proc = _dvc(["repro", "--single-item", stage], Path(project_dir))
    for line in (proc.stdout + proc.stderr).splitlines():
        if line.strip() and "it/s]" not in line and "examples/s]" not in line:
            logger.info(line)
    if proc.returncode != 0:
        reason = "\n".join(line for line in proc.stderr.splitlines() if "ERROR" in line or line.startswith("  "))
        raise StageFailed(f"stage {stage!r} failed (dvc exit {proc.returncode}):\n{reason or proc.stderr[-2000:]}")
    return f"Running stage '{stage}'" in proc.stdout


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def summary_markdown(project_dir: Path, ran: dict[str, bool]) -> str:
    val, ev = _read(project_dir / paths.VALIDATION_METRICS), _read(project_dir / paths.EVAL_METRICS)
    lineage = _read(project_dir / paths.RELEASE_DIR / "lineage.json")
    lines = ["# Guanaco QLoRA pipeline run", "", "| stage | ran |", "|---|---|"]
    lines += [f"| {s} | {'yes' if r else 'up to date'} |" for s, r in ran.items()]
    if val:
        lines += ["", f"**Validation**: {'passed' if val['success'] else 'FAILED'} on {val['rows']} rows; "
                      f"tokens p50 {val['tokens_p50']}, p95 {val['tokens_p95']}, max {val['tokens_max']}; "
                      f"{val['share_over_max_length']:.1%} over max_length."]
    if ev:
        lines += ["", f"**Evaluation** ({ev['eval_rows']} held-out rows): loss base {ev['base']['loss']:.4f} -> "
                      f"tuned {ev['tuned']['loss']:.4f}; stop rate {ev['tuned']['stop_rate']:.0%}."]
    if lineage:
        lines += ["", f"**Release**: `{lineage['release']['id']}` in `{project_dir / paths.RELEASE_DIR}`."]
    return "\n".join(lines)


@flow(name="guanaco-qlora-pipeline")
def pipeline(preset: str | None = None, overrides: list[str] | None = None, project_dir: str = ".") -> dict:
    """Run the pipeline; `preset`/`overrides` recompose params.yaml exactly as `dvc exp run -S` would."""
    logger = get_run_logger()
    root = Path(project_dir).resolve()
    if preset or overrides:
        compose_params(root, ([f"preset={preset}"] if preset else []) + list(overrides or []))
        logger.info("params.yaml composed with preset=%s overrides=%s", preset, overrides)
    ran: dict[str, bool] = {}
    for stage in STAGES:
        stage_task = run_stage.with_options(
            retries=RETRIES.get(stage, 0),
            retry_delay_seconds=exponential_backoff(backoff_factor=10) if stage in RETRIES else 0,
        )
        ran[stage] = stage_task(stage, str(root))
    create_markdown_artifact(summary_markdown(root, ran), key="guanaco-pipeline-summary",
                             description="validation verdict, eval metrics and release of this run")
    logger.info("stages run: %s", [s for s, r in ran.items() if r] or "none (up to date)")
    return {"ran": ran}


if __name__ == "__main__":
    pipeline()
