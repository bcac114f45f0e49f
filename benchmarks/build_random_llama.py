"""Build a Llama-2-7B-shaped checkpoint with random weights, plus the real Llama-2 tokenizer.

No Llama weights can be downloaded here; a model with Llama-2-7b-chat-hf's config.json values and
random weights has the real recipe's speed and memory. Run once per GPU machine (~20-60 s):

    python -m benchmarks.build_random_llama --out /tmp/llama-2-7b-random --tokenizer .bench/llama-2-tokenizer
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from benchmarks.model_shapes import LLAMA2_7B_CHAT, SHAPES


def build(out: Path, tokenizer_dir: Path, shape: dict = LLAMA2_7B_CHAT, seed: int = 0) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    from tasks.common.base_model import load_tokenizer
    from tasks.common.chat_template import LLAMA2_JINJA
    from tasks.common.config import ModelParams

    if (out / "config.json").exists():
        print(f"{out} exists; not rebuilding")
        return out
    start = time.perf_counter()
    torch.manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**shape))
    torch.set_default_dtype(torch.float32)
    model.save_pretrained(out, max_shard_size="5GB")
    tok = load_tokenizer(ModelParams(base=str(out), revision=None, tokenizer=str(tokenizer_dir), max_length=4096))
    tok.chat_template = LLAMA2_JINJA
    tok.save_pretrained(out)
    del model
    print(
        f"built {out} ({sum(f.stat().st_size for f in out.iterdir()) / 2**30:.1f} GiB) "
        f"in {time.perf_counter() - start:.0f} s"
    )
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tokenizer", type=Path, required=True, help="directory with Llama-2's tokenizer.model")
    ap.add_argument("--shape", choices=SHAPES, default="llama2-7b")
    args = ap.parse_args()
    build(args.out, args.tokenizer, SHAPES[args.shape])
