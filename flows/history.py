"""The run history: one JSON line per pipeline run (scheduled or not), and the command that lists it.

python -m flows.history            # a table of past runs, newest last
python -m flows.history --json     # the raw records
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

HISTORY = Path("runs/history.jsonl")


def append(project_dir: Path, record: dict) -> None:
    path = project_dir / HISTORY
    path.parent.mkdir(parents=True, exist_ok=True)
    # The whole line in one O_APPEND write: a run skipped beside a running one (flows/pipeline.py) may append at
    # the same moment, and appends cannot drop each other's record the way read-then-rename can; a killed
    # process leaves the whole line or none.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        os.write(fd, (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
    finally:
        os.close(fd)


def read(project_dir: Path) -> list[dict]:
    path = project_dir / HISTORY
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def main() -> None:
    ap = argparse.ArgumentParser(description="List the pipeline's past runs.")
    ap.add_argument("--project", type=Path, default=Path("."))
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    runs = read(args.project)
    if args.json:
        print(json.dumps(runs, indent=2))
        return
    if not runs:
        print(f"no runs recorded in {args.project / HISTORY}")
        return
    print(format_table(runs))


def format_table(runs: list[dict]) -> str:
    """One line a run. The outcome goes last and whole: "skipped: another run is in progress (...)" says which run
    held the workspace, and cutting it to a column lost that."""
    lines = [f"{'finished (UTC)':25s} {'flow run':22s} {'release':42s} {'stages run':44s} outcome"]
    for r in runs:
        stages = ",".join(r.get("stages_ran") or []) or "-"
        lines.append(
            f"{r.get('finished_at', '?'):25s} {r.get('flow_run', '?')[:22]:22s} {r.get('release_id') or '-':42s} "
            f"{stages:44s} {r.get('outcome', '?')}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
