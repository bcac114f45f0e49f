"""Typed view of params.yaml: loaded once, checked once, passed down to every stage.

params.yaml is the only place a knob lives, so none of these models has defaults: a missing key,
an unknown key (usually a typo) or a wrong type is reported with its dotted name before any stage
does work.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tasks.common.errors import PipelineError

PARAMS_FILE = Path("params.yaml")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ColumnsParams(_Strict):
    """The data's column holding each field the parser reads (tasks/common/conversation.py); null: the field's own name.

    A mapping by field, not one `text_column`: the parser reads `text`, `messages` or Alpaca's three fields,
    and fixed keys can be set with `-S download.columns.text=content` (and a typo is an unknown key).
    """

    text: str | None
    messages: str | None
    instruction: str | None
    input: str | None
    output: str | None

    @model_validator(mode="after")
    def _distinct(self) -> ColumnsParams:
        named = [c for c in self.model_dump().values() if c is not None]
        if len(named) != len(set(named)):
            raise ValueError(f"each column can feed one field only, got {self.model_dump()}")
        return self


class DownloadParams(_Strict):
    source: Literal["local", "hub"]
    path: str = Field(
        description="local .jsonl/.json/.parquet/.csv/.tsv file, text ones also .gz/.bz2/.xz (used when source=local)"
    )
    hub_id: str = Field(description="Hub dataset id (used when source=hub)")
    revision: str | None = Field(description="Hub commit sha or tag; pin it for reproducible runs")
    split: str
    columns: ColumnsParams


class ModelParams(_Strict):
    base: str = Field(description="'tiny-llama' (built locally), a Hub model id, or a local directory")
    revision: str | None
    tokenizer: str | None = Field(description="tokenizer location if not the base's own (dir or tokenizer.model)")
    max_length: int = Field(gt=8)


class ValidateParams(_Strict):
    min_rows: int = Field(ge=1)
    max_turns: int = Field(ge=2)
    min_chars: int = Field(ge=1)
    max_chars: int = Field(ge=1)
    max_bad_row_share: float = Field(
        ge=0, le=1, description="rows breaking any row rule (all rules together) left out, not fatal"
    )
    max_duplicate_share: float = Field(ge=0, le=1)
    min_share_within_max_length: float = Field(ge=0, le=1)
    max_tokens_hard_limit: int = Field(ge=1, description="rows longer than this fail validation outright")
    workers: Annotated[int, Field(ge=0)] | Literal["auto"] = Field(
        description="worker processes for the scan (tasks/validate/scan_pool.py); auto: one a usable core (at most "
        "8, for memory) on more than 2 cores, else none; 0: none (one process: the main thread parses, one thread "
        "tokenizes). The results are the same byte for byte whatever the count"
    )


class FormatParams(_Strict):
    template: Literal["llama2", "llama3", "chatml", "mistral", "tokenizer"] = Field(
        description="the chat template (tasks/common/chat_template.py): llama2, llama3, chatml (Qwen), mistral "
        "(v0.3), or tokenizer (the base tokenizer's own)"
    )
    system_prompt: str | None
    eval_fraction: float = Field(gt=0, lt=1)
    min_eval_rows: int = Field(ge=1)
    length_policy: Literal["truncate", "drop", "fail"]
    duplicates: Literal["keep", "drop"]


class QuantParams(_Strict):
    load_in_4bit: bool
    quant_type: Literal["nf4", "fp4"]
    compute_dtype: Literal["float32", "bfloat16", "float16"]
    double_quant: bool


class LoraParams(_Strict):
    r: int = Field(ge=1)
    alpha: int = Field(ge=1)
    dropout: float = Field(ge=0, lt=1)
    target_modules: list[str] = Field(min_length=1)
    bias: Literal["none", "all", "lora_only"]


class DistributedParams(_Strict):
    mode: Literal["single", "ddp", "fsdp"] = Field(
        description="single: one process; ddp: one full 4-bit copy per process; fsdp: FSDP-QLoRA (CUDA only)"
    )
    num_processes: int = Field(ge=1, description="processes (GPUs) in the whole job, over all machines; 1 for single")
    num_machines: int = Field(ge=1, description="hosts taking part; each runs `python -m tasks.train` itself")
    machine_rank: int = Field(ge=0, description="this host's place among them; 0 is the main host, which writes")
    main_process_ip: str | None = Field(description="the main host's address, reachable from every host")
    main_process_port: int | None = Field(ge=1, le=65535, description="a free port on the main host (several hosts)")

    @model_validator(mode="after")
    def _processes(self) -> DistributedParams:
        if self.mode == "single" and self.num_processes != 1:
            raise ValueError(
                f"mode single runs one process: set num_processes to 1 (or mode ddp for {self.num_processes})"
            )
        if self.mode != "single" and self.num_processes < 2:
            raise ValueError(f"mode {self.mode} needs num_processes >= 2 (use mode single for one process)")
        if self.num_machines > 1:
            if self.mode == "single":
                raise ValueError("several machines need mode ddp or fsdp")
            if self.num_processes % self.num_machines:
                raise ValueError(
                    f"num_processes ({self.num_processes}, the whole job) must divide evenly over "
                    f"num_machines ({self.num_machines})"
                )
            if self.machine_rank >= self.num_machines:
                raise ValueError(f"machine_rank {self.machine_rank} must be below num_machines ({self.num_machines})")
            if not self.main_process_ip or not self.main_process_port:
                raise ValueError("several machines need main_process_ip and main_process_port (the main host's)")
        elif self.machine_rank:
            raise ValueError("machine_rank is for several machines: set num_machines, or machine_rank to 0")
        return self


def batch_split_problem(global_batch: int, processes: int) -> str | None:
    """Why the global batch (batch_size x grad_accum) cannot be split evenly over the processes, or None."""
    if global_batch % processes:
        return (
            f"the global batch (train.batch_size x train.grad_accum = {global_batch}) does not divide over "
            f"{processes} processes (train.distributed.num_processes): change train.batch_size or train.grad_accum"
        )
    return None


class TrainParams(_Strict):
    seed: int
    epochs: float = Field(gt=0)
    max_steps: int = Field(description="-1 trains for `epochs`; a positive number caps the optimizer steps")
    learning_rate: float = Field(gt=0)
    lr_scheduler: str
    warmup_ratio: float = Field(ge=0, lt=1)
    weight_decay: float = Field(ge=0)
    max_grad_norm: float = Field(gt=0)
    optimizer: str
    batch_size: int = Field(ge=1)
    grad_accum: int = Field(ge=1)
    precision: Literal["fp32", "bf16", "fp16"]
    gradient_checkpointing: bool | Literal["auto"] = Field(
        description="recompute activations in the backward; auto: the memory planner turns it on only when needed"
    )
    answer_only_loss: bool
    group_by_length: bool
    logging_steps: int = Field(ge=1)
    save_steps: int = Field(ge=1)
    padding_free: bool = Field(description="flatten each micro-batch into one row; varlen attention keeps rows apart")
    liger_kernels: bool = Field(description="Liger's fused RMSNorm/RoPE/SwiGLU kernels (CUDA only)")
    compile: bool | Literal["auto"] = Field(
        description="regional torch.compile: the decoder block compiled once for every layer, the rest eager (CUDA "
        "only); auto: on when the planned run saves more than compiling costs (tasks/train/compilation.py)"
    )
    sync_free_step: bool = Field(
        description="no CUDA synchronize inside a step: bitsandbytes' optimizer without its per-parameter waits, "
        "padding-free tokens counted on the host (tasks/train/step_overlap.py)"
    )
    gemm_warmup: bool = Field(
        description="(CUDA) before the first step, run each GEMM of a step once at every 64th token count a "
        "micro-batch can have, so that cuBLAS loads the kernels it picks then: a kernel loaded mid-run waits for the "
        "GPU's queue to drain; padding-free micro-batches are padded onto that grid (tasks/train/gemm_warmup.py)"
    )
    expandable_segments: bool = Field(
        description="PyTorch's expandable-segments allocator (CUDA): micro-batches of varying size reuse memory "
        "instead of fragmenting it; a PYTORCH_CUDA_ALLOC_CONF the user set wins"
    )
    adaptive_recompute: bool = Field(
        description="with the planner's recomputation (gradient_checkpointing auto, under a budget): each micro-batch "
        "recomputes only as many decoder layers as its token count needs, the plan's count for the longest (not FSDP)"
    )
    dequantized_base: bool | Literal["auto"] = Field(
        description="keep the 4-bit base dequantized for the run (single GPU): the same weights and products, no "
        "dequantization per step, 2 bytes a weight instead of ~0.5; auto: where the memory planner finds room "
        "(tasks/train/dequantized_base.py)"
    )
    fp8_base: bool = Field(
        description="the frozen base's matmuls in float8 (GPUs of compute capability 8.9+, single GPU): faster, not "
        "the same math (8-bit rounding), so opt-in and checked by the eval loss (tasks/train/fp8_base.py)"
    )
    memory_budget_gib: Annotated[float, Field(gt=0)] | Literal["auto"] | None = Field(
        description="GPU memory to fit (GiB); auto: the visible GPU's; the planner picks micro-batch and recompute"
    )
    distributed: DistributedParams

    @model_validator(mode="after")
    def _steps(self) -> TrainParams:
        if self.max_steps == 0 or self.max_steps < -1:
            raise ValueError("max_steps must be -1 (use epochs) or a positive number")
        # batch_size x grad_accum is the global batch, split evenly over the processes (tasks/train/stage.py).
        if problem := batch_split_problem(self.batch_size * self.grad_accum, self.distributed.num_processes):
            raise ValueError(problem)
        return self


class BenchmarkParams(_Strict):
    """Standard benchmarks through lm-evaluation-harness, base vs tuned (tasks/evaluate/benchmarks.py)."""

    tasks: list[str] = Field(
        description="lm-eval task, group or tag names, and heldout_answers (the held-out rows' answers, built in); "
        "empty: no benchmark runs"
    )
    limit: int | None = Field(ge=1, description="examples per task (null: all of them)")
    num_fewshot: int | None = Field(ge=0, description="few-shot examples (null: each task's own default)")


class EvaluateParams(_Strict):
    max_rows: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    max_new_tokens: int = Field(ge=1)
    prompts: list[str] = Field(min_length=1)
    benchmarks: BenchmarkParams


class PublishParams(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    require_improvement: bool
    push_to_hub: bool
    hub_repo_id: str | None
    private: bool
    signing: Literal["key", "sigstore"]
    # A path only: the key itself is read at signing time and never written anywhere (tasks/publish/signing.py).
    signing_key: str | None
    merged: bool = Field(
        description="also write the adapter merged into the unquantized base in release/merged/ (publish/merge.py)"
    )
    generation_check: bool = Field(
        description="load the release in a fresh process and check it generates what evaluate recorded "
        "(publish/generation_check.py); false skips that second load of the base, and the lineage and audit say so"
    )

    @model_validator(mode="after")
    def _hub(self) -> PublishParams:
        if self.push_to_hub and not self.hub_repo_id:
            raise ValueError("push_to_hub is true but hub_repo_id is empty")
        return self


class Params(_Strict):
    download: DownloadParams
    model: ModelParams
    validate_: ValidateParams = Field(alias="validate")
    format: FormatParams
    quant: QuantParams
    lora: LoraParams
    train: TrainParams
    evaluate: EvaluateParams
    publish: PublishParams

    @model_validator(mode="after")
    def _consistent(self) -> Params:
        if self.train.precision == "fp16" and self.quant.compute_dtype == "bfloat16":
            raise ValueError("train.precision fp16 with quant.compute_dtype bfloat16: use bf16 for both")
        if self.validate_.max_tokens_hard_limit < self.model.max_length:
            raise ValueError("validate.max_tokens_hard_limit must be >= model.max_length")
        return self

    def as_dict(self) -> dict:
        return self.model_dump(by_alias=True, mode="json")


def with_overrides(params: Params, **changes: object) -> Params:
    """A copy of params with dotted keys changed: with_overrides(p, **{"train.max_steps": 2}), checked like params.yaml
    (an unknown key or a wrong type is an error naming it)."""
    data = params.as_dict()
    for dotted, value in changes.items():
        node = data
        *parents, leaf = dotted.split(".")
        for key in parents:
            if not isinstance(node.get(key), dict):
                raise PipelineError(f"unknown param {dotted!r}: {key!r} is not a section")
            node = node[key]
        node[leaf] = value
    try:
        return Params.model_validate(data)
    except ValidationError as e:
        raise PipelineError(_describe(e, Path("overrides"))) from None


def _setting(loc: tuple) -> str:
    """The dotted setting an error is about: its loc as far as it names model fields. A setting that takes one of
    several types (a number or 'auto') gets one error per type, with pydantic's tag for the type appended to its loc
    ("constrained-float", "literal['auto']"); a list's index follows too. Neither is a setting the user wrote."""
    model, parts = Params, []
    for part in loc:
        fields = getattr(model, "model_fields", {})
        if part not in fields:
            break
        parts.append(part)
        model = fields[part].annotation
    return ".".join(parts) or "(top level)"


def _describe(err: ValidationError, path: Path) -> str:
    by_setting: dict[str, list[dict]] = {}
    for e in err.errors():
        # An unknown or missing key is itself the last part of its loc; only type errors carry pydantic's tags.
        whole = e["type"] in ("extra_forbidden", "missing")
        key = ".".join(str(p) for p in e["loc"]) if whole else _setting(e["loc"])
        by_setting.setdefault(key, []).append(e)
    lines = []
    for key, errors in by_setting.items():
        e = errors[0]
        if e["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key (typo? every knob is listed in params.yaml's committed version)")
        elif e["type"] == "missing":
            lines.append(f"  {key}: missing")
        elif len(errors) > 1:  # one per type the setting accepts: say them together
            options = " or ".join(dict.fromkeys(x["msg"].removeprefix("Input should be ") for x in errors))
            lines.append(f"  {key}: should be {options} (got {e.get('input')!r})")
        else:
            lines.append(f"  {key}: {e['msg']} (got {e.get('input')!r})")
    return (
        f"{path} has {len(lines)} invalid setting(s):\n"
        + "\n".join(lines)
        + "\nFix them where they were set (a `-S` of `dvc exp run`, conf/, or params.yaml itself for `dvc repro`) "
        "and run again."
    )


def load_params(path: Path | str = PARAMS_FILE) -> Params:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PipelineError(f"{path} not found: run from the project root, where params.yaml lives.") from None
    except yaml.YAMLError as e:
        raise PipelineError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise PipelineError(f"{path} must hold a mapping of sections (download, model, ...), got {type(raw).__name__}.")
    try:
        return Params.model_validate(raw)
    except ValidationError as e:
        raise PipelineError(_describe(e, path)) from None
