"""Run the pipeline as a scheduled Prefect deployment: served from this process, or handed to a work pool.

    prefect server start                                   # a local API + UI (SQLite) on :4200
    PREFECT_API_URL=http://127.0.0.1:4200/api python -m flows.deploy --cron "0 3 * * *"

The serving process registers the deployment `guanaco-qlora-pipeline/guanaco-scheduled` with its cron
schedule and parameters, then runs each scheduled (or manually triggered) run in the project directory.
Stop it with Ctrl-C (the schedule is paused until it is served again).

For a team, register the deployment on a work pool instead and let workers run it:

    prefect work-pool create guanaco --type process
    PREFECT_API_URL=... python -m flows.deploy --pool guanaco --cron "0 3 * * *"   # registers and exits
    PREFECT_API_URL=... prefect worker start --pool guanaco                      # on the machine with the project

Either way the deployment declares a concurrency limit of 1: a run that comes while the last one is still
going waits (AwaitingConcurrencySlot) and starts when it ends, instead of colliding with it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from flows.pipeline import pipeline

DEPLOYMENT = "guanaco-scheduled"
CONCURRENCY_LIMIT = 1  # one run at a time per workspace; later ones queue
ENTRYPOINT = "flows/pipeline.py:pipeline"
DESCRIPTION = "Re-checks the source and re-runs only the stages whose inputs, params or code changed."
TAGS = ["guanaco", "qlora"]


def _parameters(project_dir: Path, preset: str | None, overrides: list[str]) -> dict:
    return {"project_dir": str(project_dir.resolve()), "preset": preset, "overrides": overrides}


def build_deployment(project_dir: Path, cron: str, preset: str | None, overrides: list[str]):
    """The served deployment (`prefect.serve` runs it in this process)."""
    return pipeline.to_deployment(
        name=DEPLOYMENT,
        cron=cron,
        parameters=_parameters(project_dir, preset, overrides),
        description=DESCRIPTION,
        tags=TAGS,
        concurrency_limit=CONCURRENCY_LIMIT,
    )


def deploy_to_pool(project_dir: Path, pool: str, cron: str, preset: str | None, overrides: list[str]):
    """Register the deployment on work pool `pool`; its workers load the flow from `project_dir` and run it there."""
    project_dir = project_dir.resolve()
    flow = pipeline.from_source(source=str(project_dir), entrypoint=ENTRYPOINT)
    return flow.deploy(
        name=DEPLOYMENT,
        work_pool_name=pool,
        cron=cron,
        parameters=_parameters(project_dir, preset, overrides),
        description=DESCRIPTION,
        tags=TAGS,
        concurrency_limit=CONCURRENCY_LIMIT,
        build=False,
        push=False,
        print_next_steps=False,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cron", default="0 3 * * *", help="when to run (cron, UTC by default); default 03:00 daily")
    ap.add_argument("--project-dir", type=Path, default=Path("."))
    ap.add_argument("--preset", default=None, help="recompose params.yaml with this preset before each run")
    ap.add_argument("-S", dest="overrides", action="append", default=[], help="param override, as dvc exp run -S")
    ap.add_argument(
        "--pool",
        default=None,
        help="register on this work pool (runs go to its workers) and exit, instead of serving runs from this process",
    )
    args = ap.parse_args()
    if args.pool:
        deployment_id = deploy_to_pool(args.project_dir, args.pool, args.cron, args.preset, args.overrides)
        print(
            f"deployment guanaco-qlora-pipeline/{DEPLOYMENT} ({deployment_id}) registered on work pool "
            f"{args.pool!r}; start a worker: prefect worker start --pool {args.pool}"
        )
        return
    from prefect import serve

    serve(build_deployment(args.project_dir, args.cron, args.preset, args.overrides))


if __name__ == "__main__":
    main()
