"""Training throughput on one GPU: a plain trl script (the reference) vs the pipeline's train stage, side by side.

`plain_trl` is benchmarks/plain_trl.py, QLoRA SFT as the notebooks and trl's docs write it; `unsloth`,
`unsloth_nogc` and `unsloth_recipe` are the same SFT through Unsloth (benchmarks/unsloth_trl.py), run with the python
of Unsloth's own venv (UNSLOTH_PYTHON, default /tmp/unsloth-venv/bin/python; recorded as skipped where there is none);
every other configuration runs the pipeline's own train stage (tasks.train.train, the code `dvc repro` runs) on the same
Llama-2-7B-shaped model, tokenizer and guanaco-1k rows, differing only in params. Each run is its own process
so peak-memory figures do not mix; one discarded warm-up run of the first configuration goes first (the first
GPU process on a machine ran slow here); with --repeats the configurations take turns (a, b, a, b) and each
figure is the median. Printed and saved per configuration: tokens/s
(non-padding, after 2 warm-up steps), peak allocated and reserved memory, the planner's prediction,
MFU (4·N FLOPs a token), the mean training loss over the K steps, and (where asked) the held-out
answer loss after training.

    python -m benchmarks.train_throughput --model-dir /tmp/llama-2-7b-random \
        --work /tmp/tp --out throughput.json [--configs hf_gc,ours_fast]   (after benchmarks/prepare_bench.py)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import ROOT, bench_arguments, bench_params, model_mfu, save, workspace
from benchmarks.step_clock import StepClock

# train.compile pinned off unless a configuration says otherwise: the presets' auto would decide by each run's length
COMMON = ["train.max_grad_norm=0.3", "train.save_steps=100000", "train.compile=false"]
# Loss logged every 10 steps, trl's default (SFTConfig.logging_steps) and so what plain_trl gets: each log reads the
# loss off the GPU, a synchronize, and logging every step would charge both sides that stall ten times over. Each
# logged loss is the mean over its 10 steps, so their mean is still the mean over all steps.
LOGGING_STEPS = 10
# plain_trl's math as the stage takes it: batch 8, no accumulation, length-grouped (the same rows in the same order),
# loss on every token as trl puts it on a `text` column, and its constant learning rate (the recipe's default is
# cosine); padding-free, which changes no math
SAME_MATH = [
    "train.lr_scheduler=constant",
    "train.batch_size=8",
    "train.grad_accum=1",
    "train.group_by_length=true",
    "train.padding_free=true",
    "train.answer_only_loss=false",
]
BUDGET_16GIB = ["train.gradient_checkpointing=auto", "train.memory_budget_gib=16"]
# the step-overlap levers (tasks/train/step_overlap.py, the allocator) off, to measure what they give
OVERLAP_OFF = ["train.sync_free_step=false", "train.expandable_segments=false"]
# A same-math configuration's logged losses (each the mean over LOGGING_STEPS steps) must stay within this relative
# distance of the reference's at the same steps. Only dropout masks differ (drawn for differently shaped tensors).
LOSS_TOLERANCE = 0.01
# train.fp8_base is not the same math: its held-out loss after the epoch must be within this of the bf16 base's
FP8_TOLERANCE = 0.005
FP8_ON = "train.fp8_base=true"
FP8_TWINS = {"epoch_compile_fp8": "epoch_compile_deq"}  # an FP8 configuration: its bf16 counterpart
# name: (param overrides, optimizer steps, measure held-out loss)
CONFIGS: dict[str, tuple[list[str], int, bool]] = {
    # the notebooks' own settings: batch 1 x accumulation 4, fp16 compute, no mixed-precision flag
    "notebook": (
        [
            "train.padding_free=false",
            "train.liger_kernels=false",
            "train.batch_size=1",
            "train.grad_accum=4",
            "train.precision=fp32",
            "quant.compute_dtype=float16",
            "train.gradient_checkpointing=true",
            "train.group_by_length=false",
        ],
        8,
        False,
    ),
    # plain transformers + peft + trl + bitsandbytes tuned by hand: bf16, batch 8, gradient checkpointing
    "hf_gc": (
        [
            "train.padding_free=false",
            "train.liger_kernels=false",
            "train.batch_size=8",
            "train.grad_accum=1",
            "train.gradient_checkpointing=true",
            "train.group_by_length=false",
        ],
        32,
        True,
    ),
    # hf_gc with length grouping, as plain_trl samples: the 1.5x between hf_gc and plain_trl is padding
    "hf_gc_grouped": (
        [
            "train.padding_free=false",
            "train.liger_kernels=false",
            "train.batch_size=8",
            "train.grad_accum=1",
            "train.gradient_checkpointing=true",
            "train.group_by_length=true",
        ],
        40,
        False,
    ),
    "hf_nogc": (
        [
            "train.padding_free=false",
            "train.liger_kernels=false",
            "train.batch_size=8",
            "train.grad_accum=1",
            "train.gradient_checkpointing=false",
            "train.group_by_length=false",
        ],
        32,
        False,
    ),
    # the pipeline's fast setting (padding-free varlen attention, Liger kernels, no recomputation) on plain_trl's
    # batches: batch 8 and group_by_length, so the same rows in the same order (same math)
    "ours_same": ([*SAME_MATH, "train.gradient_checkpointing=false", "train.liger_kernels=true"], 40, False),
    # the same under a 16 GiB budget (and a 16 GiB cap): the planner picks the layout
    "ours_16gib": ([*SAME_MATH, *BUDGET_16GIB, "train.liger_kernels=true"], 40, False),
    # both without the step-overlap levers: what they give
    "ours_same_sync": (
        [*SAME_MATH, "train.gradient_checkpointing=false", "train.liger_kernels=true", *OVERLAP_OFF],
        40,
        False,
    ),
    "ours_16gib_sync": ([*SAME_MATH, *BUDGET_16GIB, "train.liger_kernels=true", *OVERLAP_OFF], 40, False),
    # levers on top of ours_same / ours_16gib: regional torch.compile of the decoder layers. A compiled run turns Liger
    # off (memory.liger_applied: dynamo cannot trace Liger's RMSNorm, trl refuses Liger on the loss alone), so compile
    # stands in for Liger's fusions here (inductor fuses RMSNorm/SwiGLU itself); ours_noliger is its baseline
    "ours_noliger": ([*SAME_MATH, "train.gradient_checkpointing=false", "train.liger_kernels=false"], 40, False),
    "ours_compile": (
        [*SAME_MATH, "train.gradient_checkpointing=false", "train.liger_kernels=false", "train.compile=true"],
        40,
        False,
    ),
    # ours_compile on the 4-bit base kept 4-bit (dequantized in every forward and backward): what
    # train.dequantized_base's auto, which keeps it dequantized where the planner finds room, gives over it
    "ours_compile_4bit": (
        [
            *SAME_MATH,
            "train.gradient_checkpointing=false",
            "train.liger_kernels=false",
            "train.compile=true",
            "train.dequantized_base=false",
        ],
        40,
        False,
    ),
    # ours_compile against an empty compile cache (its own folder, removed after): the cold first-step cost
    "ours_compile_cold": (
        [*SAME_MATH, "train.gradient_checkpointing=false", "train.liger_kernels=false", "train.compile=true"],
        40,
        False,
    ),
    # ours_compile on a base dequantized once for the run (train.dequantized_base): no per-step dequantization
    "ours_compile_deq": (
        [
            *SAME_MATH,
            "train.gradient_checkpointing=false",
            "train.liger_kernels=false",
            "train.compile=true",
            "train.dequantized_base=true",
        ],
        40,
        False,
    ),
    # ... and its frozen base's matmuls in float8 (train.fp8_base, opt-in: not the same math)
    "ours_compile_fp8": (
        [
            *SAME_MATH,
            "train.gradient_checkpointing=false",
            "train.liger_kernels=false",
            "train.compile=true",
            FP8_ON,
        ],
        40,
        False,
    ),
    # train.fp8_base's check (issue 32, item 6): one epoch of the 1k rows each, the held-out answer loss after it
    # against the same epoch on the bf16 dequantized base (FP8_TOLERANCE)
    "epoch_compile_deq": (
        [
            *SAME_MATH,
            "train.gradient_checkpointing=false",
            "train.liger_kernels=false",
            "train.compile=true",
            "train.dequantized_base=true",
        ],
        -1,
        True,
    ),
    "epoch_compile_fp8": (
        [
            *SAME_MATH,
            "train.gradient_checkpointing=false",
            "train.liger_kernels=false",
            "train.compile=true",
            FP8_ON,
        ],
        -1,
        True,
    ),
    "ours_16gib_compile": (
        [*SAME_MATH, *BUDGET_16GIB, "train.liger_kernels=false", "train.compile=true"],
        40,
        False,
    ),
    # the same with every micro-batch recomputing the layers the longest needs (train.adaptive_recompute off)
    "ours_16gib_compile_static": (
        [
            *SAME_MATH,
            *BUDGET_16GIB,
            "train.liger_kernels=false",
            "train.compile=true",
            "train.adaptive_recompute=false",
        ],
        40,
        False,
    ),
    # 4x larger micro-batches: more tokens/s, but 4x fewer optimizer steps for the same tokens, so not the same math
    "big_batch": (
        [
            "train.batch_size=32",
            "train.grad_accum=1",
            "train.gradient_checkpointing=false",
            "train.group_by_length=false",
            "train.padding_free=true",
            "train.liger_kernels=true",
        ],
        8,
        True,
    ),
    "big_batch_16gib": (
        [
            "train.batch_size=32",
            "train.grad_accum=1",
            "train.gradient_checkpointing=true",
            "train.group_by_length=false",
            "train.padding_free=true",
            "train.liger_kernels=true",
            "train.memory_budget_gib=16",
        ],
        8,
        True,
    ),
    # The GPU recipe as shipped (batch 4, group_by_length, memory_budget_gib and gradient_checkpointing auto) against
    # the same with recomputation pinned on (the pre-auto default), and the planner's choice under card-sized caps
    # (a numeric budget also caps this process's CUDA memory at it, as a card of that size would).
    "recipe_auto": (["train.group_by_length=true"], 40, False),
    # The whole recipe, one epoch (max_steps -1): compile off as before issue 32, and compile auto as shipped now (on
    # when the planned epoch saves more than compiling costs: warm when an earlier run of the invocation compiled)
    "recipe_epoch_eager": (["train.group_by_length=true", "train.compile=false"], -1, False),
    "recipe_epoch_auto": (["train.group_by_length=true", "train.compile=auto"], -1, False),
    # ... and auto against an empty compile cache, as the first run of a fresh clone meets it
    "recipe_epoch_auto_cold": (["train.group_by_length=true", "train.compile=auto"], -1, False),
    # ... and compile forced on: what auto would give if it chose compile for the recipe's epoch
    "recipe_epoch_compile": (["train.group_by_length=true", "train.compile=true"], -1, False),
    "recipe_gc": (["train.group_by_length=true", "train.gradient_checkpointing=true"], 40, False),
    "recipe_16gib": (["train.group_by_length=true", "train.memory_budget_gib=16"], 40, False),
    "recipe_24gib": (["train.group_by_length=true", "train.memory_budget_gib=24"], 40, False),
    # a further shape for checking the memory planner: small padded batches, no recomputation
    "hf_nogc_b2": (
        [
            "train.padding_free=false",
            "train.liger_kernels=false",
            "train.batch_size=2",
            "train.grad_accum=1",
            "train.gradient_checkpointing=false",
            "train.group_by_length=false",
        ],
        12,
        False,
    ),
}
# ours_compile without train.gemm_warmup: cuBLAS loading kernels as new token counts pick them, mid-step
CONFIGS["ours_compile_no_warmup"] = ([*CONFIGS["ours_compile"][0], "train.gemm_warmup=false"], 40, False)
PLAIN_TRL = "plain_trl"  # benchmarks/plain_trl.py: what a trl user writes; the reference the README divides by
CONFIGS[PLAIN_TRL] = ([], 40, False)
TRL_TUNED = "trl_tuned"  # benchmarks/plain_trl.py as an informed user tunes it: the second reference
CONFIGS[TRL_TUNED] = ([], 40, False)
# Unsloth, the peer users pick for speed (benchmarks/unsloth_trl.py): plain_trl's SFT loaded through Unsloth, run with
# the python of Unsloth's own venv (gpu_acceptance.sh's `unsloth` phase), the same rows in the same order
UNSLOTH = "unsloth"  # the settings Unsloth's docs recommend (recomputation "unsloth", dropout 0, adamw_8bit)
UNSLOTH_NOGC = "unsloth_nogc"  # the same without recomputation, which this card has the memory for
UNSLOTH_RECIPE = "unsloth_recipe"  # the recipe's (plain_trl's) settings through Unsloth's kernels
UNSLOTH_CONFIGS = (UNSLOTH, UNSLOTH_NOGC, UNSLOTH_RECIPE)
for _name in UNSLOTH_CONFIGS:
    CONFIGS[_name] = ([], 40, False)
UNSLOTH_PYTHON_DEFAULT = "/tmp/unsloth-venv/bin/python"
REFERENCE = PLAIN_TRL
# Every row's ratio to each of these that ran, under its key: the README divides by the first
RATIOS = (
    (PLAIN_TRL, "speedup_vs_reference"),
    (TRL_TUNED, "speedup_vs_trl_tuned"),
    (UNSLOTH, "speedup_vs_unsloth"),
    (UNSLOTH_NOGC, "speedup_vs_unsloth_nogc"),
    (UNSLOTH_RECIPE, "speedup_vs_unsloth_recipe"),
)


def run_plain_trl(args, steps: int, tuned: bool = False) -> dict:
    import torch

    from benchmarks.plain_trl import train_plain_trl

    clock = StepClock()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    name = TRL_TUNED if tuned else PLAIN_TRL
    trainer = train_plain_trl(
        args.model_dir, args.bench / "data" / "formatted" / "train.jsonl", args.work / name, steps, [clock], tuned
    )
    cuda = torch.cuda.is_available()
    return {
        "steps": trainer.state.global_step,
        "micro_batch": 8,
        "grad_accum": 1,
        "tokens_seen": int(trainer.state.num_input_tokens_seen),
        "tokens_per_second": clock.tokens_per_second(),
        "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if cuda else None,
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 3) if cuda else None,
        "predicted_peak_gib": None,
        "max_micro_batch_tokens": None,
        "predicted_at_max_micro_batch_gib": None,
        "gradient_checkpointing": not tuned,
        "layout_reason": "trl tuned (no recomputation, Liger)" if tuned else "plain trl defaults",
        "losses": clock.losses,
    }


def unsloth_python() -> str:
    return os.environ.get("UNSLOTH_PYTHON") or UNSLOTH_PYTHON_DEFAULT


def unsloth_missing() -> str | None:
    """Why an Unsloth configuration cannot run here, or None."""
    python = unsloth_python()
    if not (os.path.isfile(python) and os.access(python, os.X_OK)):
        return (
            f"skipped: no Unsloth python at {python} (UNSLOTH_PYTHON); make its venv first: "
            "bash benchmarks/gpu_acceptance.sh unsloth"
        )
    return None


def run_unsloth(args, steps: int, setting: str) -> dict:
    """benchmarks/unsloth_trl.py in Unsloth's venv, from its own scratch dir (Unsloth writes its compiled cache into
    the working directory), our repo on its PYTHONPATH; its RESULT line in run_plain_trl's schema."""
    reason = unsloth_missing()
    if reason:
        raise RuntimeError(reason)
    work = args.work / setting
    work.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
        # one compile cache for Unsloth's runs of the invocation (its torch may differ from ours)
        "TORCHINDUCTOR_CACHE_DIR": str(args.work / "unsloth-compile-cache"),
        "HF_HUB_OFFLINE": "1",
    }
    proc = subprocess.run(
        [
            unsloth_python(),
            "-m",
            "benchmarks.unsloth_trl",
            "--setting",
            setting,
            "--model-dir",
            str(args.model_dir.resolve()),
            "--train-jsonl",
            str((args.bench / "data" / "formatted" / "train.jsonl").resolve()),
            "--out-dir",
            str(work / "out"),
            "--max-steps",
            str(steps),
        ],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
    )
    (work / "unsloth.log").write_text(proc.stdout + proc.stderr)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(
            f"{setting} in {unsloth_python()} exited {proc.returncode} without a result (log {work / 'unsloth.log'}):\n"
            + (proc.stderr or proc.stdout)[-2500:]
        )
    return json.loads(line[7:])


def run_one(name: str, args) -> dict:
    """Inside the per-configuration process: train K steps through the stage, optionally score held-out rows."""
    import torch
    from transformers import TrainerCallback

    from tasks.common import paths
    from tasks.common.base_model import load_tokenizer
    from tasks.common.formatted import load_rows
    from tasks.evaluate.stage import answer_loss, make_batches
    from tasks.train.stage import train

    overrides, steps, heldout = CONFIGS[name]
    if name in UNSLOTH_CONFIGS:
        r = run_unsloth(args, steps, name)  # before this process touches the GPU
    elif name in (PLAIN_TRL, TRL_TUNED):
        r = run_plain_trl(args, steps, tuned=name == TRL_TUNED)
    else:
        work = args.work / name
        params = bench_params(
            args.bench,
            args.model_dir,
            [
                *COMMON,
                f"train.logging_steps={LOGGING_STEPS if steps < 0 else min(LOGGING_STEPS, steps)}",
                f"train.max_steps={steps}",
                *overrides,
                *args.overrides,
            ],
        )
        os.chdir(workspace(args.bench, work, params))
        # One compile cache for the invocation (a later compiled run finds it warm), or an empty one for *_cold
        cache = Path(tempfile.mkdtemp(prefix="cold-cache-")) if name.endswith("_cold") else args.work / "compile-cache"
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache)
        budget = params.train.memory_budget_gib
        if isinstance(budget, float) and torch.cuda.is_available():  # behave as a card of `budget` GiB would
            torch.cuda.set_per_process_memory_fraction(
                budget * 2**30 / torch.cuda.get_device_properties(0).total_memory
            )
        result: dict = {}
        clock = StepClock()

        class HeldOut(TrainerCallback):
            def on_train_end(self, _args, state, control, model=None, **kw):
                if heldout:
                    tok = load_tokenizer(params.model)
                    batches = make_batches(tok, load_rows(paths.EVAL_ROWS), params.model.max_length, 8)
                    model.eval()
                    result["heldout_loss"] = round(answer_loss(model, batches)[0], 5)
                    model.train()

        metrics = train(params, extra_callbacks=[clock, HeldOut()])
        if name.endswith("_cold"):
            shutil.rmtree(cache, ignore_errors=True)
        r = {
            "steps": metrics["steps"],
            "micro_batch": metrics["micro_batch"],
            "grad_accum": metrics["grad_accum"],
            "tokens_seen": metrics["tokens_seen"],
            "tokens_per_second": clock.tokens_per_second(),
            "peak_allocated_gib": metrics["peak_memory_gib"],
            "peak_reserved_gib": metrics["peak_reserved_gib"],
            "predicted_peak_gib": metrics["predicted_peak_gib"],
            "max_micro_batch_tokens": metrics["max_micro_batch_tokens"],
            "predicted_at_max_micro_batch_gib": metrics["predicted_peak_at_max_micro_batch_gib"],
            "gradient_checkpointing": metrics["gradient_checkpointing"],
            "recompute_layers": metrics["recompute_layers"],
            "recompute_layers_mean": metrics["recompute_layers_mean"],
            "layout_reason": metrics["layout_reason"],
            "train_wall_seconds": metrics["wall_seconds"],  # the stage's fit: first step (compiling) to the last
            "compile": metrics["compile"],
            "dequantized_base": metrics["dequantized_base"],
            "losses": clock.losses,
            **result,
        }
    tps = r["tokens_per_second"]
    return {
        "name": name,
        "overrides": overrides,
        **r,
        **model_mfu(args.model_dir, tps),
        "mean_loss": round(sum(r["losses"]) / len(r["losses"]), 5) if r["losses"] else None,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
    }


def run_process(name: str, label: str) -> dict:
    """One configuration in its own process (so peak-memory figures do not mix); prints and returns its result."""
    start = time.perf_counter()
    reason = unsloth_missing() if name in UNSLOTH_CONFIGS else None
    if reason:  # recorded, not raised: the other configurations of the invocation still run
        print(f"{name} ({label}): {reason}", flush=True)
        return {"name": name, "error": reason, "skipped": True, "wall_seconds": 0.0}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.train_throughput", *sys.argv[1:], "--run-one", name],
        capture_output=True,
        text=True,
    )
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        r = {"name": name, "error": (proc.stderr or proc.stdout)[-3000:]}
        print(f"{name} ({label}): FAILED\n{r['error']}")
    else:
        r = json.loads(line[7:])
        print(
            f"{name:13s} {label}: {r['tokens_per_second'] or 0:8.0f} tok/s  "
            f"peak {r['peak_allocated_gib']} GiB "
            f"(reserved {r['peak_reserved_gib']}, predicted {r['predicted_at_max_micro_batch_gib']} at "
            f"{r['max_micro_batch_tokens']} tokens)  micro {r['micro_batch']} x {r['grad_accum']}, "
            f"recompute {r.get('recompute_layers_mean')} layers  MFU {r['mfu']}  mean loss {r['mean_loss']}  "
            f"held-out {r.get('heldout_loss')}  fit {r.get('train_wall_seconds')} s  {_compile_summary(r)}  "
            f"[{time.perf_counter() - start:.0f} s]",
            flush=True,
        )
    r["wall_seconds"] = round(time.perf_counter() - start, 1)  # the whole process: load, compile, steps
    return r


def _compile_summary(r: dict) -> str:
    c = r.get("compile") or {}
    if not c:
        return ""
    return (
        f"compile {c.get('setting')}->{'on' if c.get('on') else 'off'} first step {c.get('first_step_seconds')} s "
        f"(+{c.get('first_step_overhead_seconds')} s) graphs {c.get('graphs')} "
        f"recompiled {c.get('recompilations_after_first_step')} breaks {c.get('graph_breaks')}"
    ) + (" dequantized base" if (r.get("dequantized_base") or {}).get("on") else "")


def main() -> None:
    ap = bench_arguments(__doc__)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--repeats", type=int, default=1, help="run the configs in turn this many times (interleaved)")
    ap.add_argument(
        "--resume",
        action="store_true",
        help="keep the runs already saved in --out and run only the missing turns, in the same order (a schedule "
        "split over several commands on one machine)",
    )
    ap.add_argument(
        "--no-warmup",
        dest="warmup",
        action="store_false",
        help="skip the discarded first run of the first config (on by default)",
    )
    ap.add_argument("--run-one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.work = args.work.resolve()
    if args.run_one:
        print("RESULT " + json.dumps(run_one(args.run_one, args)))
        return

    from benchmarks.build_random_base import build_shape

    if not (args.model_dir / "config.json").exists():
        build_shape(args.model_dir, args.shape, Path(bench_params(args.bench, args.model_dir).model.tokenizer), None)
    names = args.configs.split(",")
    runs: dict[str, list[dict]] = {name: [] for name in names}
    warmup = None
    if args.resume and args.out.exists():
        saved = json.loads(args.out.read_text())
        runs.update({name: saved.get("runs", {}).get(name, []) for name in names})
        warmup = saved.get("warmup")  # the first command's warm-up stays on record
    if args.warmup:
        # The first GPU process on a fresh machine ran slower in every invocation here (plain trl's first run 20-35%
        # below its second), which would bias whichever config runs first: one discarded run of it goes before.
        warmup = run_process(names[0], "warm-up, not counted")
    for rep, name in turns(names, args.repeats, runs):
        runs[name].append(run_process(name, f"run {rep + 1}"))
        save(args.out, {"runs": runs, "reference": REFERENCE, "warmup": warmup})
    results = {name: _median_run(rs) for name, rs in runs.items()}
    add_ratios(results)
    check_losses(results, runs)
    check_fp8_losses(results)
    for name, r in results.items():
        print(
            f"{name:13s} median {r.get('tokens_per_second')} tok/s over {r.get('repeats')} run(s): "
            f"{r.get('all_tokens_per_second')}; peak {r.get('peak_allocated_gib')} GiB"
        )
    save(args.out, {"results": results, "runs": runs, "reference": REFERENCE, "warmup": warmup})


def add_ratios(results: dict[str, dict]) -> None:
    """Every row's tokens/s over each reference that ran in this invocation (RATIOS): every claim names which one it
    divides by."""
    for ref_name, key in RATIOS:
        ref = results.get(ref_name, {}).get("tokens_per_second")
        if not ref:
            continue
        for name, r in results.items():
            if r.get("tokens_per_second"):
                r[key] = round(r["tokens_per_second"] / ref, 2)
                print(f"{name:13s} {r[key]:.2f}x {ref_name}")


def turns(names: list[str], repeats: int, done: dict[str, list]) -> list[tuple[int, str]]:
    """(repetition, config) in the order they run: interleaved (a, b, a, b), so drift on the machine hits every
    config alike; turns already in `done` (an earlier command's, with --resume) are left out."""
    return [(rep, name) for rep in range(repeats) for name in names if len(done.get(name, [])) <= rep]


def loss_gap(losses: list[float], reference: list[float]) -> float | None:
    """The largest relative distance between two runs' logged losses at the same steps; None if nothing to compare."""
    pairs = list(zip(losses, reference))
    if not pairs or len(losses) != len(reference):
        return None
    return max(abs(a - b) / abs(b) for a, b in pairs)


def check_losses(results: dict[str, dict], runs: dict[str, list[dict]]) -> None:
    """The same-math check: every run of a same-math configuration against every run of the reference, logged loss
    by logged loss (the same rows in the same order, so the same steps see the same tokens)."""
    references = [r["losses"] for r in runs.get(REFERENCE, []) if r.get("losses")]
    for name, r in results.items():
        overrides = set(CONFIGS[name][0])
        # plain_trl's math (float8 matmuls are not: check_fp8_losses checks those), or Unsloth's kernels on it
        same_math = (set(SAME_MATH) <= overrides and FP8_ON not in overrides) or name == UNSLOTH_RECIPE
        if name == REFERENCE or not same_math or not references:
            continue
        gaps = [loss_gap(run["losses"], ref) for run in runs[name] if run.get("losses") for ref in references]
        worst = None if not gaps or None in gaps else max(gaps)
        r["loss_max_rel_gap_vs_reference"] = None if worst is None else round(worst, 5)
        r["same_math_loss_check"] = "pass" if worst is not None and worst <= LOSS_TOLERANCE else "FAIL"
        shown = "n/a" if worst is None else f"{worst:.3%}"
        verdict = r["same_math_loss_check"]
        print(f"{name:13s} same-math loss check: {verdict} (largest gap {shown}, limit {LOSS_TOLERANCE:.0%})")


def check_fp8_losses(results: dict[str, dict]) -> None:
    """train.fp8_base's check: the held-out answer loss after the epoch against the bf16 base's (FP8_TOLERANCE)."""
    for fp8, bf16 in FP8_TWINS.items():
        a, b = (results.get(name, {}).get("heldout_loss") for name in (fp8, bf16))
        if a is None or b is None:
            continue
        gap = abs(a - b) / abs(b)
        r = results[fp8]
        r["heldout_rel_gap_vs_bf16"] = round(gap, 5)
        r["fp8_loss_check"] = "pass" if gap <= FP8_TOLERANCE else "FAIL"
        verdict = r["fp8_loss_check"]
        print(f"{fp8:13s} held-out loss {a} vs {bf16} {b}: gap {gap:.3%} (limit {FP8_TOLERANCE:.1%}) {verdict}")


def _median_run(rs: list[dict]) -> dict:
    """The middle run's details, with tokens/s the median over all runs (the mean of the middle two when even)."""
    ok = sorted((r for r in rs if r.get("tokens_per_second")), key=lambda r: r["tokens_per_second"])
    if not ok:
        return rs[-1]
    all_tps = [r["tokens_per_second"] for r in rs if r.get("tokens_per_second")]
    return {
        **ok[(len(ok) - 1) // 2],
        "tokens_per_second": round(statistics.median(all_tps), 1),
        "repeats": len(ok),
        "all_tokens_per_second": all_tps,
    }


if __name__ == "__main__":
    main()
