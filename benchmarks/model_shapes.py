"""The shapes the benchmarks build random-weight models of, and the planner's tests plan for (no weights): the
config.json values of each family's base (model_type names its transformers config class)."""

# config.json of meta-llama/Llama-2-7b-chat-hf (and NousResearch/Llama-2-7b-chat-hf)
LLAMA2_7B_CHAT = dict(
    model_type="llama",
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
# config.json of meta-llama/Llama-3.1-8B-Instruct (NousResearch/Meta-Llama-3.1-8B-Instruct): grouped-query attention
# (8 k/v heads), a 128,256-token vocabulary, Llama-3.1's RoPE scaling
LLAMA31_8B_INSTRUCT = dict(
    model_type="llama",
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=131072,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192
    ),
    hidden_act="silu",
    initializer_range=0.02,
    tie_word_embeddings=False,
    attention_bias=False,
)

# config.json of Qwen/Qwen2.5-7B-Instruct: 4 k/v heads of 28, q/k/v biases (Qwen2's config class), 152,064 logits
QWEN25_7B_INSTRUCT = dict(
    model_type="qwen2",
    vocab_size=152064,
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    max_position_embeddings=32768,
    rms_norm_eps=1e-6,
    rope_theta=1000000.0,
    hidden_act="silu",
    initializer_range=0.02,
    tie_word_embeddings=False,
    use_sliding_window=False,
)

# config.json of mistralai/Mistral-7B-Instruct-v0.3: Llama-3.1-8B's decoder (8 k/v heads of 32, 14,336 SwiGLU) with a
# 32,768-token vocabulary, plain RoPE at theta 1e6 and no sliding window
MISTRAL_7B_INSTRUCT_V03 = {
    **{k: v for k, v in LLAMA31_8B_INSTRUCT.items() if k not in ("rope_scaling", "attention_bias")},
    "model_type": "mistral",
    "vocab_size": 32768,
    "max_position_embeddings": 32768,
    "rope_theta": 1000000.0,
    "sliding_window": None,
}


def smoke_of(shape: dict) -> dict:
    """A 2-layer model of the same family and vocabulary, for a CPU run of the benchmark scripts."""
    heads = 4
    kv = heads // (shape["num_attention_heads"] // shape["num_key_value_heads"]) or 1
    return {**shape, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": heads, "num_key_value_heads": kv}  # fmt: skip


SHAPES = {
    "llama2-7b": LLAMA2_7B_CHAT,
    "llama3-8b": LLAMA31_8B_INSTRUCT,
    "qwen2.5-7b": QWEN25_7B_INSTRUCT,
    "mistral-7b": MISTRAL_7B_INSTRUCT_V03,
    "smoke": SMOKE,
    "smoke-llama3": smoke_of(LLAMA31_8B_INSTRUCT),
    "smoke-qwen2": smoke_of(QWEN25_7B_INSTRUCT),
    "smoke-mistral": smoke_of(MISTRAL_7B_INSTRUCT_V03),
}
# The chat-template family of each shape's base (tasks/common/tiny_families.py: its template, special tokens and
# tokenizer kind); Llama-2 shapes use the real Llama-2 tokenizer instead.
FAMILY = {"llama3": "tiny-llama3", "qwen2": "tiny-qwen2", "mistral": "tiny-mistral"}


def family_of(shape_name: str) -> str | None:
    """The tiny_families family whose tokenizer a base of this shape gets (None: Llama-2's own)."""
    return next((family for key, family in FAMILY.items() if key in shape_name.replace(".5", "")), None)
