"""train.compile: one graph for every decoder layer, no recompilation as lengths change, the cache folder, and
`auto`'s decision (tasks/train/compilation.py). Dynamo's graph counting is the same on the CPU as on a GPU; the
aot_eager backend traces forward and backward as inductor would, without generating code."""

from __future__ import annotations

import os

import pytest
import torch

from tasks.common.config import with_overrides
from tasks.train import compilation
from tasks.train.memory import ModelShape

LLAMA_7B = ModelShape(hidden=4096, intermediate=11008, layers=32, heads=32, kv_heads=32, vocab=32000)


def tiny_peft_llama(layers: int = 4):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
        use_cache=False,
    )
    model = get_peft_model(
        LlamaForCausalLM(config),
        LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    model.train()
    return model


def _graphs_after_each(lengths: tuple[int, ...]):
    """A fresh tiny model with its layers compiled (aot_eager), trained one step on each length in turn: dynamo's
    graph count after each step, and the model."""
    import torch._dynamo.utils

    torch._dynamo.reset()
    model = tiny_peft_llama()
    assert compilation.compile_layers(model, backend="aot_eager") == 4
    torch._dynamo.utils.counters.clear()
    graphs = []
    for length in lengths:
        ids = torch.randint(0, 100, (1, length), generator=torch.Generator().manual_seed(length))
        model(input_ids=ids, labels=ids).loss.backward()
        graphs.append(compilation.compiled_graphs())
    return graphs, model


def test_every_decoder_layer_shares_one_graph_and_new_lengths_recompile_nothing():
    """The first layer's input needs no gradient (frozen embeddings), the others' do: without asking for the
    embedding output's gradient, the first layer was a second graph (counted 2 before the fix). Now one graph
    serves all four layers, traced once, and five different lengths add none."""
    import torch._dynamo.utils

    graphs, model = _graphs_after_each((33, 47, 12, 64, 50))
    assert graphs == [1] * 5, graphs
    # traced once: no restart of dynamo's analysis over Python floats (compile_settings' specialize_float; it was 2)
    assert torch._dynamo.utils.counters["aot_autograd"]["total"] == 1
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_" in n)


def test_a_first_micro_batch_of_hidden_size_tokens_recompiles_nothing():
    """Duck shaping gave a first length equal to hidden_size (64 here, 4096 on Llama-2-7B) the weights' static
    symbol, and every later length recompiled ([1, 2, 2] before compile_settings turned it off)."""
    hidden_size = tiny_peft_llama(layers=1).config.hidden_size
    graphs, _ = _graphs_after_each((hidden_size, 33, 47))
    assert graphs == [1, 1, 1], graphs


def _recomputing_run(compiled: bool, recomputed_per_step: tuple[int, ...], reentrant: bool):
    """A tiny model in training mode (dropout off, so eager and compiled runs compare exactly) whose first k decoder
    layers recompute at each step, as the planner's RecomputeSomeLayers sets them; each step's loss and gradients."""
    import torch._dynamo.utils
    from transformers.modeling_layers import GradientCheckpointingLayer

    torch._dynamo.reset()
    model = tiny_peft_llama()
    for name, p in model.named_parameters():
        if "lora_B" in name:  # non-zero, so gradients reach lora_A too
            torch.nn.init.normal_(p, std=0.02)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    if compiled:
        compilation.compile_layers(model, backend="aot_eager")
    torch._dynamo.utils.counters.clear()
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    steps = []
    for step, recomputed in enumerate(recomputed_per_step):
        for index, layer in enumerate(layers):
            layer.gradient_checkpointing = index < recomputed
        ids = torch.randint(0, 100, (1, 30 + step), generator=torch.Generator().manual_seed(step))
        model.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        steps.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    return steps, compilation.compiled_graphs(), compilation.graph_breaks()


@pytest.mark.parametrize("reentrant", [False, True])
def test_recomputed_layers_run_eagerly_recompile_nothing_and_give_the_eager_loss_and_gradients(reentrant):
    """Inside torch.utils.checkpoint the attention's context-variable set (the `kernels` package's wrapper) is a side
    effect dynamo refuses: a recomputed layer breaks the graph and runs eagerly, the others share the one compiled
    graph, and any number of layers recomputed per step recompiles nothing. Skipping the side effect compiled them here
    but failed inductor's partitioner on an H100 (compile_settings), so this pins the eager recomputation: one graph,
    one break (two graphs and no break would mean the skip came back), eager's loss and gradients at every step."""
    schedule = (0, 2, 4, 1, 0)
    eager, _, _ = _recomputing_run(False, schedule, reentrant)
    compiled, graphs, breaks = _recomputing_run(True, schedule, reentrant)
    assert (graphs, breaks) == (1, 1)
    for (eager_loss, eager_grads), (loss, grads) in zip(eager, compiled, strict=True):
        assert loss == pytest.approx(eager_loss, rel=1e-6)
        assert grads.keys() == eager_grads.keys() and len(grads) == 4 * 2 * 2  # lora_A/B of q and v, 4 layers
        for name in grads:
            torch.testing.assert_close(grads[name], eager_grads[name], rtol=1e-5, atol=1e-7)


def test_the_cache_folder_is_the_workspaces_per_library_versions_unless_the_user_chose_one(tmp_path, monkeypatch):
    monkeypatch.delenv(compilation.CACHE_ENV, raising=False)
    folder = compilation.use_cache_folder(tmp_path / "cache")
    assert folder.parent == tmp_path / "cache" and folder.name == compilation.library_key()
    assert os.environ[compilation.CACHE_ENV] == str(folder)
    monkeypatch.delenv(compilation.CACHE_ENV)
    monkeypatch.setenv(compilation.CACHE_ENV, str(tmp_path / "mine"))
    assert compilation.use_cache_folder(tmp_path / "cache") == tmp_path / "mine"  # the user's wins
    assert not compilation._compiled_before(tmp_path / "mine", "abc")
    (tmp_path / "mine").mkdir()
    compilation.remember_compiled(tmp_path / "mine", "abc")
    compilation.remember_compiled(tmp_path / "mine", "abc")
    compilation.remember_compiled(tmp_path / "mine", "def")
    mine = tmp_path / "mine"
    assert compilation._compiled_before(mine, "abc") and compilation._compiled_before(mine, "def")


def test_auto_weighs_the_planned_run_against_the_compile_cost():
    """The 1k-row recipe on an H100 (about 464k tokens) against a 10k-row run, with an empty and a warm cache."""
    h100 = 989e12
    small_cold = compilation.weigh(464_000, LLAMA_7B, h100, warm=False)
    small_warm = compilation.weigh(464_000, LLAMA_7B, h100, warm=True)
    large_cold = compilation.weigh(4_640_000, LLAMA_7B, h100, warm=False)
    assert small_warm.saving_s == small_cold.saving_s and 0 < small_cold.saving_s < large_cold.saving_s
    assert large_cold.saving_s == pytest.approx(10 * small_cold.saving_s, abs=0.6)  # seconds are rounded to 0.1
    assert large_cold.on and "on" in large_cold.reason and "empty cache" in large_cold.reason
    assert small_warm.cost_s < small_cold.cost_s
    assert small_cold.on is (small_cold.saving_s > compilation.COMPILE_COST_COLD_S)
    # the recipe's epoch as measured on an H100 (compile_h100_c2f95d5): compiling from an empty cache lost (44.6 s
    # against 40.6 and 43.8 s eager), from a warm one won (36.0 s): auto decides so
    recipe_cold = compilation.weigh(398_365, LLAMA_7B, h100, warm=False)
    recipe_warm = compilation.weigh(398_365, LLAMA_7B, h100, warm=True)
    assert not recipe_cold.on and recipe_warm.on, (recipe_cold.reason, recipe_warm.reason)
    # two processes share the tokens: each runs half as long, so saves half as much
    assert compilation.weigh(4_640_000, LLAMA_7B, h100, warm=False, world_size=2).saving_s == pytest.approx(
        large_cold.saving_s / 2, abs=0.1
    )


def test_pinned_settings_pass_through_and_auto_is_off_without_a_gpu(params):
    on = compilation.decide(with_overrides(params, **{"train.compile": True}), LLAMA_7B, 10**6)
    off = compilation.decide(with_overrides(params, **{"train.compile": False}), LLAMA_7B, 10**9)
    assert (on.on, on.setting, off.on, off.setting) == (True, "true", False, "false")
    if torch.cuda.is_available():
        pytest.skip("the no-GPU decision is for a machine without CUDA")
    auto = compilation.decide(with_overrides(params, **{"train.compile": "auto"}), LLAMA_7B, 10**9)
    assert not auto.on and auto.setting == "auto" and "no CUDA GPU" in auto.reason


def test_the_meter_reports_the_first_steps_overhead_and_recompilations():
    meter = compilation.CompileMeter()
    assert meter.report([0.1]) == {}  # no step ran
    meter.on_step_begin(None, None, None)
    meter.on_step_end(None, None, None)
    meter.on_train_end(None, None, None)
    report = meter.report([0.0, 0.0, 0.0])
    assert report["recompilations_after_first_step"] == 0 and report["first_step_seconds"] >= 0
    assert report["graph_breaks"] == compilation.graph_breaks()
    assert report["first_step_overhead_seconds"] == report["first_step_seconds"]


def test_a_compiled_run_record_that_cannot_be_written_only_warns(tmp_path, caplog):
    """The record is advisory: a folder it cannot be written into (here a file in its place) leaves a warning."""
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("x")
    compilation.remember_compiled(blocked, "abc")
    assert "could not record" in caplog.text and blocked.read_text() == "x"
