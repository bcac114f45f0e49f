"""Padding-free batches: every conversation attends only to itself, and training gives the padded result."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from tasks.common.config import with_overrides
from tasks.train import attention


def _model(impl: str):
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        attn_implementation=impl,
    )
    return LlamaForCausalLM(cfg).eval()


def test_packed_row_matches_each_sequence_alone():
    name = attention.register()
    packed_model, plain_model = _model(name), _model("sdpa")
    plain_model.load_state_dict(packed_model.state_dict())
    seqs = [[5, 17, 3, 9, 44, 2], [7, 7, 12, 60, 31, 8, 19, 2], [11, 4, 2]]
    batch = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)([{"input_ids": s} for s in seqs])
    assert "attention_mask" not in batch and batch["input_ids"].shape == (1, sum(map(len, seqs)))
    with torch.no_grad():
        packed = packed_model(
            input_ids=batch["input_ids"],
            position_ids=batch["position_ids"],
            cu_seq_lens_q=batch["cu_seq_lens_q"],
            cu_seq_lens_k=batch["cu_seq_lens_k"],
            max_length_q=batch["max_length_q"],
            max_length_k=batch["max_length_k"],
        ).logits[0]
        alone = torch.cat([plain_model(input_ids=torch.tensor([s])).logits[0] for s in seqs])
        leaky = plain_model(input_ids=batch["input_ids"]).logits[0]  # one causal row: later sequences see earlier ones
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)
    first = len(seqs[0])
    assert not torch.allclose(leaky[first:], alone[first:], atol=1e-3), "the check must be able to fail"


def test_padded_batches_still_take_the_sdpa_path():
    name = attention.register()
    packed_model, plain_model = _model(name), _model("sdpa")
    plain_model.load_state_dict(packed_model.state_dict())
    ids = torch.tensor([[5, 17, 3, 9], [7, 12, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    with torch.no_grad():
        torch.testing.assert_close(
            packed_model(input_ids=ids, attention_mask=mask).logits,
            plain_model(input_ids=ids, attention_mask=mask).logits,
        )


def test_preflight_names_a_gpu_too_old_for_varlen_attention(monkeypatch, params):
    # A T4 (7.5) as the CUDA device: PyTorch's varlen FlashAttention would fail at the first forward there.
    from tasks.train import preflight

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla T4")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    why = attention.unavailable_reason()
    assert why is not None and "Tesla T4 is 7.5" in why and "train.padding_free=false" in why
    t4_recipe = with_overrides(
        params,
        **{"train.padding_free": True, "train.liger_kernels": False, "train.optimizer": "adamw_torch"},
        **{"train.precision": "bf16"},
    )
    problems = preflight.hardware_problems(t4_recipe)
    assert why in problems and any("no bf16" in p for p in problems)

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))  # an H100 or H200
    assert attention.unavailable_reason() is None


def test_compiled_layers_trace_the_kernel_lookup_without_warnings():
    """The varlen kernel's causal arguments are looked up inside compiled decoder layers: dynamo warned at each
    functools.cache call it traced (three UserWarnings in every compiled GPU run's log) before this was a global."""
    import warnings

    attention._resolve_varlen()

    @torch.compile(backend="eager", fullgraph=True)
    def scaled(x):
        return x * (2 if "window_size" in attention._causal_kwargs(False) else 3)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert scaled(torch.ones(2)).tolist() in ([2.0, 2.0], [3.0, 3.0])
    assert not [w for w in caught if "Dynamo detected" in str(w.message)]


def test_repeated_kv_heads_give_grouped_query_attention():
    """What the CUDA path does for Llama-3/Qwen/Mistral where PyTorch's varlen kernel lacks GQA: repeated k/v heads
    give exactly SDPA's own grouped-query attention."""
    import torch.nn.functional as F

    from tasks.train.attention import repeat_kv_heads

    torch.manual_seed(0)
    q, k, v = torch.randn(7, 8, 16), torch.randn(7, 2, 16), torch.randn(7, 2, 16)  # (tokens, heads, dim)
    k2, v2 = repeat_kv_heads(q, k, v)
    assert k2.shape == q.shape and v2.shape == q.shape
    as_sdpa = lambda *t: [x.transpose(0, 1) for x in t]  # noqa: E731
    grouped = F.scaled_dot_product_attention(*as_sdpa(q, k, v), is_causal=True, enable_gqa=True)
    repeated = F.scaled_dot_product_attention(*as_sdpa(q, k2, v2), is_causal=True)
    torch.testing.assert_close(repeated, grouped)
