"""train.compile: regional torch.compile of the decoder block, its on-disk cache, its cost, and `auto`'s decision.

One graph for every layer. Each decoder layer is compiled in place (nn.Module.compile): dynamo caches by code, and
the layers share their code, with parameters as graph inputs, so the block is traced and code-generated once and
every other layer reuses it. Two things made layers differ and recompile, found by counting graphs on the CPU
(tests/test_compilation.py): the first layer's input needs no gradient (the embeddings are frozen) while every other
layer's does, and a KV cache guarded on each layer's index (the Trainer turns use_cache off; the test keeps it off).
The first is closed here by asking for the embedding output's gradient (transformers' enable_input_require_grads):
one more small matmul chain in the first layer's backward, against a second compilation of the whole block.

The cache. Inductor's FX-graph and AOTAutograd caches (on by default) and Triton's kernels live under one folder,
paths.COMPILE_CACHE (or the TORCHINDUCTOR_CACHE_DIR a user set), in the workspace rather than /tmp: the next run of
the same configuration (a scheduled deployment, a resumed run, every DDP rank of this host) loads the compiled code
instead of generating it again. Dynamo's own tracing is not cached; that is the warm run's remaining cost.

`auto`. Compiling costs seconds at the first step and saves a share of every step after. `decide` weighs the two for
the planned run, from the tokens it will train on (known exactly before the base loads), a modelled eager speed
(this GPU's peak and the MFU measured for the eager recipe) and the measured compile cost, cold or warm (warm when
a compiled run of the same configuration finished here before). The reason goes to reports/training.json.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import TrainerCallback

from tasks.common import paths
from tasks.common.artifacts import read_json, write_json
from tasks.common.config import Params
from tasks.common.errors import PipelineError
from tasks.train.choice import Choice
from tasks.train.memory import ModelShape
from tasks.train.mfu import flops_per_token, peak_flops

log = logging.getLogger(__name__)

CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"  # inductor's own variable; Triton's cache goes inside it
COMPILED_RUNS = "compiled-runs.json"  # in the cache folder: the configurations a compiled run finished with

# The model behind `auto`, measured on one H100 80GB, 7B Llama-2 shape, 4-bit base, bf16, all in one invocation
# (benchmarks/results/compile_h100_c2f95d5/; docs/performance.md, "Compile"), before train.dequantized_base's
# auto kept the base dequantized on such a card; not re-measured that way:
EAGER_MFU = 0.26  # the recipe's epoch eager (batch 4): 25.7% and 26.7% MFU, 9,613 and 9,992 tokens/s
COMPILE_SPEEDUP = 1.18  # the same epoch compiled, warm: 11,774 against 9,992 tokens/s
# First-step overhead, one graph for all layers (batch 8): 9.41, 8.89 and 8.93 s with an empty cache (their mean);
# 2.59 s warm (the recipe's batch 4: 1.84 s; the larger is kept)
COMPILE_COST_COLD_S = 9.1
COMPILE_COST_WARM_S = 2.6


@dataclass(frozen=True)
class Decision(Choice):
    """train.compile resolved: a Choice, with auto's arithmetic where it weighed the run."""

    saving_s: float | None = None  # modelled seconds saved over the run (auto on a GPU with a known peak)
    cost_s: float | None = None  # modelled compile overhead
    cache_warm: bool | None = None


# The libraries whose Python code is traced into the compiled block, custom autograd.Functions included (bitsandbytes'
# 4-bit matmul): the cache folder is one per set of their versions, because AOTAutograd's cache key does not cover a
# custom Function's source (compile_settings), so an upgrade must not find the old entries.
TRACED_LIBRARIES = ("torch", "transformers", "peft", "bitsandbytes")


def library_key() -> str:
    import importlib.metadata as md

    versions = []
    for name in TRACED_LIBRARIES:
        try:
            versions.append(f"{name}={md.version(name)}")
        except md.PackageNotFoundError:
            versions.append(f"{name}=none")
    return hashlib.sha256(";".join(versions).encode()).hexdigest()[:12]


def use_cache_folder(folder: Path = paths.COMPILE_CACHE) -> Path:
    """Point inductor (and Triton inside it) at folder/<library versions>, unless the user chose a folder with
    TORCHINDUCTOR_CACHE_DIR. Set before the first compilation: inductor reads the variable when it first needs it."""
    os.environ.setdefault(CACHE_ENV, str((folder / library_key()).resolve()))
    return Path(os.environ[CACHE_ENV])


def compile_settings() -> dict:
    """Three settings of this process's torch.compile. The first two measured on the CPU (tiny 4-bit Llama, inductor,
    the first step's seconds, medians of 2; benchmarks/results/compile_settings_cpu.json): cold 21.5 -> 19.4 s, warm
    6.7 -> 3.2 s.
    - specialize_float: with dynamic shapes dynamo first traces Python floats (dropout p, LoRA scaling, eps) as
      symbols, then fails to turn them into tensors and restarts the whole analysis ("Restarting analysis due to
      _tensorify_python_scalars"); fixed floats from the start trace once. They are the same in every layer and
      step, so nothing recompiles.
    - autograd_cache_allow_custom_autograd_functions: without it AOTAutograd's cache is bypassed for any graph
      holding a custom autograd.Function (bitsandbytes' 4-bit matmul: "Unsupported call_function target
      autograd_function_apply"), so a warm run traced and partitioned the joint graph again. Safe here because the
      cache folder is per library versions (use_cache_folder).
    - use_duck_shape off: dynamo gives dimensions of equal size one symbol, so a first micro-batch of exactly
      hidden_size tokens (4096 on Llama-2-7B: four rows cut at 1024, the recipe's group_by_length puts them first)
      tied the token count to the weights' static size and every later length recompiled (seen on an H100,
      "size mismatch at index 1. expected 4096, actual 4066"; tests/test_compilation.py reproduces it).
    Not set: skip_fwd_side_effects_in_bwd_under_checkpoint. A layer the planner recomputes runs inside
    torch.utils.checkpoint, and its attention's forward (wrapped by the `kernels` package that transformers uses) sets
    and resets a context variable; dynamo refuses that side effect there, breaks the graph, and the recomputed layers
    run eagerly (the others stay compiled; the compile record counts the break). Skipping the side effect compiled them
    on the CPU (torch 2.13, eager's loss and gradients) but failed inductor's partitioner on an H100 with torch 2.11
    ("Node add_291 was invalid, but is output", a 16 GiB budget's first recomputing step:
    benchmarks/results/dequantized_auto_h100_de02df7/gib16.json), so the eager recomputation stays."""
    import torch._dynamo.config
    import torch._functorch.config
    import torch.fx.experimental._config

    settings = {}
    for module, name, value in (
        (torch._dynamo.config, "specialize_float", True),
        (torch._functorch.config, "autograd_cache_allow_custom_autograd_functions", True),
        (torch.fx.experimental._config, "use_duck_shape", False),
    ):
        if hasattr(module, name):  # a torch without one keeps its default
            setattr(module, name, value)
            settings[name] = value
    return settings


def configuration_key(params: Params, shape: ModelShape, device: str) -> str:
    """What the compiled block depends on: the libraries, the GPU, the layer's shape and every setting traced into
    it. Two runs with the same key reuse each other's cache entries."""
    import triton  # noqa: F401  (present wherever compile runs: inductor's GPU backend)

    t = params.train
    parts = {
        "torch": torch.__version__,
        "device": device,
        "shape": shape.__dict__,
        "lora": params.lora.model_dump(),
        "quant": params.quant.model_dump(),
        # what is compiled into the layers (Liger keeps out of them)
        "train": [t.precision, t.padding_free, t.dequantized_base, t.fp8_base],
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _compiled_before(folder: Path, key: str) -> bool:
    record = folder / COMPILED_RUNS
    return record.is_file() and key in read_json(record).get("keys", [])


def remember_compiled(folder: Path, key: str) -> None:
    """After a compiled run finished: the next run of this configuration finds the cache warm. Advisory only: a record
    that cannot be read or written (a full disk) costs the next run a cold estimate, never this run its adapter."""
    record = folder / COMPILED_RUNS
    try:
        keys = read_json(record).get("keys", []) if record.is_file() else []
        if key not in keys:
            write_json(record, {"keys": [*keys, key]})
    except (OSError, ValueError) as e:
        log.warning("train.compile: could not record the compiled configuration in %s (%s)", record, e)


def decide(params: Params, shape: ModelShape, planned_tokens: int, world_size: int = 1) -> Decision:
    """Whether this run compiles its decoder layers, and why."""
    setting = params.train.compile
    if setting is not True and setting is not False:  # auto
        return _auto(params, shape, planned_tokens, world_size)
    return Decision.pinned(setting, "train.compile")


def _auto(params: Params, shape: ModelShape, planned_tokens: int, world_size: int) -> Decision:
    def off(why: str) -> Decision:
        return Decision(on=False, setting="auto", reason=why)

    if not torch.cuda.is_available():
        return off("no CUDA GPU: inductor's Triton kernels need one")
    device = torch.cuda.get_device_name()
    peak = peak_flops(device)
    if peak is None:
        return off(f"no speed model for {device} (mfu.PEAK_BF16_FLOPS): set train.compile: true to compile anyway")
    try:
        key = configuration_key(params, shape, device)
    except ImportError:
        return off("Triton is not installed")
    return weigh(planned_tokens, shape, peak, _compiled_before(use_cache_folder(), key), world_size)


def weigh(planned_tokens: int, shape: ModelShape, peak: float, warm: bool, world_size: int = 1) -> Decision:
    """auto's arithmetic: the eager run's modelled seconds (each process trains on its share of the tokens at
    EAGER_MFU of the GPU's peak), the share compiling saves, against the cold or warm compile cost."""
    eager_seconds = planned_tokens / world_size * flops_per_token(shape) / (peak * EAGER_MFU)
    saving = eager_seconds * (1 - 1 / COMPILE_SPEEDUP)
    cost = COMPILE_COST_WARM_S if warm else COMPILE_COST_COLD_S
    on = saving > cost
    reason = (
        f"{planned_tokens:,} tokens, about {eager_seconds:.0f} s eager: compiling saves about {saving:.0f} s "
        f"against {cost:.0f} s to compile ({'warm' if warm else 'empty'} cache): {'on' if on else 'off'}"
    )
    return Decision(on=on, setting="auto", reason=reason, saving_s=round(saving, 1), cost_s=cost, cache_warm=warm)


def compile_failure(e: BaseException) -> bool:
    """Whether an exception came out of torch.compile (dynamo or inductor), whatever its type."""
    import traceback

    if isinstance(e, torch._dynamo.exc.TorchDynamoException):
        return True
    frames = traceback.extract_tb(e.__traceback__)
    return any("/torch/_dynamo/" in f.filename or "/torch/_inductor/" in f.filename for f in frames)


def decoder_layers(model) -> list:
    return [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]


def compile_layers(model, backend: str = "inductor") -> int:
    """Regional torch.compile: each decoder layer compiled in place (nn.Module.compile, so parameter names, the saved
    adapter and recomputation are unchanged), the embeddings, loss and optimizer eager; traced with dynamic shapes,
    since padding-free micro-batches vary in length. Every layer's input asks for its gradient, so all share one
    graph (module docstring). Compilation happens at the first step; a failure there stops the run (stage.fit)."""
    layers = decoder_layers(model)
    if not layers:
        raise PipelineError(
            f"train.compile: no decoder layers found in {type(model).__name__}; set train.compile: false"
        )
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    compile_settings()
    for layer in layers:
        layer.compile(dynamic=True, backend=backend)
    return len(layers)


def compiled_graphs() -> int:
    """Graphs dynamo has compiled in this process so far (each recompilation adds one)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def graph_breaks() -> int:
    """Graph breaks dynamo has met in this process so far (code it could not trace runs eagerly between graphs)."""
    from torch._dynamo.utils import counters

    return int(sum(counters["graph_break"].values()))


class CompileMeter(TrainerCallback):
    """What compiling cost: the first step's wall time (one synchronize, there only), the graphs compiled by then,
    and those compiled after it (recompilations: a new shape or setting the first trace did not cover)."""

    def __init__(self):
        self.first_step_start = self.first_step_seconds = None
        self.graphs_after_first_step = self.graphs_at_end = self.breaks_at_end = None
        self.cache_counters: dict = {}

    def on_step_begin(self, args, state, control, **kw):
        if self.first_step_start is None:
            self.first_step_start = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        if self.first_step_seconds is None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.first_step_seconds = time.perf_counter() - self.first_step_start
            self.graphs_after_first_step = compiled_graphs()

    def on_train_end(self, args, state, control, **kw):
        from torch._dynamo.utils import compile_times, counters

        self.graphs_at_end = compiled_graphs()
        self.breaks_at_end = graph_breaks()
        # whether inductor's and AOTAutograd's caches were hit (a warm run) and where compile time went
        self.cache_counters = {
            f"{group}.{k}": v
            for group in ("inductor", "aot_autograd")
            for k, v in counters[group].items()
            if "cache" in k
        }
        if self.graphs_at_end:
            log.info("torch.compile times:\n%s", compile_times(repr="str"))

    def report(self, steady_step_seconds: list[float]) -> dict:
        """The figures for reports/training.json: the first step's overhead over a steady step (the median of the
        later ones), graphs, and recompilations after the first step."""
        if self.first_step_seconds is None:
            return {}
        steady = statistics.median(steady_step_seconds) if steady_step_seconds else None
        return {
            "first_step_seconds": round(self.first_step_seconds, 2),
            "first_step_overhead_seconds": None if steady is None else round(self.first_step_seconds - steady, 2),
            "graphs": self.graphs_at_end,
            "recompilations_after_first_step": self.graphs_at_end - self.graphs_after_first_step,
            "graph_breaks": self.breaks_at_end,  # each one leaves code outside the graphs, run eagerly
            **({"cache": self.cache_counters} if self.cache_counters else {}),
        }
