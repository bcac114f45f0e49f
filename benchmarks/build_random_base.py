"""Build a base of a real shape with random weights: Llama-2-7B (with the real Llama-2 tokenizer), Llama-3.1-8B,
Qwen2.5-7B or Mistral-7B-v0.3 (benchmarks/model_shapes.py: each one's config.json values).

No weights can be downloaded here; a model with the real config and random weights has the real recipe's speed and
memory. The other families' tokenizers cannot be had either: each gets one of its own kind (byte-level BPE for
Llama-3 and Qwen, SentencePiece BPE for Mistral) learned from the 1k real rows with 32,000 pieces, carrying the
family's special tokens and chat template (tasks/common/tiny_families.py), so rows split into about as many tokens
as a real tokenizer makes of this English text; the model keeps the real vocabulary size (embedding and logits
memory and time are the real ones). Run once per GPU machine (~30-90 s):

    python -m benchmarks.build_random_base --out /tmp/llama-2-7b-random --tokenizer .bench/llama-2-tokenizer
    python -m benchmarks.build_random_base --out /tmp/llama-3-8b-random --shape llama3-8b --data train.parquet
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from benchmarks.model_shapes import LLAMA2_7B_CHAT, SHAPES, family_of

FAMILY_VOCAB = 32000  # pieces learned for a family's stand-in tokenizer (Llama-2's count)


def _llama2_tokenizer(out: Path, tokenizer_dir: Path):
    from tasks.common.base_model import load_tokenizer
    from tasks.common.chat_template import LLAMA2_JINJA
    from tasks.common.config import ModelParams

    tok = load_tokenizer(ModelParams(base=str(out), revision=None, tokenizer=str(tokenizer_dir), max_length=4096))
    tok.chat_template = LLAMA2_JINJA
    tok.save_pretrained(out)
    return tok


def _family_tokenizer(out: Path, family: str, data: Path):
    import pandas as pd

    from tasks.common.tiny_families import FAMILIES, family_tokenizer, rendered

    rows = pd.read_parquet(data).to_dict("records")
    return family_tokenizer(family, out, rendered(FAMILIES[family].template, rows), FAMILY_VOCAB)


def build(
    out: Path,
    tokenizer_dir: Path | None = None,
    shape: dict = LLAMA2_7B_CHAT,
    seed: int = 0,
    family: str | None = None,
    data: Path | None = None,
) -> Path:
    """The random base of `shape` in `out` with Llama-2's tokenizer from `tokenizer_dir`, or with family `family`'s
    tokenizer learned from the rows of `data` (a parquet with a `text` column)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if (out / "config.json").exists():
        print(f"{out} exists; not rebuilding")
        return out
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    tok = _family_tokenizer(out, family, data) if family else _llama2_tokenizer(out, tokenizer_dir)
    fields = dict(shape)
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    if family:  # the family's own bos/eos/pad ids in the stand-in tokenizer
        config.bos_token_id, config.eos_token_id, config.pad_token_id = (
            tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
        )  # fmt: skip
    assert len(tok) <= config.vocab_size, (len(tok), config.vocab_size)
    torch.manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config)
    torch.set_default_dtype(torch.float32)
    model.save_pretrained(out, max_shard_size="5GB")
    del model
    print(
        f"built {out} ({type(config).__name__}, {sum(f.stat().st_size for f in out.iterdir()) / 2**30:.1f} GiB, "
        f"tokenizer {len(tok)} pieces) in {time.perf_counter() - start:.0f} s"
    )
    return out


def build_shape(out: Path, shape_name: str, tokenizer_dir: Path | None, data: Path | None) -> Path:
    family = family_of(shape_name)
    if family and data is None:
        raise SystemExit(f"--shape {shape_name} learns its tokenizer from the rows: give --data <train.parquet>")
    return build(out, tokenizer_dir, SHAPES[shape_name], family=family, data=data)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tokenizer", type=Path, help="directory with Llama-2's tokenizer.model (Llama-2 shapes)")
    ap.add_argument("--data", type=Path, help="the guanaco-llama2-1k parquet (the other families' tokenizers)")
    ap.add_argument("--shape", choices=SHAPES, default="llama2-7b")
    args = ap.parse_args()
    build_shape(args.out, args.shape, args.tokenizer, args.data)
