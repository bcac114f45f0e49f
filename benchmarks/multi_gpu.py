"""The 7B-shaped recipe on one GPU, then on several with DDP and with FSDP-QLoRA, through the train stage itself.

Each configuration runs `python -m tasks.train` (which re-launches itself through accelerate for ddp/fsdp) in
its own scratch project with the prepared guanaco-llama2-1k rows (benchmarks/prepare_bench.py) and the
llama2_7b_guanaco preset, on the same number of rows (--rows; steps = rows / global batch). Every GPU gets
the single run's micro-batch
(train.batch_size is the global batch: 4 on one GPU, 4 x N on N), so the per-GPU work matches and

    scaling efficiency = (steady tokens/s of the N-GPU job / N) / steady tokens/s on one GPU.

ddp_recipe_batch instead keeps the recipe's global batch (the same optimizer steps as one GPU, half the rows
per GPU). Each adapter's tensor shapes are compared with the one-GPU run's.

Prints and saves tokens/s (job and per GPU), efficiency, peak memory of each GPU, loss and wall time.

    python -m benchmarks.multi_gpu --model-dir /tmp/llama7b --work /tmp/mg --out multi_gpu.json
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.build_random_base import build_shape
from benchmarks.common import ROOT, bench_arguments, bench_params, save, workspace

# name: (mode, processes, global batch in units of the recipe's batch). Most keep each GPU's micro-batch at the
# recipe's (global batch x N); ddp_recipe_batch keeps the recipe's global batch (each GPU gets 1/N of it).
CONFIGS = {"single": ("single", 1, 1), "ddp": ("ddp", 2, 2), "fsdp": ("fsdp", 2, 2), "ddp_recipe_batch": ("ddp", 2, 1)}


def adapter_summary(adapter: Path) -> dict:
    """Tensor count, total parameters and the largest |lora_B| (0 until trained): same shapes across layouts."""
    from safetensors import safe_open

    from tasks.common.paths import ADAPTER_WEIGHTS

    with safe_open(adapter / ADAPTER_WEIGHTS, framework="pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        max_b = max(f.get_tensor(k).abs().max().item() for k in f.keys() if "lora_B" in k)
    return {
        "tensors": len(shapes),
        "parameters": sum(a * b for a, b in shapes.values()),
        "shapes_sha256": hashlib.sha256(repr(sorted(shapes.items())).encode()).hexdigest()[:12],
        "max_abs_lora_B": round(max_b, 6),
    }


def run_config(name: str, args, recipe_batch: int) -> dict:
    from tasks.common import paths

    mode, n, batches = CONFIGS[name]
    params = bench_params(
        args.bench,
        args.model_dir,
        [
            f"train.distributed.mode={mode}",
            f"train.distributed.num_processes={n}",
            f"train.batch_size={recipe_batch * batches}",
            f"train.max_steps={args.rows // (recipe_batch * batches)}",
            "train.save_steps=100000",
            *args.overrides,
        ],
    )
    work = workspace(args.bench, (args.work / name).resolve(), params)
    log = args.out.parent / f"multi_gpu_{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    start = time.perf_counter()
    with log.open("w") as f:
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "tasks.train"],
                cwd=work,
                env=env,
                stdout=f,
                stderr=subprocess.STDOUT,
                timeout=args.timeout,
            )
            code = proc.returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    wall = round(time.perf_counter() - start, 1)
    if code != 0:
        print(f"{name}: failed ({code}) after {wall} s; see {log}")
        return {"mode": mode, "processes": n, "failed": code, "stage_wall_seconds": wall}
    m = json.loads((work / paths.TRAINING).read_text())
    try:
        adapter = adapter_summary(work / paths.ADAPTER_DIR)
    except Exception as e:  # noqa: BLE001 - recorded, so the other configurations still run
        adapter = {"error": repr(e)}
    tps = m["steady_tokens_per_second"] or m["tokens_per_second"]
    peaks = m.get("peak_memory_gib_per_rank") or {"rank0": m["peak_memory_gib"]}
    print(
        f"{name}: {n} GPU(s), {tps:.0f} tokens/s ({tps / n:.0f} per GPU), peak {peaks} GiB, "
        f"loss {m['train_loss']}, stage wall {wall} s"
    )
    return {
        "mode": mode,
        "processes": n,
        "global_batch": recipe_batch * batches,
        "adapter": adapter,
        "micro_batch": m["micro_batch"],
        "grad_accum": m["grad_accum"],
        "steps": m["steps"],
        "steady_tokens_per_second": tps,
        "tokens_per_second_per_gpu": round(tps / n, 1),
        "peak_memory_gib_per_gpu": peaks,
        "peak_reserved_gib_rank0": m["peak_reserved_gib"],
        "train_loss": m["train_loss"],
        "train_wall_seconds": m["wall_seconds"],
        "stage_wall_seconds": wall,
    }


def main() -> None:
    ap = bench_arguments(__doc__)
    ap.add_argument("--configs", default="single,ddp,fsdp,ddp_recipe_batch")
    ap.add_argument(
        "--rows", type=int, default=320, help="rows each configuration trains on (steps = rows / global batch)"
    )
    ap.add_argument("--timeout", type=int, default=240, help="seconds per configuration")
    args = ap.parse_args()

    import torch

    recipe = bench_params(args.bench, args.model_dir, args.overrides)
    build_shape(args.model_dir, args.shape, Path(recipe.model.tokenizer), None)
    result = {
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "gpus": torch.cuda.device_count(),
        "rows": args.rows,
        "overrides": args.overrides,
        "configs": {},
    }
    for name in args.configs.split(","):
        result["configs"][name] = run_config(name, args, recipe.train.batch_size)
        save(args.out, result)  # after each configuration: a later failure or timeout keeps the earlier figures
    base = result["configs"].get("single", {}).get("tokens_per_second_per_gpu")
    for name, r in result["configs"].items():
        if base and "tokens_per_second_per_gpu" in r and r["processes"] > 1:
            r["scaling_efficiency"] = round(r["tokens_per_second_per_gpu"] / base, 3)
            r["speedup_vs_one_gpu"] = round(r["steady_tokens_per_second"] / base, 2)
            print(
                f"{name}: scaling efficiency {r['scaling_efficiency']:.1%} (tokens/s per GPU against one GPU), "
                f"{r['speedup_vs_one_gpu']}x one GPU's tokens/s"
            )
    shapes = {r["adapter"].get("shapes_sha256") for r in result["configs"].values() if "adapter" in r}
    result["same_adapter_shapes"] = len(shapes) == 1
    print("adapter tensor shapes", "identical across layouts" if len(shapes) == 1 else f"DIFFER: {shapes}")
    save(args.out, result)


if __name__ == "__main__":
    main()
