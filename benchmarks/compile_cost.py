"""What train.compile's first step costs, cold and warm, with torch's defaults and with the stage's compile settings.

Each measurement is its own process (a fresh dynamo, the on-disk caches only): a 4-layer Llama with LoRA on q/v, its
base in bitsandbytes 4-bit NF4 (on a GPU, optionally the 7B shape: --model-dir), decoder layers compiled as the train
stage compiles them (tasks/train/compilation.compile_layers), one forward and backward timed. `defaults` turns the
stage's compile_settings() off; `stage` keeps them. Each setting gets an empty cache folder, then runs cold (the
folder empty) and warm (the folder as the cold run left it); settings take turns, repeated, and each figure is the
median. Printed and saved: seconds of the first step, and the AOTAutograd and inductor cache counters.

    python -m benchmarks.compile_cost --out benchmarks/results/compile_settings_cpu.json [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SETTINGS = ("defaults", "stage")


# Four decoder layers: tiny, or of Llama-2-7B's shape (the compiled block is one graph whatever the layer count, so
# four layers cost what 32 do to compile)
SHAPES = {
    "tiny": dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2, vocab_size=1024),
    "llama2-7b": dict(
        hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32, vocab_size=32000
    ),
}


def build_base(out: Path, shape: str) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(num_hidden_layers=4, use_cache=False, **SHAPES[shape])
    LlamaForCausalLM(config).save_pretrained(out)
    return out


def measure(model_dir: Path, setting: str) -> dict:
    """Inside the measuring process: load, compile the layers, time one forward and backward."""
    import torch
    from peft import LoraConfig, get_peft_model
    from torch._dynamo.utils import counters
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from tasks.train import compilation

    if setting == "defaults":
        compilation.compile_settings = dict  # torch's own settings: nothing changed
    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, quantization_config=quant, dtype=dtype, device_map={"": 0} if cuda else None
    )
    lora = LoraConfig(r=64, lora_alpha=16, lora_dropout=0.1, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    model.train()
    compilation.compile_layers(model)
    ids = torch.randint(0, model.config.vocab_size, (1, 512), device=model.device)
    start = time.perf_counter()
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    caches = {f"{g}.{k}": v for g in ("aot_autograd", "inductor") for k, v in counters[g].items() if "cache" in k}
    return {"seconds": round(seconds, 2), "graphs": compilation.compiled_graphs(), "caches": caches}


def run(model_dir: Path, setting: str, cache: Path) -> dict:
    env = {**__import__("os").environ, "TORCHINDUCTOR_CACHE_DIR": str(cache)}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.compile_cost", "--measure", setting, "--model-dir", str(model_dir)],
        capture_output=True,
        text=True,
        env=env,
    )
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        return {"error": (proc.stderr or proc.stdout)[-2000:]}
    return json.loads(line[7:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--model-dir", type=Path, help="a base to compile (default: a 4-layer Llama built here)")
    ap.add_argument("--shape", choices=SHAPES, default="tiny", help="the built base's layer shape")
    ap.add_argument("--measure", choices=SETTINGS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        print("RESULT " + json.dumps(measure(args.model_dir, args.measure)))
        return
    if args.out is None:
        ap.error("--out is required")
    scratch = Path(tempfile.mkdtemp(prefix="compile-cost-"))
    model_dir = args.model_dir or build_base(scratch / "base", args.shape)
    runs: dict[str, dict[str, list]] = {s: {"cold": [], "warm": []} for s in SETTINGS}
    for rep in range(args.repeats):
        for setting in SETTINGS:
            cache = scratch / f"cache-{setting}-{rep}"
            for state in ("cold", "warm"):
                r = run(model_dir, setting, cache)
                runs[setting][state].append(r)
                print(
                    f"{setting:8s} {state} run {rep + 1}: {r.get('seconds')} s  graphs {r.get('graphs')}  "
                    f"{r.get('caches') or r.get('error')}",
                    flush=True,
                )
            shutil.rmtree(cache, ignore_errors=True)
    import torch

    medians = {
        s: {
            state: statistics.median(r["seconds"] for r in rs)
            for state, rs in states.items()
            if rs and all("seconds" in r for r in rs)
        }
        for s, states in runs.items()
    }
    print(json.dumps(medians))
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"device": device, "torch": torch.__version__, "medians_seconds": medians, "runs": runs}, indent=2)
        + "\n"
    )
    shutil.rmtree(scratch, ignore_errors=True)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
