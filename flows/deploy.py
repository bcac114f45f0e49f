"""Run the pipeline as a scheduled Prefect deployment: served from this process, or handed to a work pool.

    prefect server start                                   # a local API + UI (SQLite) on :4200
    PREFECT_API_URL=http://127.0.0.1:4200/api python -m flows.deploy --cron "0 3 * * *"

The serving process registers the deployment `guanaco-qlora-pipeline/guanaco-scheduled` with its cron
schedule and parameters, then runs each scheduled (or manually triggered) run in the project directory.
Stop it with Ctrl-C (the schedule is paused until it is served again).

For a team, register the deployment on a work pool instead and let workers run it (the server started with
PREFECT_SERVER_API_AUTH_STRING, every client given the same credential as PREFECT_API_AUTH_STRING):

    PREFECT_API_URL=... python -m flows.deploy --pool guanaco --cron "0 3 * * *"   # makes the pool, registers, exits
    PREFECT_API_URL=... prefect worker start --pool guanaco                      # on the machine with the project

The pool is made (or its template reset) with LOCKED_JOB_TEMPLATE: a flow run's job variables can change nothing
the worker does (no command, no environment, no working directory), so a client cannot make the worker run
anything but this flow.

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


# A process work pool's base job template with no job variables at all: the worker runs the flow with its own
# default command, in its own environment. Prefect's default template lets every run replace the command
# (`--job-variable command=...` ran any shell command as the worker's user), its environment (LD_PRELOAD, PATH) and
# its working directory. additionalProperties false makes the server refuse a run that asks for any.
LOCKED_JOB_TEMPLATE = {
    "job_configuration": {"stream_output": True},
    "variables": {"type": "object", "properties": {}, "additionalProperties": False},
}


def ensure_locked_pool(pool: str) -> str:
    """Make process work pool `pool` with LOCKED_JOB_TEMPLATE, or reset an existing one's template to it."""
    import anyio
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.exceptions import ObjectNotFound

    async def ensure() -> str:
        async with get_client() as client:
            try:
                existing = await client.read_work_pool(pool)
            except ObjectNotFound:
                await client.create_work_pool(
                    WorkPoolCreate(name=pool, type="process", base_job_template=LOCKED_JOB_TEMPLATE)
                )
                return "made"
            if existing.type != "process":
                raise SystemExit(
                    f"work pool {pool!r} is of type {existing.type!r}; this deployment needs a process pool"
                )
            if existing.base_job_template != LOCKED_JOB_TEMPLATE:
                await client.update_work_pool(pool, WorkPoolUpdate(base_job_template=LOCKED_JOB_TEMPLATE))
                return "locked"
            return "already locked"

    return anyio.run(ensure)


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
        pool_state = ensure_locked_pool(args.pool)
        deployment_id = deploy_to_pool(args.project_dir, args.pool, args.cron, args.preset, args.overrides)
        print(
            f"work pool {args.pool!r} ({pool_state}: runs cannot change the worker's command or environment); "
            f"deployment guanaco-qlora-pipeline/{DEPLOYMENT} ({deployment_id}) registered on it; start a worker: "
            f"prefect worker start --pool {args.pool}"
        )
        return
    from prefect import serve

    serve(build_deployment(args.project_dir, args.cron, args.preset, args.overrides))


if __name__ == "__main__":
    main()
