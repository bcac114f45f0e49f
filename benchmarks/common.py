"""Shared by the GPU benchmarks.

The GPU machine has no DVC, Hydra or great-expectations, so the data stages run here first
(benchmarks/prepare_bench.py writes .bench/recipe: params.yaml + data/formatted), and the GPU side
only loads those params, applies `key=value` overrides, and runs the train and evaluate stages.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import yaml

from tasks.common.config import Params, with_overrides

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / ".bench" / "recipe"


def bench_params(bench: Path, model_dir: Path | None, overrides: list[str] = ()) -> Params:
    data = yaml.safe_load((bench / "params.yaml").read_text())
    if model_dir is not None:
        data["model"]["base"] = str(model_dir.resolve())
    if data["model"].get("tokenizer") and not Path(data["model"]["tokenizer"]).is_absolute():
        data["model"]["tokenizer"] = str(ROOT / data["model"]["tokenizer"])
    changes = dict(item.split("=", 1) for item in overrides)  # `train.batch_size=8`, values read as YAML
    return with_overrides(Params.model_validate(data), **{k: yaml.safe_load(v) for k, v in changes.items()})


def workspace(bench: Path, work: Path, params: Params) -> Path:
    """A scratch project dir holding the prepared formatted data and the params the run uses."""
    (work / "data").mkdir(parents=True, exist_ok=True)
    if not (work / "data" / "formatted").exists():
        shutil.copytree(bench / "data" / "formatted", work / "data" / "formatted")
    (work / "params.yaml").write_text(yaml.safe_dump(params.as_dict(), sort_keys=False))
    return work


def model_mfu(model_dir: Path, tokens_per_second: float | None) -> dict:
    """The train stage's MFU (tasks/train/mfu.py) of a run on the model in `model_dir` on this GPU: one formula for
    ours and the references."""
    import torch
    from transformers import AutoConfig

    from tasks.train.memory import ModelShape
    from tasks.train.mfu import mfu

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return mfu(tokens_per_second, ModelShape.from_config(AutoConfig.from_pretrained(model_dir)), device)


def save(out: Path, data: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2))
    print(f"saved {out}")


def bench_arguments(doc: str) -> argparse.ArgumentParser:
    """The arguments every GPU benchmark takes: the random 7B, a scratch dir, the JSON out, the prepared rows, the
    model shape and param overrides."""
    from benchmarks.model_shapes import SHAPES

    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", type=Path, required=True)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--bench", type=Path, default=BENCH)
    ap.add_argument("--shape", default="llama2-7b", choices=SHAPES, help="the base's shape (smoke: a CPU check)")
    ap.add_argument("-S", dest="overrides", action="append", default=[], help="param override, key=value")
    return ap
