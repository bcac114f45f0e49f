"""Memory planner: predict peak GPU memory of a QLoRA run from its config, before loading anything.

Peak allocated memory = 4-bit base weights + unquantized weights (embeddings, lm_head, norms)
+ LoRA params, grads and optimizer state + activations of one micro-batch (trl's fused LM head keeps
the logits to chunks, so they add nothing measurable).
Activation bytes per token per layer come from the tensors autograd keeps in a Llama decoder layer
(norms, LoRA dropout inputs, RoPE'd q/k, SDPA inputs/outputs, the SwiGLU MLP); with gradient
checkpointing only each recomputed layer's input is kept, plus one layer recomputed at a time; the other
layers keep all of theirs. The constants
were fitted on one H100 run and checked on other configurations in another (README, Performance).

Given train.memory_budget_gib (GiB, or auto: the visible GPU's memory), `plan()` keeps the math (the
effective batch batch_size x grad_accum, hence the same optimizer steps on the same rows in the same
order) and picks the fastest layout that fits: no recomputation when it fits at the configured
micro-batch, else recomputation of as few decoder layers as fit at that micro-batch (each layer left out
saves its share of the recompute), else recomputation of every layer at the largest micro-batch that
fits; or says what to change when nothing does. That layout fits the worst case, every row max_length long;
under auto with train.adaptive_recompute, each padding-free micro-batch then recomputes only as many layers as its
own token count needs (recompute_thresholds). train.gradient_checkpointing true/false pins
recomputation (true: every layer); auto leaves it to the planner (off when there is no budget to plan
for, as on the CPU).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from tasks.common.config import Params
from tasks.common.errors import PipelineError

GIB = 2**30
# Bytes kept for backward, per token per decoder layer, as multiples of the hidden (h) and intermediate
# (i) sizes, for 2-byte activations. Fitted to torch.cuda.max_memory_allocated of six configurations of
# the 7B recipe on an H100 (benchmarks/results/throughput_h100_run1.json: 0.7k to 16k tokens a
# micro-batch, with and without recomputation and Liger): slope 4.88 MiB/token without Liger and
# 3.63 MiB/token with it, intercept = weights + LoRA state.
ACT_PER_H = 17.5  # norms, q/k/v/o inputs and outputs, RoPE, attention, LoRA dropout inputs
ACT_PER_I = 8.0  # SwiGLU: gate, up, activation, product
ACT_PER_I_LIGER = 4.0  # Liger's fused SwiGLU keeps only gate and up
# train.compile: inductor's partitioner keeps fewer tensors for the backward (it recomputes cheap elementwise ops
# there), so a compiled decoder layer keeps this share of the eager fit. H200, 7B recipe at batch 8 without Liger
# (benchmarks/results/vs_plain_trl_deq_h200.json, 8,192-token micro-batch): 29.22 GiB of activations measured against
# 38.99 predicted with no recomputation (0.749), 7.53 against 10.16 with 26 of 32 layers recomputed (0.741).
COMPILED_ACTIVATION_SHARE = 0.75
WORKSPACE_GIB = 0.0  # trl's fused LM head keeps only chunks of logits; no other term showed in the fit
# auto budget: the share of the GPU's memory the planner may fill. The rest covers the CUDA context, the
# allocator's reserved-but-free blocks and the gap between the fit and a given run (measured within 6%).
AUTO_BUDGET_SHARE = 0.85
# A layout that recomputes only some layers fills the budget with kept activations, where the fit is least sure
# (it under-predicted no recomputation by 2.5% on an H200): those must fit with this much to spare.
PARTIAL_RECOMPUTE_MARGIN = 0.10


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied_embeddings: bool = False  # one matrix for the input embedding and the LM head (small Qwen models)

    @classmethod
    def from_config(cls, cfg) -> ModelShape:
        """The shape from the model's own config, whatever its family: grouped-query k/v heads, the vocabulary
        (32k Llama-2, 128k Llama-3, 152k Qwen2.5) and whether the LM head shares the embedding's weights."""
        return cls(
            cfg.hidden_size,
            cfg.intermediate_size,
            cfg.num_hidden_layers,
            cfg.num_attention_heads,
            getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
            cfg.vocab_size,
            bool(getattr(cfg, "tie_word_embeddings", False)),
        )

    @property
    def matmul_params(self) -> int:
        """Weights the model multiplies by, per token: every decoder projection and the LM head (not the input
        embedding, a lookup). What MFU counts (tasks/train/mfu.py)."""
        return sum(a * b for a, b in self.module_shapes().values()) * self.layers + self.vocab * self.hidden

    def module_shapes(self) -> dict[str, tuple[int, int]]:
        h, i = self.hidden, self.intermediate
        kv = h * self.kv_heads // self.heads
        return {
            "q_proj": (h, h),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (h, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }


@dataclass(frozen=True)
class Estimate:
    base_weights_gib: float
    lora_state_gib: float
    activations_gib: float
    workspace_gib: float
    peak_gib: float
    micro_batch: int
    grad_accum: int
    tokens_per_micro_batch: int
    recompute_layers: int  # decoder layers recomputed in the backward: none, some, or all of `layers`
    layers: int
    budget_gib: float | None = None
    reason: str = "as configured"
    # train.adaptive_recompute: entry k, the most tokens a micro-batch may hold with k layers recomputed (None: the
    # count above for every micro-batch)
    recompute_thresholds: tuple[int, ...] | None = None

    @property
    def gradient_checkpointing(self) -> bool:
        return self.recompute_layers > 0

    @property
    def partial_recompute(self) -> bool:
        """Some layers recomputed and the others not (the Trainer's switch recomputes all: RecomputeSomeLayers)."""
        return 0 < self.recompute_layers < self.layers

    def describe(self) -> str:
        if not self.gradient_checkpointing:
            recompute = "off"
        elif self.partial_recompute:
            recompute = f"on for {self.recompute_layers} of {self.layers} layers"
        else:
            recompute = "on"
        if self.recompute_thresholds:
            recompute += f" at the longest micro-batch, none up to {self.recompute_thresholds[0]} tokens"
        return (
            f"predicted peak {self.peak_gib:.2f} GiB (weights {self.base_weights_gib:.2f}, LoRA+optimizer "
            f"{self.lora_state_gib:.2f}, activations {self.activations_gib:.2f}) "
            f"at micro-batch {self.micro_batch} x accumulation {self.grad_accum}, gradient checkpointing "
            f"{recompute} ({self.reason})"
        )


def _dtype_bytes(name: str) -> int:
    return 4 if name == "float32" else 2


def estimate(
    shape: ModelShape,
    params: Params,
    micro_batch: int | None = None,
    tokens: int | None = None,
    checkpointing: bool | None = None,
    recompute_layers: int | None = None,
) -> Estimate:
    """Peak for a micro-batch of `tokens` tokens (default: the worst case, micro_batch x max_length).

    checkpointing: recomputation on or off (default: train.gradient_checkpointing, auto counting as off);
    recompute_layers: with it on, how many decoder layers are recomputed (default: all)."""
    t, q, lora = params.train, params.quant, params.lora
    micro_batch = micro_batch or t.batch_size
    if checkpointing is None:
        checkpointing = t.gradient_checkpointing is True
    tokens = tokens or micro_batch * params.model.max_length
    modules = shape.module_shapes()

    linear = sum(a * b for a, b in modules.values()) * shape.layers
    if q.load_in_4bit and t.fp8_base:
        per_param = 2  # two float8 copies (tasks/train/fp8_base.py); their per-channel scales are negligible
    elif q.load_in_4bit and t.dequantized_base is not True:  # auto counts as 4-bit until decided
        per_param = 0.5 + (1 / 64 + 4 / (64 * 256) if q.double_quant else 4 / 64)
    else:
        per_param = _dtype_bytes(q.compute_dtype)
    embeddings = (1 if shape.tied_embeddings else 2) * shape.vocab * shape.hidden  # input embedding, LM head
    other = embeddings + (2 * shape.layers + 1) * shape.hidden
    weights = linear * per_param + other * _dtype_bytes(q.compute_dtype)

    targets = [m for m in lora.target_modules if m in modules]
    n_lora = sum(lora.r * (modules[m][0] + modules[m][1]) for m in targets) * shape.layers
    lora_param = 2 if q.load_in_4bit else 4  # trl keeps QLoRA adapters in bf16
    optim = 2 if "8bit" in t.optimizer else 8
    lora_state = n_lora * (2 * lora_param + optim)

    recomputed = (shape.layers if recompute_layers is None else recompute_layers) if checkpointing else 0
    activations = tokens * _activation_bytes_per_token(shape, params, recomputed)

    parts = [weights / GIB, lora_state / GIB, activations / GIB, WORKSPACE_GIB]
    return Estimate(
        *[round(p, 3) for p in parts],
        peak_gib=round(sum(parts), 3),
        micro_batch=micro_batch,
        grad_accum=t.grad_accum * t.batch_size // micro_batch,
        tokens_per_micro_batch=tokens,
        recompute_layers=recomputed,
        layers=shape.layers,
    )


def liger_applied(params: Params) -> bool:
    """Whether Liger's kernels run: not in a compiled run, whatever train.liger_kernels says. Dynamo cannot trace
    Liger's RMSNorm (an AssertionError at the first step on an H200, torch 2.11, liger-kernel 0.8.5:
    benchmarks/results/vs_plain_trl_levers_h200.log), trl 1.16 refuses Liger on the loss alone (its own fused LM head
    replaces the model's forward), and inductor fuses norm, RoPE and SwiGLU itself."""
    return params.train.liger_kernels and params.train.compile is not True


def _activation_bytes(params: Params) -> int:
    t, q = params.train, params.quant
    return 4 if t.precision == "fp32" and q.compute_dtype == "float32" else 2


def _layer_bytes_per_token(shape: ModelShape, params: Params) -> float:
    """What one decoder layer keeps for the backward, per token, when it is not recomputed."""
    i_share = ACT_PER_I_LIGER if liger_applied(params) else ACT_PER_I
    per_layer = (ACT_PER_H * shape.hidden + i_share * shape.intermediate) * _activation_bytes(params) / 2
    return per_layer * (COMPILED_ACTIVATION_SHARE if params.train.compile is True else 1.0)


def _activation_bytes_per_token(shape: ModelShape, params: Params, recomputed: int) -> float:
    """Kept activations per token with `recomputed` of the decoder layers recomputed: a recomputed layer keeps its
    input, and one of them is rebuilt at a time; the others keep everything."""
    per_layer = _layer_bytes_per_token(shape, params)
    kept = recomputed * shape.hidden * _activation_bytes(params) + (shape.layers - recomputed) * per_layer
    return kept + (per_layer if recomputed else 0)


def visible_gpu_gib() -> float | None:
    """Total memory of the GPU this process trains on, in GiB; None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / GIB


def use_expandable_segments() -> bool:
    """Switch this process's CUDA allocator to expandable segments, unless PYTORCH_ALLOC_CONF (or its older name
    PYTORCH_CUDA_ALLOC_CONF) says otherwise.

    Padding-free micro-batches differ in size at every step; the default allocator carves fixed segments and, near a
    memory cap, frees its cache and retries (a device-wide synchronize) when no cached block fits. Expandable segments
    grow one mapping instead. Set at run time (PyTorch reads the variable only when the allocator starts, which a
    benchmark's memory cap may already have done). Returns whether it was switched on."""
    import os

    import torch

    if not torch.cuda.is_available() or {"PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF"} & set(os.environ):
        return False
    # The run-time setter moved in PyTorch 2.10; the old name still works there but warns (FutureWarning).
    setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None) or torch.cuda.memory._set_allocator_settings
    setter("expandable_segments:True")
    return True


def resolve_budget(budget: float | str | None, gpu_gib: float | None) -> float | None:
    """train.memory_budget_gib as GiB: auto is AUTO_BUDGET_SHARE of the visible GPU (None on the CPU)."""
    if budget == "auto":
        return None if gpu_gib is None else round(gpu_gib * AUTO_BUDGET_SHARE, 2)
    return budget


def _margin_bytes_per_token(shape: ModelShape, params: Params, recompute_layers: int) -> float:
    """PARTIAL_RECOMPUTE_MARGIN of what the layers not recomputed keep, per token: where the fit is least sure."""
    return PARTIAL_RECOMPUTE_MARGIN * _layer_bytes_per_token(shape, params) * (shape.layers - recompute_layers)


def _partial_margin(shape: ModelShape, params: Params, micro_batch: int, recompute_layers: int) -> float:
    """GiB to keep spare for a layout recomputing some but not all layers, at its worst-case micro-batch."""
    if not 0 < recompute_layers < shape.layers:
        return 0.0
    tokens = micro_batch * params.model.max_length
    return tokens * _margin_bytes_per_token(shape, params, recompute_layers) / GIB


def plan(shape: ModelShape, params: Params, budget_gib: float | None) -> Estimate:
    """The fastest same-math layout that fits budget_gib (see the module docstring); as configured without one."""
    t = params.train
    choices = [False, True] if t.gradient_checkpointing == "auto" else [t.gradient_checkpointing]
    if budget_gib is None:
        return estimate(shape, params, checkpointing=choices[0])
    effective = t.batch_size * t.grad_accum
    micros = sorted((m for m in range(1, t.batch_size + 1) if effective % m == 0), reverse=True)
    # (micro-batch, layers recomputed), fastest first. Each micro-batch dequantizes the whole 4-bit base again, so
    # shrinking the micro-batch costs more than recomputation does (H200, 7B recipe: recompute at micro 4 ran 4,431
    # tokens/s, no recompute at micro 2 x 2 ran 3,800): under auto, the configured micro-batch with no layer
    # recomputed, then with as few as fit, then every layer at smaller micro-batches. Pinned true recomputes every
    # layer; pinned false shrinks the micro-batch only.
    if choices == [False]:
        candidates = [(m, 0) for m in micros]
    else:
        first = range(0 if False in choices else shape.layers, shape.layers)
        candidates = [(micros[0], k) for k in first] + [(m, shape.layers) for m in micros]
    for micro, k in candidates:
        candidate = estimate(shape, params, micro_batch=micro, checkpointing=k > 0, recompute_layers=k)
        if candidate.peak_gib + _partial_margin(shape, params, micro, k) <= budget_gib:
            why = f"fastest layout within {budget_gib:g} GiB" if len(choices) > 1 else f"fits {budget_gib:g} GiB"
            chosen = replace(candidate, budget_gib=budget_gib, reason=why)
            # Not under FSDP: there recomputing a layer gathers its parameters again, a collective every rank must
            # join, and each rank's micro-batch (so its count) differs. DDP's collectives do not depend on it.
            adaptive = t.adaptive_recompute and t.distributed.mode != "fsdp"
            if adaptive and len(choices) > 1 and chosen.gradient_checkpointing:
                chosen = replace(chosen, recompute_thresholds=tuple(recompute_thresholds(shape, params, chosen)))
            return chosen
    smallest = estimate(shape, params, micro_batch=1, checkpointing=choices[-1])
    hints = []
    if choices[-1] is False:
        hints.append("turn on train.gradient_checkpointing (or set it to auto)")
    hints.append(f"lower model.max_length (now {params.model.max_length})")
    if params.quant.load_in_4bit and t.dequantized_base is True:  # its weights take 2 bytes instead of ~0.5
        hints.append("set train.dequantized_base to auto (kept only where it fits) or false")
    if params.quant.load_in_4bit and t.fp8_base:
        hints.append("set train.fp8_base: false (its float8 copies take 2 bytes a weight)")
    if not params.quant.load_in_4bit:
        hints.append("set quant.load_in_4bit: true")
    raise PipelineError(
        f"this run does not fit a memory budget of {budget_gib:g} GiB (train.memory_budget_gib="
        f"{t.memory_budget_gib}): even micro-batch 1 needs {smallest.describe()}. To fit, {', or '.join(hints)}, "
        "or raise the budget."
    )


def recompute_thresholds(shape: ModelShape, params: Params, est: Estimate) -> list[int]:
    """Token-adaptive recomputation (train.adaptive_recompute): entry k is the most tokens a micro-batch may hold
    with only its first k decoder layers recomputed, k from 0 to the plan's count, within the plan's budget.

    The plan fits the worst case, every row max_length long; padding-free micro-batches are mostly far shorter, and
    activations grow with the tokens, so a short one fits with fewer layers recomputed (each recomputed layer costs a
    share of a forward pass). Kept activations carry PARTIAL_RECOMPUTE_MARGIN here at every k, none recomputed too:
    this is where the fit is least sure. The last entry is never below the tokens plan() checked."""
    fixed = (est.base_weights_gib + est.lora_state_gib + est.workspace_gib) * GIB
    room = (est.budget_gib or 0) * GIB - fixed
    thresholds = []
    for k in range(est.recompute_layers + 1):
        per_token = _activation_bytes_per_token(shape, params, k) + _margin_bytes_per_token(shape, params, k)
        thresholds.append(max(0, int(room // per_token)))
    thresholds[-1] = max(thresholds[-1], est.tokens_per_micro_batch)  # what plan() checked, with its own margin
    return thresholds


def layers_to_recompute(thresholds: list[int], tokens: int) -> int:
    """The fewest recomputed layers whose threshold holds `tokens` (the plan's count when none does)."""
    return next((k for k, most in enumerate(thresholds) if tokens <= most), len(thresholds) - 1)
