"""train.sync_free_step (tasks/step_overlap.py): the same optimizer updates and token counts, without the waits."""

from __future__ import annotations

import bitsandbytes as bnb
import bitsandbytes.optim.optimizer as bnb_optimizer
import pytest
import torch
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from tasks.step_overlap import drop_optimizer_syncs, host_token_count, trainer_class


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
