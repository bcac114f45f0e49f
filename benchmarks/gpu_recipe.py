"""The real recipe's shape, end to end through the pipeline's own train and evaluate stages, on one GPU.

Llama-2-7B-shaped base (random weights, benchmarks/build_random_base.py), the real Llama-2 tokenizer,
the guanaco-llama2-1k rows prepared by benchmarks/prepare_bench.py, preset llama2_7b_guanaco (4-bit
NF4, LoRA r=64/alpha 16/dropout 0.1 on q,v, paged AdamW 32-bit, lr 2e-4, 1 epoch). Prints tokens/s,
peak memory beside the planner's prediction, and wall time; any param can be overridden with -S key=value.

    python -m benchmarks.gpu_recipe --model-dir /tmp/llama-2-7b-random --work /tmp/recipe --out recipe.json
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from benchmarks.build_random_base import build_shape
from benchmarks.common import bench_arguments, bench_params, model_mfu, save, workspace


def main() -> None:
    ap = bench_arguments(__doc__)
    args = ap.parse_args()

    import torch

    from tasks.evaluate.stage import evaluate
    from tasks.train.stage import train

    params = bench_params(args.bench, args.model_dir, args.overrides)
    build_shape(args.model_dir, args.shape, Path(params.model.tokenizer), None)
    os.chdir(workspace(args.bench, args.work.resolve(), params))
    times = {}
    start = time.perf_counter()
    train_metrics = train(params)
    times["train"] = round(time.perf_counter() - start, 2)
    start = time.perf_counter()
    eval_metrics = evaluate(params)
    times["evaluate"] = round(time.perf_counter() - start, 2)
    tps = train_metrics["steady_tokens_per_second"] or train_metrics["tokens_per_second"]
    result = {
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "overrides": args.overrides,
        "stage_seconds": times,
        "train": train_metrics,
        **model_mfu(args.model_dir, tps),
        "evaluate": eval_metrics,
    }
    save(args.out, result)
    print(
        f"train: {train_metrics['steps']} steps, {tps:.0f} tokens/s steady, "
        f"peak {train_metrics['peak_memory_gib']} GiB "
        f"(planner worst case {train_metrics['predicted_peak_gib']}, at the largest micro-batch seen "
        f"{train_metrics['predicted_peak_at_max_micro_batch_gib']}), wall {times['train']} s"
    )
    print(
        f"evaluate: base loss {eval_metrics['base']['loss']:.4f}, tuned {eval_metrics['tuned']['loss']:.4f}, "
        f"stop rate {eval_metrics['tuned']['stop_rate']}, {times['evaluate']} s"
    )


if __name__ == "__main__":
    main()
