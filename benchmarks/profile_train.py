"""Where a training step's GPU time goes: torch.profiler over a few steps of the train stage, kernels grouped by kind.

Runs one configuration of benchmarks/train_throughput.py (its CONFIGS: the same params the throughput figures come
from) through the stage's own train(), profiles steps `--skip`+1 .. `--skip`+`--active` (after warm-up), and
prints and saves per step: wall time, GPU busy time (the union of kernel intervals; the rest is the GPU waiting on
the CPU), and kernel time per kind (4-bit dequantization, GEMMs, attention, Liger/Triton, elementwise, optimizer,
copies). A kind's share bounds what a lever aimed at it can win: a faster dequantization kernel cannot save more
than the dequantization row, CUDA graphs no more than the idle time.

    python -m benchmarks.profile_train --model-dir /tmp/llama-2-7b-random --work /tmp/prof \
        --out profile.json --config ours_same          (after benchmarks/prepare_bench.py)

`--with-stack` records Python frames too (slower: the figures are for reading, not for timing): the idle time is then
also attributed to the innermost Python function the CPU was in (gpu_idle_ms_per_step_by_python_frame), which is
where a gap with no op open, "(python)", went. gpu_acceptance.sh passes it through PROFILE_ARGS.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import time
from pathlib import Path

from benchmarks.common import bench_arguments, bench_params, save, workspace
from benchmarks.step_clock import StepClock
from benchmarks.train_throughput import COMMON, CONFIGS, LOGGING_STEPS

# First match wins: the order puts the specific names before the generic ones.
KINDS = [
    # inductor's generated kernels (triton_poi_/triton_red_/triton_per_...) are named after the nodes they fuse, which
    # may read "gemm_4bit" (a fused cast around bitsandbytes' matmul, counted as GEMM time before this rule)
    ("liger_triton", r"^triton_(poi|red|per)_"),
    ("dequant_4bit", r"dequantize|kDequant"),
    ("gemm_4bit_inference", r"kgemm_4bit|gemv_4bit"),
    ("attention", r"flash|fmha|attn|attention"),
    ("gemm", r"gemm|cutlass|xmma|nvjet|cublas|sm90_|wgmma|splitK"),
    ("optimizer", r"adam|optimizer|multi_tensor"),
    ("liger_triton", r"triton|liger|_rms_norm|swiglu|cross_entropy"),
    ("dropout_rng", r"dropout|fused_dropout|philox|bernoulli"),
    ("copy_cast", r"copy|Memcpy|Memset|cast|to_copy|cat_"),
    ("reduce", r"reduce|norm|sum|mean"),
    ("elementwise", r"elementwise|vectorized|unrolled|pointwise|index|mul|add"),
]


def kind_of(name: str) -> str:
    return next((kind for kind, pattern in KINDS if re.search(pattern, name, re.IGNORECASE)), "other")


def busy_time_us(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals: time the GPU ran at least one kernel."""
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if s > end:
            total += e - s
            end = e
        elif e > end:
            total += e - end
            end = e
    return total


def idle_gaps(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The stretches between kernels when no kernel ran (the window's edges left out)."""
    gaps, end = [], None
    for s, e in sorted(intervals):
        if end is not None and s > end:
            gaps.append((end, s))
        end = e if end is None else max(end, e)
    return gaps


def idle_by_cpu_op(gaps: list[tuple[float, float]], cpu_events: list[tuple[int, float, float, str]]) -> dict:
    """GPU idle time (us) by what the CPU was inside at the middle of each gap: on each thread the innermost CPU
    range open then (an aten op, an autograd node, the optimizer step, the data loader), and of those the one that
    began last. "(python)" when no range was open: the CPU was in plain Python between ops."""
    threads: dict[int, list[tuple[float, float, str]]] = {}
    for thread, start, end, name in cpu_events:
        threads.setdefault(thread, []).append((start, end, name))
    mids = sorted(((s + e) / 2, e - s) for s, e in gaps)
    found: list[list[tuple[float, str]]] = [[] for _ in mids]
    for events in threads.values():  # events of one thread nest, so a stack sweep finds the innermost open one
        events.sort()
        stack: list[tuple[float, float, str]] = []
        i = 0
        for k, (m, _) in enumerate(mids):
            while i < len(events) and events[i][0] <= m:
                while stack and stack[-1][1] < events[i][0]:
                    stack.pop()
                stack.append(events[i])
                i += 1
            while stack and stack[-1][1] < m:
                stack.pop()
            if stack:
                found[k].append((stack[-1][0], stack[-1][2]))
    out: dict[str, float] = {}
    for (_, length), open_ranges in zip(mids, found):
        name = max(open_ranges)[1] if open_ranges else "(python)"
        out[name] = out.get(name, 0.0) + length
    return out


# CPU ops that wait for the GPU: `.item()` and friends (_local_scalar_dense), a boolean index's size (nonzero), and
# the CUDA runtime's own waits (a nonzero shows under both names)
SYNC_OPS = (
    "aten::_local_scalar_dense",
    "aten::nonzero",
    "cudaStreamSynchronize",
    "cudaDeviceSynchronize",
    "cudaEventSynchronize",
)


# A Python frame as torch.profiler names it with with_stack: "path/to/file.py(123): function"
PYTHON_FRAME = re.compile(r"\.py\(\d+\): ")


def idle_by_python_frame(gaps: list[tuple[float, float]], cpu_events: list[tuple[int, float, float, str]]) -> dict:
    """GPU idle time (us) by the innermost Python function open at each gap's middle (with_stack profiles only; empty
    otherwise): the same sweep as idle_by_cpu_op over the Python frames alone, so builtins and aten ops inside a
    function count as that function."""
    frames = [event for event in cpu_events if PYTHON_FRAME.search(event[3])]
    return idle_by_cpu_op(gaps, frames) if frames else {}


def trace_idle_by_python_frame(trace: dict, steps: int) -> dict[str, float]:
    """idle_by_python_frame (ms a step, the 25 largest) over an exported Chrome trace: torch.profiler keeps a
    with_stack run's Python frames in its trace, not among prof.events(), so this reads the trace's kernels and
    frames."""
    events = trace["traceEvents"]
    kernels = [(e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") in ("kernel", "gpu_memset", "gpu_memcpy")]
    frames = [
        (e["tid"], e["ts"], e["ts"] + e["dur"], e["name"])
        for e in events
        if e.get("cat") == "python_function" and e.get("ph") == "X"
    ]
    idle = idle_by_python_frame(idle_gaps(kernels), frames)
    return {n[:160]: round(us / 1000 / steps, 2) for n, us in sorted(idle.items(), key=lambda kv: -kv[1])[:25]}


def syncs_per_step(cpu_names: list[str], steps: int) -> dict[str, float]:
    """How often each synchronizing op ran a step: every one empties the queue the CPU had built ahead of the GPU."""
    counts = {name: cpu_names.count(name) / steps for name in SYNC_OPS}
    return {name: round(n, 2) for name, n in counts.items() if n}


def summarize(prof, steps: int, wall_s: float) -> dict:
    """Per-step figures from the profiler's kernel events (CPU ops when there is no GPU, for a smoke run)."""
    from torch.autograd import DeviceType

    # Kernels and copies only: a GPU user annotation (the optimizer's "Optimizer.step#AdamW.step") spans kernels
    # that are counted on their own, and would count the gaps between them as busy.
    events = [e for e in prof.events() if e.device_type == DeviceType.CUDA and not e.is_user_annotation]
    on_gpu = bool(events)
    if not on_gpu:
        events = [e for e in prof.events() if e.device_type == DeviceType.CPU and e.name.startswith("aten::")]
    per_kind: dict[str, float] = {}
    per_name: dict[str, list[float]] = {}
    for e in events:
        us = e.time_range.end - e.time_range.start
        per_kind[kind_of(e.name)] = per_kind.get(kind_of(e.name), 0.0) + us
        per_name.setdefault(e.name, []).append(us)
    intervals = [(e.time_range.start, e.time_range.end) for e in events]
    busy = busy_time_us(intervals) if on_gpu else None
    idle = {}
    if on_gpu:
        cpu = [
            (e.thread, e.time_range.start, e.time_range.end, e.name)
            for e in prof.events()
            if e.device_type == DeviceType.CPU
        ]
        idle = idle_by_cpu_op(idle_gaps(intervals), cpu)
    step_ms = wall_s * 1000 / steps
    top = sorted(per_name.items(), key=lambda kv: -sum(kv[1]))[:30]
    return {
        "device": "cuda" if on_gpu else "cpu (aten ops, overlapping)",
        "steps_profiled": steps,
        "step_ms": round(step_ms, 2),
        "gpu_busy_ms_per_step": round(busy / 1000 / steps, 2) if busy is not None else None,
        "gpu_idle_share": round(1 - busy / 1000 / steps / step_ms, 4) if busy is not None else None,
        "kernel_ms_per_step": {
            k: round(v / 1000 / steps, 2) for k, v in sorted(per_kind.items(), key=lambda kv: -kv[1])
        },
        "kernel_share_of_step": {
            k: round(v / 1000 / steps / step_ms, 4) for k, v in sorted(per_kind.items(), key=lambda kv: -kv[1])
        },
        "syncs_per_step": syncs_per_step([e.name for e in prof.events() if e.device_type == DeviceType.CPU], steps),
        # where the GPU waited: by the CPU op in progress at each gap's middle, the 25 largest
        "gpu_idle_ms_per_step_by_cpu_op": {
            n[:160]: round(us / 1000 / steps, 2) for n, us in sorted(idle.items(), key=lambda kv: -kv[1])[:25]
        },
        "top_kernels": [
            {"name": n[:160], "kind": kind_of(n), "calls_per_step": len(t) / steps, "ms_per_step": sum(t) / 1e3 / steps}
            for n, t in top
        ],
    }


def profile_config(name: str, args) -> dict:
    import torch
    from transformers import TrainerCallback

    from tasks.train.stage import train

    overrides, _, _ = CONFIGS[name]
    steps = args.skip + args.active
    overrides_all = [*COMMON, f"train.logging_steps={LOGGING_STEPS}", f"train.max_steps={steps}", *overrides]
    overrides_all += args.overrides
    params = bench_params(args.bench, args.model_dir, overrides_all)
    os.chdir(workspace(args.bench, args.work / name, params))
    budget = params.train.memory_budget_gib
    if isinstance(budget, float) and torch.cuda.is_available():  # as train_throughput: behave as a card that size
        torch.cuda.set_per_process_memory_fraction(budget * 2**30 / torch.cuda.get_device_properties(0).total_memory)
    out: dict = {}

    def sync():
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    class Profile(TrainerCallback):
        """Profiles whole optimizer steps skip+1 .. skip+active, between synchronizations."""

        def __init__(self):
            self.prof = None
            self.start = 0.0
            self.tokens_at_start = 0

        def on_step_begin(self, a, state, control, **kw):
            if state.global_step == args.skip and self.prof is None:
                sync()
                acts = [torch.profiler.ProfilerActivity.CPU]
                if torch.cuda.is_available():
                    acts.append(torch.profiler.ProfilerActivity.CUDA)
                self.prof = torch.profiler.profile(activities=acts, with_stack=args.with_stack)
                self.prof.__enter__()
                self.start = time.perf_counter()
                self.tokens_at_start = state.num_input_tokens_seen

        def on_step_end(self, a, state, control, **kw):
            if self.prof is not None and state.global_step == args.skip + args.active:
                sync()
                wall = time.perf_counter() - self.start
                self.prof.__exit__(None, None, None)
                out.update(summarize(self.prof, args.active, wall))
                if args.trace or args.with_stack:  # the whole timeline, for chrome://tracing or Perfetto
                    raw = (args.trace or args.work / "trace.json.gz").with_suffix("")
                    self.prof.export_chrome_trace(str(raw))
                    if args.with_stack:  # by the innermost Python function in progress at each gap
                        trace = json.loads(raw.read_text())
                        out["gpu_idle_ms_per_step_by_python_frame"] = trace_idle_by_python_frame(trace, args.active)
                    if args.trace:
                        with open(raw, "rb") as src, gzip.open(args.trace, "wb") as dst:
                            shutil.copyfileobj(src, dst)
                    raw.unlink()
                out["tokens_per_step"] = (state.num_input_tokens_seen - self.tokens_at_start) / args.active
                self.prof = None

    profiler = Profile()
    clock = StepClock()
    metrics = train(params, extra_callbacks=[profiler, clock])
    return {
        "name": name,
        "overrides": overrides,
        "micro_batch": metrics["micro_batch"],
        "grad_accum": metrics["grad_accum"],
        "gradient_checkpointing": metrics["gradient_checkpointing"],
        "peak_allocated_gib": metrics["peak_memory_gib"],
        # every step's wall time and tokens (synchronized at each step's end), profiled ones marked: time against
        # tokens tells a fixed per-step cost (the CPU issuing kernels) from a per-token one
        "step_times": [
            {
                "step": i + 2,
                "seconds": round(seconds, 4),
                "tokens": tokens,
                "profiled": args.skip < i + 2 <= args.skip + args.active,
            }
            for i, (seconds, tokens) in enumerate(clock.timer.step_times())
        ],
        **out,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
    }


def main() -> None:
    ap = bench_arguments(__doc__)
    ap.add_argument("--config", required=True, choices=sorted(CONFIGS))
    ap.add_argument("--skip", type=int, default=4, help="warm-up steps before profiling")
    ap.add_argument("--active", type=int, default=3, help="steps profiled")
    ap.add_argument("--trace", type=Path, help="also save the profiled steps' timeline here (a .json.gz)")
    ap.add_argument(
        "--with-stack",
        action="store_true",
        help="record Python frames too, and attribute idle time to them (slower: for reading, not timing)",
    )
    args = ap.parse_args()
    args.work, args.out = args.work.resolve(), args.out.resolve()
    args.trace = args.trace.resolve() if args.trace else None
    if args.config == "plain_trl":
        raise SystemExit("profile_train profiles the stage's configurations; plain_trl is not the stage")
    from benchmarks.build_random_base import build_shape

    if not (args.model_dir / "config.json").exists():
        build_shape(args.model_dir, args.shape, Path(bench_params(args.bench, args.model_dir).model.tokenizer), None)
    result = profile_config(args.config, args)
    print(json.dumps({k: v for k, v in result.items() if k != "top_kernels"}, indent=1))
    for k in result.get("top_kernels", [])[:15]:
        print(f"{k['ms_per_step']:9.2f} ms  x{k['calls_per_step']:<6g} {k['kind']:14s} {k['name'][:90]}")
    save(args.out, result)


if __name__ == "__main__":
    main()
