"""Serve the pipeline as a scheduled Prefect deployment.

    prefect server start                                   # a local API + UI (SQLite) on :4200
    PREFECT_API_URL=http://127.0.0.1:4200/api python -m flows.deploy --cron "0 3 * * *"

The serving process registers the deployment `guanaco-qlora-pipeline/guanaco-scheduled` with its cron
schedule and parameters, then runs each scheduled (or manually triggered) run in the project directory.
Stop it with Ctrl-C (the schedule is paused until it is served again).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from flows.pipeline import pipeline

DEPLOYMENT = "guanaco-scheduled"


def build_deployment(project_dir: Path, cron: str, preset: str | None, overrides: list[str]):
    return pipeline.to_deployment(
        name=DEPLOYMENT,
        cron=cron,
        parameters={"project_dir": str(project_dir.resolve()), "preset": preset, "overrides": overrides},
        description="Re-checks the source and re-runs only the stages whose inputs, params or code changed.",
        tags=["guanaco", "qlora"],
    )


def main() -> None:
    from prefect import serve

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cron", default="0 3 * * *", help="when to run (cron, UTC by default); default 03:00 daily")
    ap.add_argument("--project-dir", type=Path, default=Path("."))
    ap.add_argument("--preset", default=None, help="recompose params.yaml with this preset before each run")
    ap.add_argument("-S", dest="overrides", action="append", default=[], help="param override, as dvc exp run -S")
    args = ap.parse_args()
    serve(build_deployment(args.project_dir, args.cron, args.preset, args.overrides))


if __name__ == "__main__":
    main()
