"""Prepare the real recipe's data on the CPU for the GPU benchmarks (run here, where DVC and great-expectations are).

Composes preset llama2_7b_guanaco against local files (exactly as `dvc exp run -S` would), then runs
download -> validate -> format through the stage functions with the real Llama-2 tokenizer, into
.bench/recipe/ (params.yaml + data/ + reports/). The GPU side then needs only train and evaluate.

    python -m benchmarks.prepare_bench --data ../shared/data/guanaco-llama2-1k/train.parquet \
        --tokenizer ../shared/data/llama-2-tokenizer
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

from benchmarks.common import BENCH, ROOT


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--tokenizer", type=Path, required=True)
    ap.add_argument("--bench", type=Path, default=BENCH)
    ap.add_argument("-S", dest="overrides", action="append", default=[])
    args = ap.parse_args()

    from tasks.common.compose import compose_params
    from tasks.common.config import load_params
    from tasks.download.stage import download
    from tasks.format.stage import format_rows
    from tasks.validate.stage import validate

    # Carried to the GPU machine inside the repo: keep the tokenizer beside the prepared data.
    bench = args.bench.resolve()
    (bench / "tokenizer").mkdir(parents=True, exist_ok=True)
    shutil.copy2(args.tokenizer / "tokenizer.model", bench / "tokenizer" / "tokenizer.model")
    shutil.copytree(ROOT / "conf", bench / "conf", dirs_exist_ok=True)
    compose_params(
        bench,
        [
            "preset=llama2_7b_guanaco",
            "download.source=local",
            f"download.path={args.data.resolve()}",
            f"model.tokenizer={(bench / 'tokenizer').relative_to(ROOT)}",
            *args.overrides,
        ],
    )
    os.chdir(bench)
    params = load_params("params.yaml")
    params = params.model_copy(
        update={"model": params.model.model_copy(update={"tokenizer": str(bench / "tokenizer")})}
    )
    for name, fn in (
        ("download", lambda: download(params.download)),
        ("validate", lambda: validate(params)),
        ("format", lambda: format_rows(params.format, params.model)),
    ):
        start = time.perf_counter()
        fn()
        print(f"{name}: {time.perf_counter() - start:.2f} s")


if __name__ == "__main__":
    main()
