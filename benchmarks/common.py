"""Shared by the GPU benchmarks: compose the real recipe's params against local files, prepare the data."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from flows.params import compose_params
from tasks.config import Params, load_params

ROOT = Path(__file__).resolve().parents[1]
H100_BF16_DENSE_FLOPS = 989e12  # H100/H200 SXM dense bf16 peak


def recipe_params(work: Path, model_dir: Path, data: Path, overrides: list[str] = ()) -> Params:
    """params.yaml of preset llama2_7b_guanaco pointed at local files, composed into `work` (as dvc exp run -S would)."""
    work.mkdir(parents=True, exist_ok=True)
    shutil.copytree(ROOT / "conf", work / "conf", dirs_exist_ok=True)
    compose_params(work, ["preset=llama2_7b_guanaco", "download.source=local", f"download.path={data.resolve()}",
                          f"model.base={model_dir.resolve()}", *overrides])
    return load_params(work / "params.yaml")


def prepare_data(work: Path, params: Params) -> dict:
    """download -> validate -> format in `work`, through the stage functions; returns stage wall times."""
    from tasks.download import download
    from tasks.format import format_rows
    from tasks.validate import validate

    cwd, times = os.getcwd(), {}
    os.chdir(work)
    try:
        for name, fn in (("download", lambda: download(params.download)), ("validate", lambda: validate(params)),
                         ("format", lambda: format_rows(params.format, params.model))):
            start = time.perf_counter()
            fn()
            times[name] = round(time.perf_counter() - start, 2)
    finally:
        os.chdir(cwd)
    return times


def save(out: Path, data: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2))
    print(f"saved {out}")
