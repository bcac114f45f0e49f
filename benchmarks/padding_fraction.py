"""Padding in batches of 8 with and without length grouping, on the CPU (issue 11's "1.5x").

The configuration `hf_gc` pads each micro-batch to its longest row with random sampling; plain trl (and every
`ours_*` configuration) samples with group_by_length. This counts, on the real rows and the real tokenizer, the
share of padded positions in batches of 8 both ways: over the whole epoch and over the first 40 steps (what the
throughput benchmark times), with the Trainer's own samplers (RandomSampler's permutation, LengthGroupedSampler).

    python -m benchmarks.padding_fraction --data .gpu/data/train.parquet --tokenizer ../shared/data/llama-2-tokenizer
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from benchmarks.common import save


def padding(lengths: list[int], order: list[int], batch: int, steps: int | None) -> dict:
    batches = [order[i : i + batch] for i in range(0, len(order) - batch + 1, batch)][:steps]
    real = sum(lengths[i] for b in batches for i in b)
    padded = sum(batch * max(lengths[i] for i in b) for b in batches)
    return {"padding_share": round(1 - real / padded, 4), "real_tokens_per_batch": round(real / len(batches), 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="guanaco-llama2-1k train.parquet (its `text` column)")
    ap.add_argument("--tokenizer", type=Path, required=True)
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/padding_fraction_cpu.json"))
    args = ap.parse_args()

    import pandas as pd
    import torch
    from transformers import AutoTokenizer
    from transformers.trainer_pt_utils import LengthGroupedSampler

    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    texts = pd.read_parquet(args.data)["text"].tolist()
    lengths = [min(len(tok(t)["input_ids"]), args.max_length) for t in texts]
    result = {"rows": len(lengths), "mean_tokens": round(statistics.mean(lengths), 1), "seeds": {}}
    for seed in (42, 0, 1):
        g = torch.Generator().manual_seed(seed)
        random_order = torch.randperm(len(lengths), generator=g).tolist()
        grouped = list(LengthGroupedSampler(args.batch, lengths=lengths, generator=torch.Generator().manual_seed(seed)))
        result["seeds"][seed] = {
            f"{name}_{span}": padding(lengths, order, args.batch, steps)
            for name, order in (("random", random_order), ("grouped", grouped))
            for span, steps in (("epoch", None), ("first_40_steps", 40))
        }
    for seed, r in result["seeds"].items():
        print(seed, {k: v["padding_share"] for k, v in r.items()})
    save(args.out, result)


if __name__ == "__main__":
    main()
