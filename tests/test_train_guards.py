"""Training guards: memory planner, NaN stop, preflight, and resume after a SIGKILL."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from transformers import LlamaConfig

from benchmarks.model_shapes import LLAMA2_7B_CHAT
from tasks.common import paths
from tasks.common.artifacts import sha256_file
from tasks.common.config import with_overrides
from tasks.common.errors import PipelineError
from tasks.train.checkpoints import COMPLETE
from tasks.train.memory import ModelShape, estimate, plan
from tests.conftest import ROOT

LLAMA_7B = ModelShape.from_config(LlamaConfig(**LLAMA2_7B_CHAT))


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    from tasks.common.compose import compose_params
    from tasks.common.config import load_params

    work = tmp_path_factory.mktemp("recipe")
    shutil.copytree(ROOT / "conf", work / "conf")
    compose_params(work, ["preset=llama2_7b_guanaco"])
    return load_params(work / "params.yaml")


def test_planner_weights_and_scaling(recipe):
    p = with_overrides(
        recipe, **{"train.batch_size": 8, "train.gradient_checkpointing": False, "train.liger_kernels": False}
    )
    e = estimate(LLAMA_7B, p)
    assert 3.7 < e.base_weights_gib < 4.0  # 6.5B params at 4.5 bits + bf16 embeddings and lm_head
    assert 0.3 < e.lora_state_gib < 0.45  # 33.5M LoRA params: bf16 weight + grad + fp32 Adam moments
    assert 40 < e.peak_gib < 47  # measured 43.3 GiB on an H100 (benchmarks/results/throughput_h100.json)
    gc = estimate(LLAMA_7B, with_overrides(p, **{"train.gradient_checkpointing": True}))
    assert 6.5 < gc.peak_gib < 9 and gc.activations_gib < e.activations_gib / 5
    half = estimate(LLAMA_7B, p, micro_batch=4)
    assert half.activations_gib == pytest.approx(e.activations_gib / 2, rel=1e-3)


def test_planner_keeps_the_effective_batch_within_budget(recipe):
    p = with_overrides(recipe, **{"train.batch_size": 8, "train.grad_accum": 2, "train.gradient_checkpointing": False})
    chosen = plan(LLAMA_7B, p, budget_gib=24)
    assert chosen.peak_gib <= 24 and chosen.micro_batch < 8
    assert chosen.micro_batch * chosen.grad_accum == 16
    assert plan(LLAMA_7B, p, budget_gib=None).micro_batch == 8


def test_planner_says_what_to_change_when_nothing_fits(recipe):
    p = with_overrides(recipe, **{"train.gradient_checkpointing": False, "model.max_length": 4096})
    with pytest.raises(PipelineError, match="gradient_checkpointing") as err:
        plan(LLAMA_7B, p, budget_gib=6)
    assert "max_length" in str(err.value) and "6" in str(err.value)
    assert "dequantized_base" not in str(err.value)
    # a base pinned dequantized that only its 4-bit form fits: the message names the setting to change
    pinned = with_overrides(recipe, **{"train.dequantized_base": True, "train.gradient_checkpointing": "auto"})
    assert plan(LLAMA_7B, with_overrides(pinned, **{"train.dequantized_base": False}), budget_gib=10).peak_gib <= 10
    with pytest.raises(PipelineError, match="train.dequantized_base to auto"):
        plan(LLAMA_7B, pinned, budget_gib=10)


def test_train_stage_uses_the_planned_micro_batch(workdir, params):
    from tasks.download.stage import download
    from tasks.format.stage import format_rows
    from tasks.train.stage import train
    from tasks.validate.stage import validate

    download(params.download)
    validate(params)
    format_rows(params.format, params.model)
    worst = estimate(ModelShape.from_config(_tiny_config()), params).peak_gib
    budget = estimate(ModelShape.from_config(_tiny_config()), params, micro_batch=2).peak_gib + 1e-4
    assert budget < worst
    metrics = train(with_overrides(params, **{"train.memory_budget_gib": budget, "train.max_steps": 2}))
    assert (metrics["micro_batch"], metrics["grad_accum"]) == (2, 2 * params.train.grad_accum)


def _tiny_config():
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(paths.TINY_BASE_DIR)


def test_nan_loss_stops_training_and_writes_no_adapter(workdir, params):
    from tasks.download.stage import download
    from tasks.format.stage import format_rows
    from tasks.train.stage import train
    from tasks.validate.stage import validate

    download(params.download)
    validate(params)
    format_rows(params.format, params.model)
    with pytest.raises(PipelineError, match="loss became nan"):
        train(with_overrides(params, **{"train.learning_rate": 1e6, "train.max_steps": 20, "train.logging_steps": 1}))
    assert not paths.ADAPTER_DIR.exists() and not paths.TRAIN_METRICS.exists()


def test_preflight_rejects_gpu_only_settings_before_loading(params):
    from tasks.train.preflight import preflight

    with pytest.raises(PipelineError, match="paged_adamw_32bit needs a CUDA GPU"):
        preflight(with_overrides(params, **{"train.optimizer": "paged_adamw_32bit"}))
    with pytest.raises(PipelineError, match="liger_kernels needs a CUDA GPU"):
        preflight(with_overrides(params, **{"train.liger_kernels": True}))
    with pytest.raises(PipelineError, match="train.compile needs a CUDA GPU"):
        preflight(with_overrides(params, **{"train.compile": True}))
    preflight(with_overrides(params, **{"train.compile": "auto"}))  # auto decides off on the CPU, no refusal


def test_compile_is_regional_and_its_failures_stop_the_run(params):
    """train.compile compiles each decoder layer in place (names and saved adapter unchanged, the rest eager); a
    torch.compile error at the first step becomes a PipelineError that says how to turn it off."""
    import torch

    from tasks.train.compilation import compile_layers
    from tasks.train.stage import fit

    class LlamaDecoderLayer(torch.nn.Linear):
        pass

    model = torch.nn.Sequential(torch.nn.Embedding(4, 2), LlamaDecoderLayer(2, 2), LlamaDecoderLayer(2, 2))
    names = [n for n, _ in model.named_parameters()]
    assert compile_layers(model) == 2  # lazy: nothing is traced until the first forward
    assert [n for n, _ in model.named_parameters()] == names
    assert model[1]._compiled_call_impl is not None and model[0]._compiled_call_impl is None
    with pytest.raises(PipelineError, match="no decoder layers"):
        compile_layers(torch.nn.Linear(2, 2))

    class Trainer:
        def train(self, resume_from_checkpoint=None):
            raise torch._dynamo.exc.InternalTorchDynamoError("AssertionError: ")

    on = with_overrides(params, **{"train.compile": True})
    with pytest.raises(PipelineError, match="set train.compile: false"):
        fit(Trainer(), False, None, on)
    with pytest.raises(torch._dynamo.exc.InternalTorchDynamoError):  # with compile off, not reworded
        fit(Trainer(), False, None, params)


def test_preflight_names_the_install_command_of_a_missing_lever_package(params, monkeypatch):
    """A GPU box without liger-kernel: the stage stops before the base loads and says what to install."""
    import tasks.train.stage
    from tasks.train.preflight import package_problems

    monkeypatch.setitem(sys.modules, "liger_kernel", None)  # `import liger_kernel` now raises ImportError
    liger = with_overrides(params, **{"train.liger_kernels": True})
    problems = package_problems(liger, on_gpu=True)
    assert len(problems) == 1 and "train.liger_kernels needs the package liger-kernel" in problems[0]
    assert "pip install -e '.[gpu]'" in problems[0]
    assert package_problems(params) == []  # the CPU default needs only bitsandbytes, which imports

    def must_not_load(*a, **k):
        raise AssertionError("the base model was loaded before preflight stopped the run")

    monkeypatch.setattr(tasks.train.stage, "load_base_model", must_not_load)
    monkeypatch.setattr(tasks.train.stage, "load_rows", must_not_load)
    with pytest.raises(PipelineError) as err:
        tasks.train.stage.train(liger)
    # Here, on the CPU, the stage says Liger needs a GPU, once, and does not send the user to install the GPU extra.
    assert "train.liger_kernels needs a CUDA GPU (set it to false on the CPU)" in str(err.value)
    assert "liger" not in str(err.value).replace("train.liger_kernels needs a CUDA GPU", "")


@pytest.mark.parametrize("card_gib", [16, 24, 40, 80, 141])
def test_auto_budget_picks_the_fastest_same_math_layout_that_fits(recipe, card_gib):
    """memory_budget_gib: auto on cards of these sizes: the choice fits the fitted memory model with the auto
    margin, keeps the effective batch, and turns recomputation off whenever it fits at the full micro-batch."""
    from tasks.train.memory import AUTO_BUDGET_SHARE, resolve_budget

    assert recipe.train.memory_budget_gib == "auto" and recipe.train.gradient_checkpointing == "auto"
    budget = resolve_budget("auto", card_gib)
    assert budget == pytest.approx(card_gib * AUTO_BUDGET_SHARE, abs=0.01)
    chosen = plan(LLAMA_7B, recipe, budget)
    assert chosen.peak_gib <= budget
    assert chosen.micro_batch * chosen.grad_accum == recipe.train.batch_size * recipe.train.grad_accum
    no_recompute = estimate(LLAMA_7B, recipe, checkpointing=False)
    if no_recompute.peak_gib <= budget:
        assert (chosen.gradient_checkpointing, chosen.micro_batch) == (False, recipe.train.batch_size)
    else:  # recomputation back on before the micro-batch shrinks (measured faster on an H200)
        assert chosen.gradient_checkpointing and chosen.micro_batch == recipe.train.batch_size
    assert f"{budget:g} GiB" in chosen.reason


def test_auto_budget_on_the_cpu_plans_nothing(recipe):
    from tasks.train.memory import resolve_budget

    assert resolve_budget("auto", None) is None
    assert resolve_budget(16.0, None) == 16.0
    chosen = plan(LLAMA_7B, recipe, None)  # no GPU to fit: as configured, recomputation off under auto
    assert (chosen.gradient_checkpointing, chosen.micro_batch, chosen.budget_gib) == (False, 4, None)


def test_pinned_checkpointing_is_kept_by_the_planner(recipe):
    pinned = with_overrides(recipe, **{"train.gradient_checkpointing": True})
    assert plan(LLAMA_7B, pinned, 120).gradient_checkpointing is True


def _project(root: Path, params) -> Path:
    """A scratch project with formatted data and params.yaml, for running stages as processes."""
    shutil.copytree(ROOT / "data" / "sample", root / "data" / "sample")
    if (ROOT / paths.TINY_BASE_DIR).exists():
        shutil.copytree(ROOT / paths.TINY_BASE_DIR, root / paths.TINY_BASE_DIR)
    (root / "params.yaml").write_text(yaml.safe_dump(params.as_dict(), sort_keys=False))
    _run(root, "download")
    _run(root, "validate")
    _run(root, "format")
    return root


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def _run(root: Path, stage: str) -> None:
    subprocess.run([sys.executable, "-m", f"tasks.{stage}"], cwd=root, env=_env(), check=True, capture_output=True)


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_same_result(tmp_path, params):
    p = with_overrides(
        params, **{"train.epochs": 1, "train.batch_size": 2, "train.save_steps": 10, "train.logging_steps": 5}
    )
    straight = _project(tmp_path / "straight", p)
    killed = Path(shutil.copytree(straight, tmp_path / "killed"))  # the same formatted rows, before any training
    _run(straight, "train")

    proc = subprocess.Popen(
        [sys.executable, "-m", "tasks.train"],
        cwd=killed,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    ckpt = killed / paths.CHECKPOINT_DIR / "checkpoint-10" / COMPLETE  # the checkpoint whole, then the kill
    deadline = time.time() + 300
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "training ended before it could be killed"
    assert not (killed / paths.ADAPTER_DIR).exists()

    _run(killed, "train")
    # the very adapter of the uninterrupted run, byte for byte (so it evaluates the same): resumed in the dtype it
    # trains in (bf16 under QLoRA), not PEFT's fp32
    weights = [sha256_file(root / paths.ADAPTER_DIR / paths.ADAPTER_WEIGHTS) for root in (straight, killed)]
    assert weights[0] == weights[1]
    resumed = json.loads((killed / paths.TRAINING).read_text())
    straight_steps = json.loads((straight / paths.TRAINING).read_text())["steps"]
    assert resumed["resumed"] is True and resumed["steps"] == straight_steps
    # the recorded (and published) train loss is the whole run's, not only the steps after the resume
    whole = json.loads((straight / paths.TRAINING).read_text())["train_loss"]
    assert resumed["train_loss"] == pytest.approx(whole, abs=2e-3), (resumed["train_loss"], whole)


def test_the_live_plots_resume_as_of_the_checkpoint(tmp_path):
    """A run killed between checkpoints had logged past the last one, and dvclive resumes by appending: those rows
    went into the plots twice. The resume keeps the rows up to the checkpoint's step, drops a row the kill cut short,
    and removes a summary file dvclive could not read back (a kill while dvclive rewrote it)."""
    from tasks.train.checkpoints import FINGERPRINT, resumable_checkpoint

    live = tmp_path / "dvclive"
    (live / "plots" / "metrics" / "train").mkdir(parents=True)
    loss = live / "plots" / "metrics" / "loss.tsv"
    loss.write_text("step\tloss\n2\t6.9\n4\t6.8\n6\t6.7\n8\t6.")
    runtime = live / "plots" / "metrics" / "train" / "runtime.tsv"
    runtime.write_text("step\truntime\n2\t1.5\n")
    (live / "plots" / "metrics" / "epoch.tsv").write_text("ste")  # cut short at its header
    (live / "metrics.json").write_text('{"loss": 6.8, "st')
    (live / "params.yaml").write_text("lr: 0.002\n")
    (tmp_path / FINGERPRINT).write_text(json.dumps({"fingerprint": "f"}))
    (tmp_path / "checkpoint-2").mkdir()
    (tmp_path / "checkpoint-2" / COMPLETE).write_text("{}")
    (tmp_path / "checkpoint-4").mkdir()
    (tmp_path / "checkpoint-4" / COMPLETE).write_text("{}")
    (tmp_path / "checkpoint-6").mkdir()  # no marker: cut short, removed

    assert resumable_checkpoint(tmp_path, "f")
    assert loss.read_text() == "step\tloss\n2\t6.9\n4\t6.8\n"
    assert runtime.read_text() == "step\truntime\n2\t1.5\n"
    assert sorted(p.name for p in live.rglob("*") if p.is_file()) == ["loss.tsv", "params.yaml", "runtime.tsv"]


def test_whole_run_loss_joins_the_logged_steps_before_a_resume():
    from types import SimpleNamespace

    from tasks.train.stage import whole_run_loss

    logs = [{"loss": 4.0, "step": 5}, {"loss": 2.0, "step": 10}, {"loss": 9.0, "step": 15}]
    state = SimpleNamespace(log_history=logs, global_step=20)
    assert whole_run_loss(state, 1.0, 0) == 1.0  # not resumed: the Trainer's own figure
    assert whole_run_loss(state, 1.0, 10) == pytest.approx((4 * 5 + 2 * 5 + 1 * 10) / 20)  # logs after 10 ignored
    assert whole_run_loss(state, 1.0, 12) == pytest.approx((4 * 5 + 2 * 5 + 1 * 8) / 18)  # steps 11-12: no log


def test_planner_recomputes_only_the_layers_that_do_not_fit(recipe):
    """Between no recomputation and all of it, auto recomputes as few decoder layers as fit at the configured
    micro-batch, with a margin on the activations it keeps; pinned true still recomputes every layer."""
    from tasks.train.memory import PARTIAL_RECOMPUTE_MARGIN

    p = with_overrides(recipe, **{"train.batch_size": 8, "train.liger_kernels": True})
    none = estimate(LLAMA_7B, p, checkpointing=False)
    every = estimate(LLAMA_7B, p, checkpointing=True)
    assert (none.recompute_layers, every.recompute_layers) == (0, LLAMA_7B.layers)
    chosen = [plan(LLAMA_7B, p, budget) for budget in (12, 16, 24, 30)]
    counts = [c.recompute_layers for c in chosen]
    assert all(0 < k < LLAMA_7B.layers for k in counts) and counts == sorted(counts, reverse=True)
    for c, budget in zip(chosen, (12, 16, 24, 30)):
        assert c.micro_batch == 8 and c.gradient_checkpointing
        kept = none.activations_gib * (LLAMA_7B.layers - c.recompute_layers) / LLAMA_7B.layers
        assert c.peak_gib + PARTIAL_RECOMPUTE_MARGIN * kept <= budget
        one_fewer = estimate(LLAMA_7B, p, checkpointing=True, recompute_layers=c.recompute_layers - 1)
        assert one_fewer.peak_gib + PARTIAL_RECOMPUTE_MARGIN * (kept + none.activations_gib / 32) > budget
        assert f"on for {c.recompute_layers} of 32 layers" in c.describe()
    assert none.peak_gib > 30 and every.peak_gib < 12  # so these budgets lie between the two
    pinned = with_overrides(p, **{"train.gradient_checkpointing": True})
    assert plan(LLAMA_7B, pinned, 24).recompute_layers == LLAMA_7B.layers


def test_partial_recomputation_trains_the_same_as_none(workdir, params, monkeypatch):
    """A partial layout from the planner through the train stage: the first layer recomputed, the other keeping its
    activations while training, and the loss the one without recomputation (recomputing changes memory, not
    results). The tiny base has 2 layers, too few for the planner to pick a partial layout itself (recomputing one
    of two saves nothing), so its choice is set here."""
    from transformers import TrainerCallback
    from transformers.modeling_layers import GradientCheckpointingLayer

    import tasks.train.stage
    from tasks.download.stage import download
    from tasks.format.stage import format_rows
    from tasks.validate.stage import validate

    download(params.download)
    validate(params)
    format_rows(params.format, params.model)
    base = with_overrides(params, **{"train.max_steps": 2, "train.gradient_checkpointing": False})
    none = tasks.train.stage.train(base)
    assert none["recompute_layers"] == 0

    shape = ModelShape.from_config(_tiny_config())
    monkeypatch.setattr(
        tasks.train.stage, "plan", lambda shape, p, budget: estimate(shape, p, checkpointing=True, recompute_layers=1)
    )
    seen = []

    class Flags(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kw):
            layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
            seen.append([m.gradient_checkpointing for m in layers])

    partial = tasks.train.stage.train(base, extra_callbacks=[Flags()])
    assert partial["recompute_layers"] == 1 < shape.layers and partial["gradient_checkpointing"] is True
    assert seen == [[True, False]] * 2
    assert partial["train_loss"] == pytest.approx(none["train_loss"], rel=1e-6)


def test_planner_counts_compiled_layers_at_their_measured_memory(recipe):
    """train.compile: the planner's peaks for the H200 runs the share was fitted on (benchmarks/results/
    vs_plain_trl_deq_h200.json, 8,192-token micro-batches): within 1% with nothing recomputed, and above the measured
    peak with 26 of 32 layers recomputed (over-predicting is the safe side); and fewer layers recomputed at 16 GiB."""
    p = with_overrides(recipe, **{"train.batch_size": 8, "train.liger_kernels": False})
    compiled = with_overrides(p, **{"train.compile": True})
    none = estimate(LLAMA_7B, compiled, checkpointing=False)
    assert none.tokens_per_micro_batch == 8192 and none.peak_gib == pytest.approx(33.481, rel=0.01)
    partial = estimate(LLAMA_7B, compiled, checkpointing=True, recompute_layers=26)
    assert 11.794 < partial.peak_gib < 11.794 * 1.1
    eager = estimate(LLAMA_7B, p, checkpointing=False)
    assert eager.activations_gib * 0.74 < none.activations_gib < eager.activations_gib * 0.76
    assert plan(LLAMA_7B, compiled, 16).recompute_layers < plan(LLAMA_7B, p, 16).recompute_layers


def test_adaptive_recomputation_recomputes_only_what_each_token_count_needs(recipe):
    """train.adaptive_recompute: the plan for the longest micro-batch, and below it token thresholds where fewer
    recomputed layers still fit the budget with the partial margin; off, pinned or without recomputation, none."""
    from dataclasses import replace

    from tasks.train.memory import PARTIAL_RECOMPUTE_MARGIN, layers_to_recompute

    p = with_overrides(recipe, **{"train.batch_size": 8, "train.liger_kernels": False})
    chosen = plan(LLAMA_7B, p, 16)
    thresholds = chosen.recompute_thresholds
    assert thresholds is not None and len(thresholds) == chosen.recompute_layers + 1
    assert list(thresholds) == sorted(thresholds) and thresholds[-1] >= chosen.tokens_per_micro_batch == 8 * 1024
    assert 0 < thresholds[0] < thresholds[-1]
    for k, most in enumerate(thresholds[:-1]):
        fits = estimate(LLAMA_7B, p, tokens=most, checkpointing=k > 0, recompute_layers=k)
        kept = estimate(LLAMA_7B, p, tokens=most, checkpointing=False).activations_gib * (32 - k) / 32
        assert fits.peak_gib + PARTIAL_RECOMPUTE_MARGIN * kept <= 16 + 1e-3, k
        over = estimate(LLAMA_7B, p, tokens=most + 64, checkpointing=k > 0, recompute_layers=k)
        assert over.peak_gib + PARTIAL_RECOMPUTE_MARGIN * kept * (most + 64) / most > 16, k
    assert layers_to_recompute(thresholds, 1) == 0 and layers_to_recompute(thresholds, 8192) <= chosen.recompute_layers
    assert [layers_to_recompute(thresholds, t) for t in (1000, 3000, 6000, 8192)] == sorted(
        layers_to_recompute(thresholds, t) for t in (1000, 3000, 6000, 8192)
    )
    assert "none up to" in chosen.describe()
    assert plan(LLAMA_7B, with_overrides(p, **{"train.adaptive_recompute": False}), 16).recompute_thresholds is None
    assert plan(LLAMA_7B, with_overrides(p, **{"train.gradient_checkpointing": True}), 16).recompute_thresholds is None
    assert plan(LLAMA_7B, p, 60).recompute_thresholds is None  # fits with nothing recomputed
    fsdp = {"train.distributed.mode": "fsdp", "train.distributed.num_processes": 2}
    assert plan(LLAMA_7B, with_overrides(p, **fsdp), 16).recompute_thresholds is None
    assert replace(chosen, recompute_thresholds=None).describe() != chosen.describe()


def test_adaptive_recomputation_through_the_train_stage(workdir, params, monkeypatch):
    """The train stage with token thresholds: micro-batches over the first threshold recompute the first layer, the
    shorter ones nothing, the loss is the one without recomputation, and metrics record the mean recomputed."""
    from dataclasses import replace

    from transformers import TrainerCallback
    from transformers.modeling_layers import GradientCheckpointingLayer

    import tasks.train.stage
    from tasks.download.stage import download
    from tasks.format.stage import format_rows
    from tasks.validate.stage import validate

    download(params.download)
    validate(params)
    format_rows(params.format, params.model)
    base = with_overrides(
        params, **{"train.max_steps": 6, "train.gradient_checkpointing": False, "train.group_by_length": False}
    )
    tokens = []

    class Tokens(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kw):
            model.register_forward_pre_hook(lambda m, a, kw: tokens.append(kw["input_ids"].numel()), with_kwargs=True)

    none = tasks.train.stage.train(base, extra_callbacks=[Tokens()])
    cut = sorted(tokens)[len(tokens) // 2]  # the median micro-batch: those above it recompute one layer
    assert min(tokens) <= cut < max(tokens)
    monkeypatch.setattr(
        tasks.train.stage,
        "plan",
        lambda shape, p, budget: replace(
            estimate(shape, p, checkpointing=True, recompute_layers=2), recompute_thresholds=(cut, 10**9, 10**9)
        ),
    )
    seen = []

    class Flags(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kw):
            layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
            seen.append(tuple(m.gradient_checkpointing for m in layers))

    adaptive = tasks.train.stage.train(base, extra_callbacks=[Flags()])
    assert seen == [(True, False) if t > cut else (False, False) for t in tokens]
    assert adaptive["recompute_layers"] == 2 and adaptive["gradient_checkpointing"] is True
    assert none["max_micro_batch_tokens"] == adaptive["max_micro_batch_tokens"] == max(tokens)  # the meter's hook
    assert adaptive["recompute_layers_mean"] == pytest.approx(sum(t > cut for t in tokens) / len(tokens), abs=0.01)
    assert adaptive["train_loss"] == pytest.approx(none["train_loss"], rel=1e-6)


@pytest.mark.slow
def test_compiled_layers_with_partial_recomputation_give_eager_gradients():
    """train.compile with the planner's partial layout: each decoder layer compiled in place (dynamic shapes), the
    first recomputed and the others not, gives the eager model's loss and LoRA gradients at three sequence lengths,
    and so does the token-adaptive layout, recomputing 0, 1 and 2 layers by length (inductor's CPU backend here; the
    two layer variants are two graphs, not one per length or per count)."""
    import torch
    import torch._dynamo.utils
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from tasks.train.callbacks import RecomputeSomeLayers
    from tasks.train.compilation import compile_layers

    def build(thresholds=None):
        torch.manual_seed(0)
        config = LlamaConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, vocab_size=100
        )
        model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=4, lora_alpha=8, task_type="CAUSAL_LM"))
        for name, p in model.named_parameters():
            if "lora_B" in name:  # non-zero, so every LoRA weight gets a gradient
                torch.nn.init.normal_(p, std=0.02)
        model.train()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        RecomputeSomeLayers(1 if thresholds is None else 2, thresholds).on_train_begin(None, None, None, model=model)
        return model

    def step(model, ids):
        model.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.item(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    # compiled: token-adaptive, none recomputed at 33 tokens, the first layer at 47, two at 55 (its switch is read
    # outside the compiled forward, so flipping it recompiles nothing); then lengths and recompute counts again
    eager, compiled = build(), build(thresholds=(40, 50, 10**9))
    assert compile_layers(compiled) == 3
    torch._dynamo.utils.counters.clear()
    switches = [m for m in compiled.modules() if hasattr(m, "gradient_checkpointing") and "Decoder" in type(m).__name__]
    recomputed, graphs = [], []
    for length in (33, 47, 55, 61, 36, 49):
        ids = torch.randint(0, 100, (1, length), generator=torch.Generator().manual_seed(length))
        (loss_e, grads_e), (loss_c, grads_c) = step(eager, ids), step(compiled, ids)
        recomputed.append(sum(m.gradient_checkpointing for m in switches))
        graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
        assert loss_c == pytest.approx(loss_e, rel=1e-5)
        assert grads_e.keys() == grads_c.keys() and len(grads_e) == 3 * 2 * 2  # q/v lora_A/B in 3 layers
        for name in grads_e:
            torch.testing.assert_close(grads_c[name], grads_e[name], rtol=1e-4, atol=1e-6)
    assert recomputed == [0, 1, 2, 2, 0, 1]
    # The property, not a count that varies by release: one graph for all layers, traced dynamic, and at most one
    # more for the recomputed path (torch 2.13 with transformers 5.25 traces one; older transformers traced two).
    # Nothing is compiled after the first two steps, whatever the length or the number of recomputed layers.
    assert 1 <= graphs[-1] <= 2 and len(set(graphs[1:])) == 1, graphs


def test_the_planner_reads_each_familys_shape_from_its_config(params):
    """Grouped-query k/v, the vocabulary and tied embeddings come from the config class, not from a table of names:
    Llama-3-8B's 8 k/v heads and 128k vocabulary, Qwen2.5-7B's 152k, and a tied LM head counted once."""
    from transformers import LlamaConfig, Qwen2Config

    llama3 = ModelShape.from_config(
        LlamaConfig(
            hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
            num_key_value_heads=8, vocab_size=128256,
        )
    )  # fmt: skip
    assert llama3.module_shapes()["k_proj"] == (4096, 1024) and llama3.vocab == 128256
    qwen = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28)
    untied = ModelShape.from_config(Qwen2Config(**qwen, num_key_value_heads=4, vocab_size=152064))
    tied = ModelShape.from_config(
        Qwen2Config(**qwen, num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=True)
    )
    assert untied.module_shapes()["v_proj"] == (3584, 512) and tied.tied_embeddings and not untied.tied_embeddings
    one_matrix_gib = 152064 * 3584 * 4 / 2**30  # params' compute dtype is float32 on the CPU preset
    gap = estimate(untied, params).base_weights_gib - estimate(tied, params).base_weights_gib
    assert gap == pytest.approx(one_matrix_gib, abs=2e-3)


def test_mfu_counts_four_times_the_matmul_weights_a_token_against_the_named_gpus_peak():
    from tasks.train.mfu import flops_per_token, mfu

    # Llama-2-7B: 6.61e9 matmul weights (32 layers of q/k/v/o and SwiGLU, the LM head; not the input embedding)
    assert LLAMA_7B.matmul_params == 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008) + 32000 * 4096
    assert flops_per_token(LLAMA_7B) == 4 * LLAMA_7B.matmul_params
    at = mfu(10_000.0, LLAMA_7B, "NVIDIA H100 80GB HBM3")
    assert at["peak_flops"] == 989e12 and at["mfu"] == round(10_000 * 4 * LLAMA_7B.matmul_params / 989e12, 4)
    assert mfu(10_000.0, LLAMA_7B, "cpu")["mfu"] is None  # no peak known: no figure rather than a wrong one


def test_liger_on_an_architecture_it_does_not_patch_is_refused_with_the_setting():
    from tasks.train.preflight import liger_architecture_problem

    patched = frozenset({"llama", "qwen2", "mistral"})  # Liger 0.8's table includes these three families
    assert all(liger_architecture_problem(t, patched) is None for t in ("llama", "qwen2", "mistral"))
    problem = liger_architecture_problem("gpt_neox", patched)
    assert "gpt_neox" in problem and "train.liger_kernels=false" in problem
