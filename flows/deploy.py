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

On a pool, a run whose machine dies (the worker and the run's processes killed, a power cut) would stay Running for
ever, and keep that one slot until its lease runs out (up to 5 minutes): nothing on a self-hosted server notices a
dead run by itself. So the pool's template has every flow run send a heartbeat every HEARTBEAT_S seconds, and
`--pool` registers an automation that marks a run of this deployment Crashed once no event of it came for
`--crash-after` seconds (CRASH_AFTER_S, three missed heartbeats, by default); Crashed frees the slot, and the next
run resumes training from the last complete checkpoint.

A run holds that slot through a lease its engine renews with the server every 225 s; a server that keeps its leases
in memory (Prefect's default) forgets them when it restarts, the renewal is refused (410), and Prefect then stops
the run ("Terminating execution to prevent over-allocation"). The team's server keeps them on its disk
(PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE=DURABLE_LEASES, docs/team.md); `--pool` warns when the server does not.
"""

from __future__ import annotations

import argparse
from datetime import timedelta
from pathlib import Path

from flows.pipeline import pipeline

DEPLOYMENT = "guanaco-scheduled"
CONCURRENCY_LIMIT = 1  # one run at a time per workspace; later ones queue
ENTRYPOINT = "flows/pipeline.py:pipeline"
DESCRIPTION = "Re-checks the source and re-runs only the stages whose inputs, params or code changed."
TAGS = ["guanaco", "qlora"]
HEARTBEAT_S = 30  # a flow run's heartbeat on a pool (Prefect's shortest; its default, 180 s, finds a dead run late)
CRASH_AFTER_S = 90  # no heartbeat (nor any other event) of a run for this long: it is marked Crashed
DURABLE_LEASES = "prefect.server.concurrency.lease_storage.filesystem"  # the server's leases, kept across its restarts


# A process work pool's base job template with no job variables at all: the worker runs the flow with its own
# default command, in its own environment. Prefect's default template lets every run replace the command
# (`--job-variable command=...` ran any shell command as the worker's user), its environment (LD_PRELOAD, PATH) and
# its working directory. additionalProperties false makes the server refuse a run that asks for any.
# The one environment variable the template sets (fixed, not a variable): the flow run's heartbeat, which the crash
# automation (ensure_crash_detection) listens for.
LOCKED_JOB_TEMPLATE = {
    "job_configuration": {"stream_output": True, "env": {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(HEARTBEAT_S)}},
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


def crash_automation_name() -> str:
    return f"{pipeline.name}/{DEPLOYMENT}: crashed when its heartbeat stops"


def ensure_crash_detection(deployment_id, crash_after_s: float = CRASH_AFTER_S) -> str:
    """Register (or reset) the automation that marks a run of this deployment Crashed once nothing was heard of it for
    `crash_after_s` seconds: no heartbeat and no state change. Without it a run whose worker died stays Running for
    ever, and keeps the deployment's only concurrency slot until its lease runs out (300 s after its last renewal),
    later runs waiting (AwaitingConcurrencySlot).

    Any event of the run counts as a sign of life (`prefect.flow-run.*`: its heartbeats, and the state change that
    ends it, "Skipped" included), so a run that ended is never touched."""
    import anyio
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture

    if crash_after_s <= HEARTBEAT_S:
        raise SystemExit(f"--crash-after must be longer than the heartbeat ({HEARTBEAT_S} s): runs would crash alive")
    name = crash_automation_name()
    automation = AutomationCore(
        name=name,
        enabled=True,  # an update sends what is set: a disabled one is turned back on
        description=f"A run of {pipeline.name}/{DEPLOYMENT} that sent no heartbeat for {crash_after_s:.0f} s is dead "
        "(its worker or machine went away): Crashed, which frees the deployment's concurrency slot.",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.*"},
            match={"prefect.resource.id": "prefect.flow-run.*"},
            match_related={"prefect.resource.id": f"prefect.deployment.{deployment_id}"},
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=crash_after_s),
        ),
        actions=[
            ChangeFlowRunState(
                state=StateType.CRASHED,
                message=f"no heartbeat for {crash_after_s:.0f} s: the worker or the machine running this flow run "
                "went away. The next run goes on from what it left (training from its last complete checkpoint).",
            )
        ],
    )

    async def ensure() -> str:
        async with get_client() as client:
            existing = await client.read_automations_by_name(name)
            for old in existing[1:]:  # one is enough: two would each crash the run
                await client.delete_automation(old.id)
            if existing:
                await client.update_automation(existing[0].id, automation)
                return "reset"
            await client.create_automation(automation)
            return "made"

    return anyio.run(ensure)


def lease_storage_warning() -> str | None:
    """A warning when the server keeps concurrency leases in memory (its settings, as /admin/settings tells them)."""
    import anyio
    from prefect.client.orchestration import get_client

    async def read() -> str | None:
        async with get_client() as client:
            settings = (await client.request("GET", "/admin/settings")).json()
        return settings.get("server", {}).get("concurrency", {}).get("lease_storage")

    storage = anyio.run(read)
    if storage is None or storage == DURABLE_LEASES:
        return None
    return (
        f"WARNING: the server keeps the runs' concurrency leases in {storage}: when it restarts it forgets them, and "
        "Prefect stops a run that was going then at its next lease renewal (within 225 s). Start the server with "
        f"PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE={DURABLE_LEASES} (docs/team.md)."
    )


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
    ap.add_argument(
        "--crash-after",
        type=float,
        default=CRASH_AFTER_S,
        help=f"with --pool: mark a run Crashed after this many seconds without a heartbeat (default {CRASH_AFTER_S})",
    )
    args = ap.parse_args()
    if args.pool:
        pool_state = ensure_locked_pool(args.pool)
        deployment_id = deploy_to_pool(args.project_dir, args.pool, args.cron, args.preset, args.overrides)
        crash_state = ensure_crash_detection(deployment_id, args.crash_after)
        print(
            f"work pool {args.pool!r} ({pool_state}: runs cannot change the worker's command or environment); "
            f"deployment guanaco-qlora-pipeline/{DEPLOYMENT} ({deployment_id}) registered on it; a run silent for "
            f"{args.crash_after:.0f} s is marked Crashed (automation {crash_state}); start a worker: "
            f"prefect worker start --pool {args.pool}"
        )
        if warning := lease_storage_warning():
            print(warning)
        return
    from prefect import serve

    serve(build_deployment(args.project_dir, args.cron, args.preset, args.overrides))


if __name__ == "__main__":
    main()
