"""Preflight of the train stage: settings that cannot run on this machine fail here, before the base loads.

Two kinds of check. Packages: each enabled lever's package must import, and on a GPU must run a tiny kernel
(a wrong CUDA build of bitsandbytes or Triton fails here in a second, not after minutes of loading a 7B base).
Hardware: GPU-only settings on the CPU, bf16 on a GPU without it, process counts against visible GPUs.
"""

from __future__ import annotations

import importlib

import torch

from tasks.common.base_model import load_config
from tasks.common.config import Params
from tasks.common.errors import PipelineError
from tasks.train import attention as attention_impl
from tasks.train import distributed

# What installs each lever's package, in the words a user types (the `gpu` extra is in pyproject.toml).
INSTALL_GPU_EXTRA = "pip install -e '.[gpu]' (or re-run `make install`, which adds it with a CUDA torch)"
INSTALL_BASE = "pip install -e . (or `make install`)"


def _gpu_smoke(module: str) -> None:
    """Run one tiny kernel of `module` on the GPU: proof the installed build works on this card."""
    x = torch.randn(64, 64, device="cuda", dtype=torch.bfloat16)
    if module == "bitsandbytes":
        import bitsandbytes.functional as bnbf

        packed, state = bnbf.quantize_4bit(x, quant_type="nf4")
        torch.testing.assert_close(bnbf.dequantize_4bit(packed, state), x, atol=0.5, rtol=0.3)
    elif module == "liger_kernel":
        from liger_kernel.transformers import LigerRMSNorm

        LigerRMSNorm(64).to("cuda", torch.bfloat16)(x)
    torch.cuda.synchronize()


def lever_packages(params: Params, on_gpu: bool) -> dict[str, tuple[str, str]]:
    """The packages the enabled levers need: import name -> (the setting that needs it, how to install it). Off a
    GPU, Liger's package is not asked for: hardware_problems says the setting needs a GPU, and telling a CPU box to
    install the GPU extra would not help."""
    t, needed = params.train, {}
    if params.quant.load_in_4bit:
        needed["bitsandbytes"] = ("quant.load_in_4bit", INSTALL_BASE)
    elif "paged" in t.optimizer or "8bit" in t.optimizer:
        needed["bitsandbytes"] = (f"train.optimizer={t.optimizer}", INSTALL_BASE)
    if t.liger_kernels and on_gpu:
        needed["liger_kernel"] = ("train.liger_kernels", INSTALL_GPU_EXTRA)
    return needed


def package_problems(params: Params, on_gpu: bool | None = None) -> list[str]:
    """What the enabled levers' packages lack here; on_gpu: check as on a GPU machine (default: whether this is one)."""
    problems = []
    on_gpu = torch.cuda.is_available() if on_gpu is None else on_gpu
    for module, (setting, install) in lever_packages(params, on_gpu).items():
        try:
            importlib.import_module(module)
            if torch.cuda.is_available():
                _gpu_smoke(module)
        except ImportError as e:
            problems.append(
                f"{setting} needs the package {module.replace('_', '-')}, which does not import ({e}): {install}"
            )
        except Exception as e:  # imports, but its kernels fail on this GPU: a build for another CUDA, say
            problems.append(
                f"{setting}: {module} imports but its kernel failed on this GPU "
                f"({type(e).__name__}: {str(e)[:300]}); reinstall it for this CUDA "
                f"({torch.version.cuda}) or turn the setting off"
            )
    return problems


def liger_architecture_problem(model_type: str, patched: set[str] | frozenset[str]) -> str | None:
    """Liger patches a fixed list of architectures (Llama, Qwen2, Mistral and others); on any other base trl would
    train without its kernels, silently, and the memory planner would count on Liger's smaller SwiGLU activations."""
    if model_type in patched:
        return None
    return (
        f"train.liger_kernels: Liger has no kernels for this base's architecture ({model_type}); set "
        "train.liger_kernels=false"
    )


def _liger_problems(params: Params) -> list[str]:
    if not (params.train.liger_kernels and torch.cuda.is_available()):
        return []  # on the CPU hardware_problems refuses the setting outright
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except ImportError:
        return []  # package_problems says how to install it
    problem = liger_architecture_problem(load_config(params.model).model_type, frozenset(MODEL_TYPE_TO_APPLY_LIGER_FN))
    return [problem] if problem else []


def hardware_problems(params: Params) -> list[str]:
    t, cuda = params.train, torch.cuda.is_available()
    problems = []
    if not cuda and t.optimizer.startswith("paged"):
        problems.append(f"train.optimizer={t.optimizer} needs a CUDA GPU (use adamw_torch on the CPU)")
    if not cuda and t.liger_kernels:
        problems.append("train.liger_kernels needs a CUDA GPU (set it to false on the CPU)")
    if not cuda and t.compile is True:  # auto decides off without a GPU
        problems.append(
            "train.compile needs a CUDA GPU (inductor's Triton kernels; set it to auto or false on the CPU)"
        )
    if t.dequantized_base is True and not params.quant.load_in_4bit:
        problems.append("train.dequantized_base keeps a 4-bit base dequantized; quant.load_in_4bit is false")
    if t.dequantized_base is True and t.distributed.mode != "single":
        problems.append(
            f"train.dequantized_base runs on one GPU only (train.distributed.mode={t.distributed.mode}: DDP would "
            "broadcast the dequantized weights every step, FSDP exists to save that memory): set it to auto or false"
        )
    if t.fp8_base:
        from tasks.train.fp8_base import fp8_unavailable_reason

        if t.dequantized_base is True:
            problems.append("train.fp8_base and train.dequantized_base both replace the 4-bit base: set one of them")
        if not params.quant.load_in_4bit:
            problems.append("train.fp8_base builds its float8 weights from the 4-bit base; quant.load_in_4bit is false")
        if t.distributed.mode != "single":
            problems.append(
                f"train.fp8_base runs on one GPU only (train.distributed.mode={t.distributed.mode}): set it to false"
            )
        if why := fp8_unavailable_reason():
            problems.append(why)
    if not cuda and t.precision == "fp16":
        problems.append("train.precision=fp16 needs a CUDA GPU (use fp32 on the CPU)")
    if cuda and t.precision == "bf16" and not torch.cuda.is_bf16_supported():
        problems.append("this GPU has no bf16: set train.precision=fp16 and quant.compute_dtype=float16")
    if t.padding_free and (why := attention_impl.unavailable_reason()):
        problems.append(why)
    d = t.distributed
    if d.mode == "fsdp" and not cuda:
        problems.append(
            "train.distributed.mode=fsdp (FSDP-QLoRA) needs CUDA GPUs: it shards bitsandbytes 4-bit "
            "weights across GPUs (use mode ddp to run several processes on the CPU)"
        )
    if d.mode == "single" and cuda and torch.cuda.device_count() > 1 and not distributed.is_worker():
        # `python -m tasks.train` restarts itself on one GPU; this is for callers of train() in-process.
        problems.append(
            f"{torch.cuda.device_count()} GPUs are visible to this one process: set CUDA_VISIBLE_DEVICES "
            "to one GPU, or train.distributed.mode=ddp with num_processes to use them all"
        )
    if d.mode != "single" and cuda and d.num_processes > torch.cuda.device_count():
        problems.append(
            f"train.distributed.num_processes={d.num_processes} but {torch.cuda.device_count()} GPU(s) "
            "are visible (one process per GPU)"
        )
    return problems


def preflight(params: Params) -> None:
    """Raise one PipelineError listing every problem, before anything is loaded."""
    problems = package_problems(params) + hardware_problems(params)
    if not problems:  # the base's config is read only once its packages and hardware are known good
        problems = _liger_problems(params)
    if problems:
        raise PipelineError("this configuration cannot run here: " + "; ".join(problems) + ".")
