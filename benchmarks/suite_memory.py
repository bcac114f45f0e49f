"""validate's suite phase alone at scale: the feature table of N rows and great-expectations over it, each size in a
process of its own, with that process's peak RSS (VmHWM) and seconds. It reaches sizes benchmarks/data_stages.py
cannot on this machine (ten million rows would take hours to scan).

The table is built by Scan.frame from per-row arrays shaped like the diverse benchmark rows' scan: guanaco text that
parses into alternating turns ending with an answer, no flag set; token counts drawn lognormal with the diverse rows'
median (315) and share over 1,024 tokens (8.9%), so that as many rows break within_max_length and are listed in the
result; one row in 50,000 that does not parse and one with an empty turn, one in 2,000 a duplicate. The suite runs
with the recipe's params (preset llama2_7b_guanaco, max_length 1024) in batches of --batch-rows rows (0: one run over
all rows, as before the suite was batched), and result.json is written as the stage writes it.

--failing-share s puts exactly that share of the renderable rows (rounded down) over max_length instead of the
lognormal's 8.9%: the rows over it drawn at random, their counts from the same lognormal above 1,024 tokens, the rest
at or under it. A passing run may have up to 30% of rows over max_length (validate.min_share_within_max_length 0.7),
so `--failing-share 0.3` is the most failing rows a passing run lists.

    python -m benchmarks.suite_memory --rows 1000000,10000000 --batch-rows 500000,0
    python -m benchmarks.suite_memory --rows 1000000,2000000 --failing-share 0.3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import ROOT, save
from benchmarks.data_stages import make_project, rss_gb, run_process

MEDIAN_TOKENS, SIGMA = 315, 0.875  # lognormal: P(n > 1024) = 8.9%, as in the diverse rows
BAD_EVERY, DUPLICATE_EVERY = 50_000, 2_000


def synthetic_scan(rows: int, seed: int = 0, failing_share: float | None = None):
    """A Scan as scan_rows leaves it for `rows` rows of the shape described above (one block); failing_share: the
    share of renderable rows over max_length (None: the lognormal's own, 8.9%)."""
    from tasks.validate.scan import CODE, CODED, COUNT, Scan

    rng = np.random.default_rng(seed)
    scan = Scan(rows=rows)
    unparsed = np.zeros(rows, dtype=bool)
    unparsed[rng.choice(rows, rows // BAD_EVERY, replace=False)] = True
    scan.parse_errors = {
        int(i): "`text` has neither '### Human:'/'### Assistant:' markers" for i in np.flatnonzero(unparsed)
    }
    for name in CODED:  # code 0: the value every parsed row has; code 1: None, for the rows that do not parse
        scan.values[name] = {{"form": "guanaco", "roles_alternate": True, "last_role": "assistant"}.get(name, False): 0}
        if name != "form":
            scan.values[name][None] = 1
        scan.codes[name] = [np.where(unparsed & (name != "form"), 1, 0).astype(CODE)]
    counts = {"n_turns": (2, 9), "min_turn_chars": (1, 500), "total_chars": (100, 8000)}
    for name, (low, high) in counts.items():
        scan.counts[name] = [np.where(unparsed, 0, rng.integers(low, high, rows)).astype(COUNT)]
    scan.counts["min_turn_chars"][0][rng.choice(rows, rows // BAD_EVERY, replace=False)] = 0
    scan.duplicates = [(rng.random(rows) < 1 / DUPLICATE_EVERY) & ~unparsed]
    renderable = np.flatnonzero(~unparsed)
    n_tokens = np.minimum(rng.lognormal(np.log(MEDIAN_TOKENS), SIGMA, len(renderable)), 30_000).astype(COUNT)
    if failing_share is not None:
        over = np.zeros(len(renderable), dtype=bool)
        over[rng.choice(len(renderable), int(failing_share * len(renderable)), replace=False)] = True
        # over max_length: the draw folded above 1,024; within it: folded below (both keep the lognormal's spread)
        n_tokens = np.where(over, 1025 + n_tokens % 4000, np.minimum(n_tokens, 1 + n_tokens % 1024)).astype(COUNT)
    cut = np.maximum(n_tokens - 1024, 0) // 2
    scan.renderable_blocks = [renderable.astype(COUNT)]
    scan.measured = [np.stack([n_tokens, n_tokens // 2, cut], axis=1).astype(COUNT)]
    return scan


def child(rows: int, batch_rows: int, failing_share: float | None, project: Path, out: Path) -> None:
    """In a process of its own: build the table, run the suite, write result.json; save RSS and seconds to `out`."""
    from tasks.common.artifacts import write_json
    from tasks.common.config import load_params
    from tasks.validate import expectations

    params = load_params(project / "params.yaml")
    figures = {"rss_start_gb": round(rss_gb(field="VmRSS"), 3)}
    scan = synthetic_scan(rows, failing_share=failing_share)
    table = [scan.frame()]  # handed to the suite and not kept, as validate does
    figures["rss_table_gb"] = round(rss_gb(field="VmRSS"), 3)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="suite-memory-") as tmp:
        result = expectations.run_suite(
            table.pop(), params.validate_, params.model, Path(tmp) / "data_docs", batch_rows or max(rows, 1)
        )
        write_json(Path(tmp) / "result.json", {"rules": result["rules"], "ge_result": result["ge_result"]})
    figures |= {
        "suite_seconds": round(time.perf_counter() - start, 1),
        "success": result["success"],
        "rows_over_max_length": next(
            r["unexpected_count"] for r in result["rules"] if r["rule"] == "within_max_length"
        ),
    }
    save(out, figures)


def measure(rows: int, batch_rows: int, failing_share: float | None, project: Path, work: Path) -> dict:
    out = work / f"suite-{rows}-{batch_rows}.json"
    args = [str(rows), str(batch_rows), json.dumps(failing_share), str(project), str(out)]
    process = run_process([sys.executable, "-m", "benchmarks.suite_memory", "--child", *args], work, "the suite")
    figures = json.loads(out.read_text())
    shape = {} if failing_share is None else {"failing_share": failing_share}  # absent: the lognormal's 8.9%
    return {"rows": rows, "batch_rows": batch_rows or "all", **shape, **process, **figures}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1000000", help="comma-separated sizes")
    ap.add_argument("--batch-rows", default="200000", help="comma-separated batch sizes; 0 for one run over all rows")
    ap.add_argument("--tokenizer", type=Path, default=ROOT.parent / "shared/data/llama-2-tokenizer")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/suite_memory_cpu.json")
    ap.add_argument(
        "--failing-share", type=float, default=None, help="share of renderable rows over max_length (default 8.9%%)"
    )
    ap.add_argument("--child", nargs=5, help=argparse.SUPPRESS)  # measure's own process
    args = ap.parse_args()
    if args.child:
        rows, batch_rows, failing_share, project, out = args.child
        child(int(rows), int(batch_rows), json.loads(failing_share), Path(project), Path(out))
        return
    with tempfile.TemporaryDirectory(prefix="suite-memory-") as work:
        project = make_project(Path(work), Path(work) / "rows.jsonl", args.tokenizer)
        runs = []
        for rows in (int(n) for n in args.rows.split(",")):
            for batch_rows in (int(n) for n in args.batch_rows.split(",")):
                runs.append(measure(rows, batch_rows, args.failing_share, project, Path(work)))
                print(json.dumps(runs[-1]), flush=True)
                save(args.out, {"runs": runs, "machine": {"cpus": os.cpu_count(), "platform": platform.platform()}})


if __name__ == "__main__":
    main()
