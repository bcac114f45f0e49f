"""train.sync_free_step (tasks/train/step_overlap.py): the same optimizer updates and token counts, without the
waits."""

from __future__ import annotations

import bitsandbytes as bnb
import bitsandbytes.optim.optimizer as bnb_optimizer
import pytest
import torch
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from tasks.train.step_overlap import drop_optimizer_syncs, host_token_count, trainer_class


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    # one above bitsandbytes' 1e5-element threshold for paged state, one below
    return [torch.nn.Parameter(torch.randn(400, 300, generator=g)), torch.nn.Parameter(torch.randn(64, generator=g))]


def _train(optimizer, params, steps: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        optimizer.step()
    return [p.detach().clone() for p in params]


@pytest.mark.parametrize("cls", [bnb.optim.PagedAdamW32bit, bnb.optim.AdamW32bit])
def test_bitsandbytes_step_without_synchronize_updates_the_same(cls, monkeypatch):
    """Same parameters after three steps as bitsandbytes' own step, which waits after every parameter; ours never."""
    waits = []
    monkeypatch.setattr(bnb_optimizer, "sync_gpu", lambda t: waits.append(t))
    kwargs = {"lr": 2e-4, "weight_decay": 0.001}
    stock_params, ours_params = _params(), _params()
    stock = _train(cls(stock_params, **kwargs), stock_params)
    stock_waits = len(waits)
    ours_optimizer = cls(ours_params, **kwargs)
    assert drop_optimizer_syncs(ours_optimizer)
    ours = _train(ours_optimizer, ours_params)
    assert stock_waits >= 3 * len(stock_params)  # what is removed: a wait per parameter per step
    assert len(waits) == stock_waits  # none from ours
    for a, b in zip(stock, ours):
        assert torch.equal(a, b)
    assert not torch.equal(ours[0], _params()[0])  # it did train


def test_other_optimizers_are_left_alone():
    optimizer = torch.optim.AdamW(_params())
    assert not drop_optimizer_syncs(optimizer)
    assert "step" not in vars(optimizer)


def test_tokens_of_a_padding_free_batch_are_read_off_its_shape():
    rows = [{"input_ids": [1, 5, 6, 7]}, {"input_ids": [1, 8]}, {"input_ids": [1, 9, 10]}]
    flat = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(rows)
    assert host_token_count(flat) == 9 == int((flat["input_ids"] != -1).sum())
    padded = DataCollatorForLanguageModeling(pad_token_id=0)(rows)
    assert host_token_count(padded) is None  # padded: the Trainer counts the attention mask itself


def test_trainer_class_follows_the_param():
    from trl import SFTTrainer

    assert trainer_class(False) is SFTTrainer
    fast = trainer_class(True)
    assert issubclass(fast, SFTTrainer) and fast is not SFTTrainer
    assert "_track_num_input_tokens" in vars(fast) and "create_optimizer" in vars(fast)


def _log_history(
    trainer_cls, tmp_path, compact: bool, monkeypatch, tokenizer, pad_to_multiple_of=None, state=None
) -> tuple[list[dict], float]:
    """Four steps of a tiny Llama with LoRA through trainer_cls on answer-only, padding-free micro-batches: the log
    lines with a loss, and the Trainer's FLOP count (its state and collator into `state`, if given)."""
    import trl.trainer.utils as trl_utils
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import SFTConfig

    # compact: trl's fused LM head picks the labelled positions, as it does on a GPU (here with its torch tiles)
    monkeypatch.setattr(trl_utils, "_use_triton", lambda device: compact)
    torch.manual_seed(0)
    # tied embeddings and rows that mostly repeat one token: the untrained model often predicts the token it just
    # read, so token accuracy is not always zero and its averaging is checked too
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, tie_word_embeddings=True
    )
    config.vocab_size = len(tokenizer)
    g = torch.Generator().manual_seed(3)
    rows = []
    for i, n in enumerate((9, 14, 6, 11, 17, 8, 12, 10)):
        ids = [10 + i] * n
        ids[n // 3] = int(torch.randint(3, 100, (1,), generator=g))
        rows.append({"input_ids": ids, "labels": [-100] * (n // 2) + ids[n // 2 :]})  # loss on the "answer" only
    args = SFTConfig(
        output_dir=str(tmp_path / trainer_cls.__name__),
        max_steps=4,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        logging_steps=2,
        padding_free=True,
        pad_to_multiple_of=pad_to_multiple_of,
        include_num_input_tokens_seen="non_padding",  # as the stage counts
        max_length=None,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        seed=0,
        data_seed=0,
    )
    trainer = trainer_cls(
        model=LlamaForCausalLM(config),
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, task_type="CAUSAL_LM"),
    )
    trainer.train()
    if state is not None:
        state.update(tokens_seen=trainer.state.num_input_tokens_seen, collator=trainer.data_collator, rows=rows)
    return [h for h in trainer.state.log_history if "loss" in h], trainer.state.total_flos


def test_sync_free_loss_logs_what_trl_logs(workdir, params, monkeypatch):
    """The sync-free loss through a whole (short) training run: the same losses, entropy, token accuracy and token
    counts at every log line as trl's compute_loss with its compacting LM head; and it was the path taken."""
    import tasks.train.step_overlap

    taken = []
    applies = tasks.train.step_overlap.sync_free_loss_applies
    monkeypatch.setattr(
        tasks.train.step_overlap, "sync_free_loss_applies", lambda *a: taken.append(applies(*a)) or taken[-1]
    )
    from transformers.modeling_utils import ModuleUtilsMixin
    from trl import SFTTrainer

    from tasks.common.base_model import load_tokenizer

    counts = []  # the Trainer's FLOP estimate counts the model's parameters: at every step in trl, once in ours
    count = ModuleUtilsMixin.num_parameters
    monkeypatch.setattr(ModuleUtilsMixin, "num_parameters", lambda *a, **k: counts.append(1) or count(*a, **k))
    from accelerate import Accelerator

    clipped = []  # how many parameters the clipping is handed: every one in trl, the trainable ones in ours
    clip = Accelerator.clip_grad_norm_

    def counting_clip(self, parameters, *a, **k):
        parameters = list(parameters)
        clipped.append(len(parameters))
        return clip(self, parameters, *a, **k)

    monkeypatch.setattr(Accelerator, "clip_grad_norm_", counting_clip)
    tok = load_tokenizer(params.model)
    stock, stock_flos = _log_history(SFTTrainer, workdir, compact=True, monkeypatch=monkeypatch, tokenizer=tok)
    stock_counts, stock_clipped = len(counts), clipped[:]
    clipped.clear()
    ours, ours_flos = _log_history(trainer_class(True), workdir, compact=True, monkeypatch=monkeypatch, tokenizer=tok)
    assert ours_flos == stock_flos > 0
    assert stock_counts >= 4 and len(counts) - stock_counts == 1
    assert len(stock_clipped) == len(clipped) == 4 and set(clipped) == {8} and min(stock_clipped) > 8  # LoRA's 8
    assert taken == [True] * 4
    assert len(stock) == len(ours) == 2
    for a, b in zip(stock, ours):
        for key in ("loss", "entropy", "mean_token_accuracy", "num_tokens", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), key
    assert stock[0]["loss"] != stock[1]["loss"]  # it trained
    assert 0 < stock[0]["mean_token_accuracy"] < 1


def test_train_call_is_skipped_only_when_it_would_change_nothing(monkeypatch):
    from tasks.train.step_overlap import ModelWalk, train_call_skipped

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Sequential(torch.nn.Dropout(0.1)))
    walk = ModelWalk(model)
    walked = []
    original = torch.nn.Module.train
    monkeypatch.setattr(torch.nn.Module, "train", lambda self, mode=True: walked.append(self) or original(self, mode))
    with train_call_skipped(model, walk):
        assert model.train() is model
    assert walked == []  # every module trained already: no walk
    model[1][0].eval()  # one module switched to eval (as an evaluation would)
    walked.clear()
    with train_call_skipped(model, walk):
        model.train()
    assert model[1][0].training and len(walked) == 4  # the stock walk ran and set it back
    assert "train" not in model.__dict__


def test_zero_grad_clears_the_trainable_gradients():
    from tasks.train.step_overlap import ModelWalk

    model = torch.nn.Linear(3, 2)
    model.bias.requires_grad_(False)
    model(torch.ones(1, 3)).sum().backward()
    assert model.weight.grad is not None and model.bias.grad is None
    ModelWalk(model).zero_grad()
    assert model.weight.grad is None


def test_micro_batches_padded_onto_the_grid_train_the_same(workdir, params, monkeypatch):
    """train.gemm_warmup's padding (trl's pad_to_multiple_of, one-token sequences labelled -100): the same losses,
    metrics and gradient norms as unpadded micro-batches, and the padding counted in no token figure."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tasks.common.base_model import load_tokenizer
    from tasks.train.step_overlap import REAL_TOKENS

    tok = load_tokenizer(params.model)
    plain_state, padded_state = {}, {}
    plain, _ = _log_history(trainer_class(True), workdir, True, monkeypatch, tok, state=plain_state)
    padded, _ = _log_history(trainer_class(True), workdir, True, monkeypatch, tok, 16, state=padded_state)
    # float32 sums a longer row in another order, and Adam carries that on; in float64 one step's loss and gradients
    # agree to 1e-10 (below)
    for a, b in zip(plain, padded, strict=True):
        for key in ("loss", "entropy", "mean_token_accuracy", "num_tokens", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-3), key
    rows = plain_state["rows"]
    assert padded_state["tokens_seen"] == plain_state["tokens_seen"] == sum(len(r["input_ids"]) for r in rows)
    batch = padded_state["collator"](rows[:3])  # 9 + 14 + 6 tokens
    assert batch["input_ids"].shape[-1] == 32 and batch[REAL_TOKENS] == 29
    assert (batch["labels"][0, 29:] == -100).all() and (batch["position_ids"][0, 29:] == 0).all()

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    config.vocab_size = len(tok)
    model = LlamaForCausalLM(config).double().eval()
    losses, grads = [], []
    for collator in (plain_state["collator"], padded_state["collator"]):
        model.zero_grad()
        inputs = {k: v for k, v in collator(rows[:3]).items() if k in ("input_ids", "labels", "position_ids")}
        loss = model(**inputs).loss
        loss.backward()
        losses.append(loss.item())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert losses[0] == pytest.approx(losses[1], rel=1e-12, abs=0)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-12)


def test_lm_head_without_compaction_is_scoped():
    import trl.trainer.utils as trl_utils

    from tasks.train.step_overlap import lm_head_without_compaction

    original = trl_utils._use_triton
    with lm_head_without_compaction():
        assert trl_utils._use_triton(torch.device("cuda")) is False
    assert trl_utils._use_triton is original


def test_the_packed_sequence_check_reads_nothing_and_the_forward_is_the_same(monkeypatch):
    """transformers' check reads the GPU to answer None for a row of one sequence; inside, it returns the sequence ids
    unread, and the padding-free forward gives the same logits for rows of one and of two sequences."""
    import transformers.masking_utils as masking_utils

    tracing_when_checked = []  # what the check saw of is_tracing, at each call the model's forward made
    stock_check = masking_utils.find_packed_sequence_indices

    def recorded_check(position_ids):
        tracing_when_checked.append(masking_utils.is_tracing(position_ids))
        return stock_check(position_ids)

    monkeypatch.setattr(masking_utils, "find_packed_sequence_indices", recorded_check)
    from transformers import LlamaConfig, LlamaForCausalLM

    from tasks.train import attention
    from tasks.train.step_overlap import packed_check_without_host_read

    check, is_tracing = masking_utils.find_packed_sequence_indices, masking_utils.is_tracing
    one_sequence = torch.arange(6).unsqueeze(0)
    assert check(one_sequence) is None
    with packed_check_without_host_read():
        ids = masking_utils.find_packed_sequence_indices(one_sequence)
        assert torch.equal(ids, torch.zeros_like(ids))
        assert masking_utils.is_tracing is is_tracing  # overridden only for the check's own call
    assert masking_utils.find_packed_sequence_indices is check

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=50, use_cache=False
    )
    model = LlamaForCausalLM(config).eval()
    model.config._attn_implementation = attention.register()
    for lengths in ([7], [4, 3]):
        positions = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
        bounds = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
        inputs = dict(
            input_ids=torch.randint(0, 50, (1, sum(lengths)), generator=torch.Generator().manual_seed(1)),
            position_ids=positions,
            cu_seq_lens_q=bounds,
            cu_seq_lens_k=bounds,
            max_length_q=max(lengths),
            max_length_k=max(lengths),
        )
        tracing_when_checked.clear()
        with torch.no_grad():
            stock = model(**inputs).logits
            with packed_check_without_host_read():
                unread = model(**inputs).logits
        assert torch.equal(stock, unread), lengths
        assert tracing_when_checked == [False, True], lengths  # the forward went through the check, unread inside
