"""Where the CPU stops running ahead of the GPU: lazy kernel loading and a full launch queue (needs CUDA; torch only).

The profile of the shipped 7B step (benchmarks/results/dequantized_auto_h100_de02df7/profile_ours_compile.trace.json.gz)
shows two kinds of host stall, each ending the CPU's lead over the GPU:
- a GEMM with a token count not seen before: cuBLAS picks a kernel not yet loaded, and CUDA's lazy module loading
  (its default) loads it then, for milliseconds, after the GPU's queue drains ("Lazy Function Loading" at the end of
  each such `aten::mm`);
- a launch that blocks until the GPU has drained its queue (bitsandbytes' 28th optimizer kernel of every step).

Each part runs in a fresh process (CUDA reads CUDA_MODULE_LOADING when it starts):
- `lazy`, `eager_before`, `eager_after`, `warmed`: the seconds to a CUDA context with cuBLAS ready, the GPU memory the
  process then holds outside PyTorch's allocator, and the host time of 7B-shaped GEMMs at new token counts, each
  issued behind 50 ms of queued GPU work (a launch that waits for the queue shows as about 50 ms), their outputs
  allocated beforehand. CUDA_MODULE_LOADING=LAZY, EAGER set before any CUDA call, EAGER set after
  torch.cuda.device_count(); `warmed` is LAZY after the train stage's train.gemm_warmup sweep over these shapes.
  A `_aligned` suffix takes token counts rounded to multiples of 8, `_grid` to multiples of 64 (the warm-up's grid,
  which the stage pads micro-batches onto).
- `queue`: 200 ms of GPU sleep queued, then small kernels launched one by one: at which launch the host first blocks,
  and for how long against the sleep still queued.

    python -m benchmarks.cuda_launch_stalls --out launch_stalls.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

# 7B GEMMs of a forward and backward (x @ W.T, then grad @ W): (in, out) features; M is the micro-batch's tokens
SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096), (4096, 32000), (4096, 64), (64, 4096)]
NEW_TOKEN_COUNTS = [2911, 3467, 4133, 4870, 5309, 5944, 6558, 7634]
ALIGNED_TOKEN_COUNTS = [2912, 3464, 4136, 4872, 5312, 5944, 6560, 7632]  # the same, rounded to multiples of 8
GRID_TOKEN_COUNTS = [2944, 3520, 4160, 4928, 5312, 5952, 6592, 7680]  # ... up to multiples of 64 (train.gemm_warmup)


_CYCLES_PER_MS: list[float] = []


PARTS = ("lazy", "warmed", "warmed_grid", "eager_before", "queue", "lazy", "warmed", "warmed_grid")


def _sleep_ms(torch, ms: float) -> None:
    """Queue about `ms` of GPU work without the host waiting (torch.cuda._sleep spins for cycles, measured once)."""
    if not _CYCLES_PER_MS:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.cuda._sleep(10**8)
        end.record()
        end.synchronize()
        _CYCLES_PER_MS.append(10**8 / start.elapsed_time(end))
    torch.cuda._sleep(int(ms * _CYCLES_PER_MS[0]))


def loading(mode: str) -> dict:
    suffix = mode[mode.rfind("_") :]
    counts = {"_aligned": ALIGNED_TOKEN_COUNTS, "_grid": GRID_TOKEN_COUNTS}.get(suffix, NEW_TOKEN_COUNTS)
    mode = mode.removesuffix("_aligned").removesuffix("_grid")
    if mode == "warmed":  # lazy, and the train stage's warm-up (train.gemm_warmup) over these shapes first
        os.environ["CUDA_MODULE_LOADING"] = "LAZY"
    if mode == "eager_before":
        os.environ["CUDA_MODULE_LOADING"] = "EAGER"
    elif mode == "lazy":
        os.environ["CUDA_MODULE_LOADING"] = "LAZY"
    import torch

    start = time.perf_counter()
    torch.cuda.device_count()
    if mode == "eager_after":
        os.environ["CUDA_MODULE_LOADING"] = "EAGER"
    a = torch.randn(64, 4096, device="cuda", dtype=torch.bfloat16)
    (a @ a.T).sum().item()  # context, allocator, cuBLAS handle
    ready_s = time.perf_counter() - start
    free, total = torch.cuda.mem_get_info()
    outside_allocator_mib = (total - free - torch.cuda.memory_reserved()) / 2**20
    like = {"device": "cuda", "dtype": torch.bfloat16}
    warmup = None
    if mode == "warmed":
        from tasks.train.gemm_warmup import warm_gemm_kernels

        warmup = warm_gemm_kernels([(k, n, True) for k, n in SHAPES], max(counts) + 512, torch.bfloat16)
    weights = {s: torch.randn(s[1], s[0], device="cuda", dtype=torch.bfloat16) for s in SHAPES}
    calls = []
    for m in counts:
        for (k, n), w in weights.items():
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            g = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
            # outputs allocated before the clock: a stall is the GEMM's, not the allocator growing
            outs = [torch.empty(m, n, **like), torch.empty(m, k, **like), torch.empty(n, k, **like)]
            torch.cuda.synchronize()
            for (name, a, b), out in zip((("forward", x, w.T), ("input_grad", g, w), ("weight_grad", g.T, x)), outs):
                _sleep_ms(torch, 50)
                t = time.perf_counter()
                torch.mm(a, b, out=out)
                calls.append({"tokens": m, "shape": [k, n], "gemm": name, "host_ms": (time.perf_counter() - t) * 1e3})
                torch.cuda.synchronize()
    host = sorted(c["host_ms"] for c in calls)
    return {
        "mode": mode,
        "CUDA_MODULE_LOADING": os.environ.get("CUDA_MODULE_LOADING"),
        "seconds_to_ready": round(ready_s, 2),
        "warmup": warmup,
        "gpu_mib_outside_allocator": round(outside_allocator_mib),
        "gemm_calls": len(calls),
        "gemm_host_ms_median": round(host[len(host) // 2], 3),
        "gemm_host_ms_max": round(host[-1], 2),
        "gemm_calls_over_1ms": sum(1 for h in host if h > 1),
        "gemm_calls_over_40ms": sum(1 for h in host if h > 40),
        "gemm_host_ms_total": round(sum(host), 1),
        "stalled": [c for c in calls if c["host_ms"] > 1],
    }


def queue() -> dict:
    import torch

    x = torch.zeros(16, device="cuda")
    x.add_(1)
    torch.cuda.synchronize()
    _sleep_ms(torch, 200)
    queued = time.perf_counter()
    launches = []
    for i in range(4000):
        t = time.perf_counter()
        x.add_(1)
        launches.append((i, (time.perf_counter() - t) * 1e3, (t - queued) * 1e3))
    torch.cuda.synchronize()
    blocked = [(i, ms, at) for i, ms, at in launches if ms > 1]
    first = blocked[0] if blocked else None
    return {
        "launches": len(launches),
        "first_blocking_launch": None if first is None else first[0],
        "first_block_ms": None if first is None else round(first[1], 2),
        "first_block_started_ms_after_sleep_queued": None if first is None else round(first[2], 2),
        "blocking_launches": len(blocked),
        "blocks": [(i, round(ms, 2)) for i, ms, _ in blocked[:10]],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--part", help=argparse.SUPPRESS)
    ap.add_argument("--parts", default=",".join(PARTS), help="which parts, in order (comma-separated)")
    args = ap.parse_args()
    if args.part:  # inside a fresh process
        result = queue() if args.part == "queue" else loading(args.part)
        print("RESULT " + json.dumps(result))
        return
    results = {}
    for part in args.parts.split(","):
        env = {k: v for k, v in os.environ.items() if k != "CUDA_MODULE_LOADING"}
        proc = subprocess.run(
            [sys.executable, "-m", "benchmarks.cuda_launch_stalls", "--out", str(args.out), "--part", part],
            capture_output=True,
            text=True,
            env=env,
        )
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        r = json.loads(line[7:]) if line else {"error": (proc.stderr or proc.stdout)[-2000:]}
        results.setdefault(part, []).append(r)
        print(part, json.dumps({k: v for k, v in r.items() if k != "stalled"}), flush=True)
    import torch

    results["gpu"] = torch.cuda.get_device_name(0)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
