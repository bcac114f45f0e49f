"""The real recipe's shape, end to end through the pipeline's own stage code, on one GPU.

Llama-2-7B-shaped base (random weights, benchmarks/build_random_llama.py), the real Llama-2 tokenizer,
the guanaco-llama2-1k rows, preset llama2_7b_guanaco (4-bit NF4, LoRA r=64/alpha 16/dropout 0.1,
paged AdamW 32-bit, lr 2e-4, 1 epoch): download -> validate -> format -> train -> evaluate, with the
planner's prediction beside the measured peak. Any param can be overridden with -S key=value.

    python benchmarks/gpu_recipe.py --model-dir /tmp/llama-2-7b-random --tokenizer .bench/llama-2-tokenizer \
        --data .bench/guanaco-llama2-1k/train.parquet --work /tmp/recipe --out recipe.json
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.build_random_llama import SHAPES, build  # noqa: E402
from benchmarks.common import H100_BF16_DENSE_FLOPS, prepare_data, recipe_params, save  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", type=Path, required=True)
    ap.add_argument("--tokenizer", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--shape", default="llama2-7b", help="llama2-7b, or smoke for a CPU check of this script")
    ap.add_argument("-S", dest="overrides", action="append", default=[], help="param override, key=value")
    args = ap.parse_args()

    import torch

    from tasks.evaluate import evaluate
    from tasks.train import train

    build(args.model_dir, args.tokenizer, SHAPES[args.shape])
    params = recipe_params(args.work, args.model_dir, args.data, args.overrides)
    times = prepare_data(args.work, params)
    os.chdir(args.work)
    start = time.perf_counter()
    train_metrics = train(params)
    times["train"] = round(time.perf_counter() - start, 2)
    start = time.perf_counter()
    eval_metrics = evaluate(params)
    times["evaluate"] = round(time.perf_counter() - start, 2)
    n_params = 6.74e9
    tps = train_metrics["steady_tokens_per_second"] or train_metrics["tokens_per_second"]
    result = {
        "gpu": (torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"),
        "overrides": args.overrides,
        "stage_seconds": times,
        "train": train_metrics,
        "mfu": round(tps * 4 * n_params / H100_BF16_DENSE_FLOPS, 4),
        "evaluate": eval_metrics,
    }
    save(args.out, result)
    print(f"train: {train_metrics['steps']} steps, {tps:.0f} tokens/s steady, peak {train_metrics['peak_memory_gib']} GiB "
          f"(planner worst case {train_metrics['predicted_peak_gib']}, at the largest micro-batch seen "
          f"{train_metrics['predicted_peak_at_max_micro_batch_gib']}), wall {times['train']} s")
    print(f"evaluate: base loss {eval_metrics['base']['loss']:.4f}, tuned {eval_metrics['tuned']['loss']:.4f}, {times['evaluate']} s")


if __name__ == "__main__":
    main()
