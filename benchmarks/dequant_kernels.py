"""NF4 dequantization of one Llama-2-7B MLP weight (11008 x 4096) to bf16: bitsandbytes' CUDA kernel against
torch.compile'd tensor formulations. Can inductor's kernel match bitsandbytes'? It could not, so the lever that
compiled the dequantization into the decoder layers (575579c, train.compiled_dequant) was dropped; the record is in
docs/performance.md. Prints the median microseconds of each over 200 calls (CUDA events) and whether each gives
bitsandbytes' values; `python benchmarks/dequant_kernels.py [out.json]` on a CUDA machine."""

from __future__ import annotations

import json
import statistics
import sys

import torch


def main() -> None:
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnb_functional

    torch.manual_seed(0)
    weight = (torch.randn(11008, 4096, device="cuda") * 0.02).to(torch.bfloat16)
    p = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4", compress_statistics=False)._quantize("cuda")
    state, packed = p.quant_state, p.data
    absmax, code, bs, shape = state.absmax.float(), state.code.float(), state.blocksize, tuple(state.shape)
    pair_lut = torch.stack((code.repeat_interleave(16), code.repeat(16)), dim=-1).contiguous()  # byte -> (hi, lo)

    def stacked(packed, absmax, code):
        flat = packed.reshape(-1)
        codes = torch.stack((flat >> 4, flat & 0xF), dim=-1).reshape(-1)
        return (code[codes.to(torch.int32)].view(-1, bs) * absmax.view(-1, 1)).view(shape).to(torch.bfloat16)

    def pairs(packed, absmax, lut):
        values = lut[packed.reshape(-1).to(torch.int32)]  # [n/2, 2]
        return (values.view(-1, bs) * absmax.view(-1, 1)).view(shape).to(torch.bfloat16)

    def halves(packed, absmax, code):
        flat = packed.reshape(-1, bs // 2)
        hi, lo = code[(flat >> 4).to(torch.int32)], code[(flat & 0xF).to(torch.int32)]
        scale = absmax.view(-1, 1)
        return torch.stack((hi * scale, lo * scale), dim=-1).view(shape).to(torch.bfloat16)

    candidates = {
        "bitsandbytes": lambda: bnb_functional.dequantize_4bit(packed, state).to(torch.bfloat16),
        "stacked_compiled": (lambda f: lambda: f(packed, absmax, code))(torch.compile(stacked)),
        "pair_lut_compiled": (lambda f: lambda: f(packed, absmax, pair_lut))(torch.compile(pairs)),
        "halves_compiled": (lambda f: lambda: f(packed, absmax, code))(torch.compile(halves)),
    }
    expected = candidates["bitsandbytes"]()
    results = {}
    for name, fn in candidates.items():
        same = torch.equal(fn(), expected)
        for _ in range(10):
            fn()
        times = []
        for _ in range(200):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) * 1000)
        us = statistics.median(times)
        gbps = (packed.numel() + absmax.numel() * 4 + expected.numel() * 2) / us / 1e3
        results[name] = {"median_us": round(us, 1), "gb_per_s": round(gbps), "bitsandbytes_values": same}
        print(f"{name:20s} {us:8.1f} us  {gbps:6.0f} GB/s  same values: {same}", flush=True)
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "results": results}, f)


if __name__ == "__main__":
    main()
