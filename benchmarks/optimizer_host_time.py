"""How much host time bitsandbytes' 32-bit optimizer step spends around its own op, per step of LoRA's parameters.

The 7B recipe's step updates 128 LoRA tensors, one bitsandbytes op each; a GPU profile put 8.5 ms a step (with the
profiler's Python tracing) in that loop. This times, on whatever device is there, the step as the train stage runs it
(bitsandbytes' AdamW32bit with train.sync_free_step's synchronize-free step) against the same op called directly for
each parameter with its arguments prepared: the difference is what a leaner loop could save. Small parameters, so
that the host's work, not the kernels', is what is timed.

    python -m benchmarks.optimizer_host_time --out benchmarks/results/optimizer_host_time_cpu.json
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch

from benchmarks.common import save

PARAMETERS = 128  # LoRA's A and B on q_proj and v_proj of 32 decoder layers
REPEATS = 5


def _time(fn, steps: int) -> float:
    """Milliseconds a call, over `steps` calls, after five to warm up (the device synchronized around them)."""
    for _ in range(5):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps * 1e3


def measure(steps: int = 50) -> dict:
    import bitsandbytes as bnb

    from tasks.train.step_overlap import drop_optimizer_syncs

    device = "cuda" if torch.cuda.is_available() else "cpu"
    params = [torch.nn.Parameter(torch.randn(8, 8, device=device)) for _ in range(PARAMETERS)]
    optimizer = bnb.optim.AdamW32bit(params, lr=2e-4, weight_decay=0.001)
    drop_optimizer_syncs(optimizer)
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer.step()  # the optimizer's state exists from here
    states = [optimizer.state[p] for p in params]

    def op_alone():
        for p, state in zip(params, states):
            torch.ops.bitsandbytes.optimizer_update_32bit(
                "adam", p.grad, p, state["state1"], state["state2"], None, 0.0, 0.0,
                0.9, 0.999, 0.0, 0.0, 1e-8, 0.001, 6, 2e-4, 1.0, False,
            )  # fmt: skip

    turns = [(_time(optimizer.step, steps), _time(op_alone, steps)) for _ in range(REPEATS)]  # interleaved
    step_ms = statistics.median(t[0] for t in turns)
    op_ms = statistics.median(t[1] for t in turns)
    return {
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        "parameters": PARAMETERS,
        "steps_per_turn": steps,
        "turns": [{"bitsandbytes_step_ms": round(a, 3), "op_alone_ms": round(b, 3)} for a, b in turns],
        "bitsandbytes_step_ms": round(step_ms, 3),
        "op_alone_ms": round(op_ms, 3),
        "python_around_the_op_ms": round(step_ms - op_ms, 3),
        "bitsandbytes": bnb.__version__,
        "torch": torch.__version__,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=50)
    args = ap.parse_args()
    result = measure(args.steps)
    save(args.out, result)
    print(
        f"{result['parameters']} parameters on {result['device']}: bitsandbytes' step {result['bitsandbytes_step_ms']} "
        f"ms, its op alone {result['op_alone_ms']} ms, the Python around it {result['python_around_the_op_ms']} ms "
        f"(medians of {REPEATS} interleaved turns of {result['steps_per_turn']} steps)"
    )


if __name__ == "__main__":
    main()
