"""Training throughput on one GPU: plain Hugging Face settings vs the pipeline's train stage, side by side.

Every configuration runs the pipeline's own train stage (tasks.train.train, the code `dvc repro` runs)
on the same Llama-2-7B-shaped model, tokenizer and guanaco-1k rows, differing only in params, each in
its own process so peak-memory figures do not mix. Printed and saved per configuration: tokens/s
(non-padding, after 2 warm-up steps), peak allocated and reserved memory, the planner's prediction,
MFU (4·N FLOPs a token), the mean training loss over the first K steps, and (where asked) the held-out
answer loss after training.

    python benchmarks/train_throughput.py --model-dir /tmp/llama-2-7b-random \
        --work /tmp/tp --out throughput.json [--configs hf_gc,ours_fast]   (after benchmarks/prepare_bench.py)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import H100_BF16_DENSE_FLOPS, LLAMA2_7B_PARAMS, bench_arguments, bench_params, save, workspace  # noqa: E402

COMMON = ["train.max_grad_norm=0.3", "train.logging_steps=1", "train.save_steps=100000"]
# name: (param overrides, optimizer steps, measure held-out loss)
CONFIGS: dict[str, tuple[list[str], int, bool]] = {
    # the notebooks' own settings: batch 1 x accumulation 4, fp16 compute, no mixed-precision flag
    "notebook": (["train.padding_free=false", "train.liger_kernels=false", "train.batch_size=1", "train.grad_accum=4", "train.precision=fp32", "quant.compute_dtype=float16",
                  "train.gradient_checkpointing=true", "train.group_by_length=false"], 8, False),
    # plain transformers + peft + trl + bitsandbytes tuned by hand: bf16, batch 8, gradient checkpointing
    "hf_gc": (["train.padding_free=false", "train.liger_kernels=false", "train.batch_size=8", "train.grad_accum=1", "train.gradient_checkpointing=true",
               "train.group_by_length=false"], 32, True),
    "hf_nogc": (["train.padding_free=false", "train.liger_kernels=false", "train.batch_size=8", "train.grad_accum=1", "train.gradient_checkpointing=false",
                 "train.group_by_length=false"], 32, False),
    # the pipeline's fast setting, same batches in the same order as hf_gc (same math): padding-free varlen
    # attention, Liger kernels, no recomputation
    "ours_same": (["train.batch_size=8", "train.grad_accum=1", "train.gradient_checkpointing=false",
                   "train.group_by_length=false", "train.padding_free=true", "train.liger_kernels=true"], 32, True),
    # the same under a 16 GiB budget: recomputation back on (still the same batches in the same order)
    "ours_16gib": (["train.batch_size=8", "train.grad_accum=1", "train.gradient_checkpointing=true",
                    "train.group_by_length=false", "train.padding_free=true", "train.liger_kernels=true",
                    "train.memory_budget_gib=16"], 32, True),
    # 4x larger micro-batches: more tokens/s, but 4x fewer optimizer steps for the same tokens, so not the same math
    "big_batch": (["train.batch_size=32", "train.grad_accum=1", "train.gradient_checkpointing=false",
                   "train.group_by_length=false", "train.padding_free=true", "train.liger_kernels=true"], 8, True),
    "big_batch_16gib": (["train.batch_size=32", "train.grad_accum=1", "train.gradient_checkpointing=true",
                         "train.group_by_length=false", "train.padding_free=true", "train.liger_kernels=true",
                         "train.memory_budget_gib=16"], 8, True),
    # a further shape for checking the memory planner: small padded batches, no recomputation
    "hf_nogc_b2": (["train.padding_free=false", "train.liger_kernels=false", "train.batch_size=2", "train.grad_accum=1", "train.gradient_checkpointing=false",
                    "train.group_by_length=false"], 12, False),
}
REFERENCE = "hf_gc"


def run_one(name: str, args) -> dict:
    """Inside the per-configuration process: train K steps through the stage, optionally score held-out rows."""
    import torch
    from transformers import TrainerCallback

    from tasks import paths
    from tasks.base_model import load_tokenizer
    from tasks.evaluate import answer_loss, make_batches
    from tasks.train import load_rows, train

    overrides, steps, heldout = CONFIGS[name]
    work = args.work / name
    params = bench_params(args.bench, args.model_dir, [*COMMON, f"train.max_steps={steps}", *overrides, *args.overrides])
    os.chdir(workspace(args.bench, work, params))
    result: dict = {}
    losses: list[float] = []

    class HeldOut(TrainerCallback):
        def on_log(self, _args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

        def on_train_end(self, _args, state, control, model=None, **kw):
            if heldout:
                tok = load_tokenizer(params.model)
                batches = make_batches(tok, load_rows(paths.EVAL_ROWS), params.model.max_length, 8)
                model.eval()
                result["heldout_loss"] = round(answer_loss(model, batches)[0], 5)
                model.train()

    metrics = train(params, extra_callbacks=[HeldOut()])
    tps = metrics["steady_tokens_per_second"]
    return {
        "name": name, "overrides": overrides, "steps": metrics["steps"], "micro_batch": metrics["micro_batch"],
        "grad_accum": metrics["grad_accum"], "tokens_seen": metrics["tokens_seen"],
        "tokens_per_second": tps, "mfu": round(tps * 4 * LLAMA2_7B_PARAMS / H100_BF16_DENSE_FLOPS, 4) if tps else None,
        "peak_allocated_gib": metrics["peak_memory_gib"], "peak_reserved_gib": metrics["peak_reserved_gib"],
        "predicted_peak_gib": metrics["predicted_peak_gib"], "max_micro_batch_tokens": metrics["max_micro_batch_tokens"],
        "predicted_at_max_micro_batch_gib": metrics["predicted_peak_at_max_micro_batch_gib"],
        "mean_loss": round(sum(losses) / len(losses), 5), "losses": losses, **result,
        "gpu": (torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"),
    }


def main() -> None:
    ap = bench_arguments(__doc__)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--run-one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.work = args.work.resolve()
    if args.run_one:
        print("RESULT " + json.dumps(run_one(args.run_one, args)))
        return

    from benchmarks.build_random_llama import SHAPES, build

    build(args.model_dir, Path(bench_params(args.bench, args.model_dir).model.tokenizer), SHAPES[args.shape])
    results = {}
    for name in args.configs.split(","):
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--run-one", name], capture_output=True, text=True)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            results[name] = {"name": name, "error": (proc.stderr or proc.stdout)[-3000:]}
            print(f"{name}: FAILED\n{results[name]['error']}")
        else:
            results[name] = json.loads(line[7:])
            r = results[name]
            print(f"{name:11s} {r['tokens_per_second'] or 0:8.0f} tok/s  peak {r['peak_allocated_gib']} GiB "
                  f"(reserved {r['peak_reserved_gib']}, predicted {r['predicted_at_max_micro_batch_gib']} at "
                  f"{r['max_micro_batch_tokens']} tokens)  MFU {r['mfu']}  mean loss {r['mean_loss']}  "
                  f"held-out {r.get('heldout_loss')}  [{time.perf_counter() - start:.0f} s]", flush=True)
        save(args.out, {"results": results, "reference": REFERENCE})
    ref = results.get(REFERENCE, {}).get("tokens_per_second")
    if ref:
        for name, r in results.items():
            if r.get("tokens_per_second"):
                r["speedup_vs_reference"] = round(r["tokens_per_second"] / ref, 2)
                print(f"{name:11s} {r['speedup_vs_reference']:.2f}x {REFERENCE}")
    save(args.out, {"results": results, "reference": REFERENCE})


if __name__ == "__main__":
    main()
