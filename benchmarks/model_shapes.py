"""Llama shapes the benchmarks build random-weight models of, and the planner's tests plan for (no weights)."""

# config.json of meta-llama/Llama-2-7b-chat-hf (and NousResearch/Llama-2-7b-chat-hf)
LLAMA2_7B_CHAT = dict(
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    hidden_act="silu",
    initializer_range=0.02,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    attention_bias=False,
)

# A tiny model of the same family, for a CPU smoke run of the benchmark scripts.
SMOKE = {
    **LLAMA2_7B_CHAT,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
}
SHAPES = {"llama2-7b": LLAMA2_7B_CHAT, "smoke": SMOKE}
