"""Data-stage speed: download -> validate -> format on 10,000 conversations, with the real Llama-2 tokenizer.

The rows are the 1k real guanaco rows (raw guanaco form) repeated and perturbed (a variant tag in the
first human turn, alternate rows with Windows newlines and stray spaces), so the suite sees no mass
duplication. Each stage runs through its public function exactly as `dvc repro` calls it, in a scratch
project, and the script prints seconds and rows/s per stage and saves them as JSON.

    python -m benchmarks.data_stages --raw ../shared/data/guanaco-raw-1k/train.jsonl \
        --tokenizer ../shared/data/llama-2-tokenizer [--rows 10000]

Target on the 2-core CI machine: the three stages together under 30 s for 10k rows.
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

from benchmarks.common import ROOT, save


def perturbed_rows(raw: Path, n: int) -> list[dict]:
    base = [json.loads(line) for line in raw.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = []
    for i in range(n):
        k, text = divmod(i, len(base))[0], base[i % len(base)]["text"]
        if k:
            text = text.replace("### Human: ", f"### Human: (variant {k}) ", 1)
            if k % 2:
                text = "  " + text.replace("\n", "\r\n") + " "  # Windows newlines and stray spaces
        rows.append({"text": text})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--raw", type=Path, default=ROOT.parent / "shared/data/guanaco-raw-1k/train.jsonl")
    ap.add_argument("--tokenizer", type=Path, default=ROOT.parent / "shared/data/llama-2-tokenizer")
    ap.add_argument("--rows", type=int, default=10_000)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/data_stages_cpu.json")
    args = ap.parse_args()
    for path in (args.raw, args.tokenizer):
        if not path.exists():
            sys.exit(f"{path} not found: pass --raw / --tokenizer (the reference data lives in ../shared/data)")

    from tasks.config import load_params
    from tasks.download import download
    from tasks.format import format_rows
    from tasks.validate import validate

    work = Path(tempfile.mkdtemp(prefix="data-bench-"))
    data_file = work / "input" / "guanaco_10k.jsonl"
    data_file.parent.mkdir(parents=True)
    data_file.write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in perturbed_rows(args.raw, args.rows)), encoding="utf-8"
    )
    # The recipe's params (max_length 1024, truncate), reading the local file and the real tokenizer.
    import shutil

    from flows.params import compose_params

    shutil.copytree(ROOT / "conf", work / "conf")
    compose_params(
        work,
        [
            "preset=llama2_7b_guanaco",
            "download.source=local",
            f"download.path={data_file}",
            f"model.tokenizer={args.tokenizer.resolve()}",
        ],
    )
    os.chdir(work)
    params = load_params("params.yaml")

    stages = {}
    for name, fn in (
        ("download", lambda: download(params.download)),
        ("validate", lambda: validate(params)),
        ("format", lambda: format_rows(params.format, params.model)),
    ):
        start = time.perf_counter()
        out = fn()
        seconds = time.perf_counter() - start
        stages[name] = {"seconds": round(seconds, 2), "rows_per_second": round(args.rows / seconds, 1)}
        print(f"{name:9s} {seconds:7.2f} s   {args.rows / seconds:9.0f} rows/s")
        if name == "validate":
            stages[name] |= {
                "rows_excluded": out["rows_excluded"],
                "tokens_p50": out["tokens_p50"],
                "tokens_max": out["tokens_max"],
            }
        if name == "format":
            stages[name] |= {"train_rows": out["train_rows"], "eval_rows": out["eval_rows"]}
    total = sum(s["seconds"] for s in stages.values())
    print(f"{'total':9s} {total:7.2f} s   {args.rows / total:9.0f} rows/s  (target: under 30 s for 10k rows)")
    save(
        args.out,
        {
            "rows": args.rows,
            "stages": stages,
            "total_seconds": round(total, 2),
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
            "workspace": str(work),
        },
    )


if __name__ == "__main__":
    main()
