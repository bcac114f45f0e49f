"""The base model and its tokenizer: the tiny local default, a Hub id, or a local directory.

All three go through the same `from_pretrained` + `BitsAndBytesConfig` path, so the CPU default
exercises the exact code a GPU run of Llama-2-7b-chat uses. The tiny default ("tiny-llama") is
built here on first use, deterministically: a SentencePiece BPE tokenizer trained on the shipped
sample (like Llama-2's own tokenizer.model) and a 2-layer Llama with seeded random weights.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from tasks.common import paths, tiny_families
from tasks.common.artifacts import read_json, read_jsonl, sha256_file, sha256_text, staged_dir, write_json
from tasks.common.chat_template import BUILT_IN, LLAMA2_JINJA
from tasks.common.config import ModelParams, QuantParams
from tasks.common.errors import PipelineError

log = logging.getLogger(__name__)

TINY = "tiny-llama"
TINY_CONFIG = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)
TINY_VOCAB = 1024
BUILD_RECORD = "build.json"


def _sample_corpus() -> list[str]:
    from tasks.common.conversation import parse_row

    rows = read_jsonl(paths.SAMPLE_DATA)
    return [BUILT_IN["llama2"].render(parse_row(r)).text for r in rows]


def tiny_fingerprint() -> str:
    """What the tiny model is a function of: the sample it learns its tokenizer from, and its shape."""
    return sha256_text(sha256_file(paths.SAMPLE_DATA) + json.dumps([TINY_CONFIG, TINY_VOCAB], sort_keys=True))


def build_tiny_base(out_dir: Path = paths.TINY_BASE_DIR) -> Path:
    """Build the tiny Llama (tokenizer + random weights) into `out_dir`, atomically."""
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaTokenizer

    with staged_dir(out_dir) as tmp:
        (tmp / "tokenizer.model").write_bytes(tiny_families.sentencepiece_bpe(_sample_corpus(), TINY_VOCAB))
        tok = LlamaTokenizer.from_pretrained(tmp)
        tok.chat_template = LLAMA2_JINJA
        tok.save_pretrained(tmp)
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=len(tok), bos_token_id=1, eos_token_id=2, **TINY_CONFIG)
        LlamaForCausalLM(config).save_pretrained(tmp)
        write_json(tmp / BUILD_RECORD, {"fingerprint": tiny_fingerprint()})
    log.info("built the tiny base model in %s", out_dir)
    return out_dir


def is_tiny_base(name: str) -> bool:
    """Whether `name` is one of the tiny random-weight bases built here (tiny-llama, tiny_families.py's)."""
    return name == TINY or name in tiny_families.FAMILIES


def resolve_base(model: ModelParams) -> str:
    """Where to load the base from: the built tiny model's directory, a local directory, or a Hub id."""
    if model.base == TINY:
        record = paths.TINY_BASE_DIR / BUILD_RECORD
        if not record.exists() or read_json(record).get("fingerprint") != tiny_fingerprint():
            build_tiny_base()
        return str(paths.TINY_BASE_DIR)
    if model.base in tiny_families.FAMILIES:
        return str(tiny_families.resolve(model.base))
    if model.base.startswith((".", "/", "~")) and not Path(model.base).expanduser().is_dir():
        raise PipelineError(f"model.base {model.base!r} looks like a local path but is not a directory.")
    return model.base


def cached_commit(model: ModelParams) -> str | None:
    """The commit of a Hub base that the Hugging Face cache holds for model.revision (a branch or tag through refs/,
    a sha as is): the snapshot from_pretrained read, offline or after it downloaded. Read from the cache, not asked
    of the Hub, so the lineage names what was loaded. None for a local or tiny base, or one the cache lacks."""
    where = resolve_base(model)
    if Path(where).expanduser().exists():
        return None
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(where, "config.json", revision=model.revision)
    except ValueError:  # not a repo id
        return None
    return Path(found).parent.name if isinstance(found, str) else None


def _named(model: ModelParams, where: str) -> str:
    """What a load error names: a local path as given; a Hub id with the revision asked for and, offline, where to
    get it (only the Hugging Face cache is read then, and it may hold other revisions or none)."""
    if Path(where).expanduser().exists():
        return repr(where)
    from huggingface_hub import constants

    named = f"{where!r} at revision {model.revision or 'main'}"
    if constants.is_offline_mode():
        pin = f" --revision {model.revision}" if model.revision else ""
        named += (
            f" (offline: only the Hugging Face cache {constants.HF_HUB_CACHE} is read; download it there once online "
            f"with `hf download {where}{pin}`, or set model.revision to one the cache holds)"
        )
    return named


def load_tokenizer(model: ModelParams):
    """The base model's tokenizer, with a pad token distinct from EOS (padding is masked out of the loss)."""
    from transformers import AutoTokenizer, LlamaTokenizer

    where = model.tokenizer or resolve_base(model)
    local = Path(where).expanduser()
    try:
        if local.name == "tokenizer.model" and local.is_file():
            local = local.parent
        if local.is_dir() and not (local / "tokenizer.json").exists() and (local / "tokenizer.model").exists():
            tok = LlamaTokenizer.from_pretrained(local)  # a bare SentencePiece file, as Meta ships it
        else:
            tok = AutoTokenizer.from_pretrained(where, revision=None if local.exists() else model.revision)
    except (OSError, ValueError) as e:
        raise PipelineError(
            f"could not load the tokenizer from {_named(model, where)}: {e}. Point model.tokenizer at a directory with "
            "tokenizer.json or tokenizer.model, or model.base at a reachable Hub id."
        ) from None
    if tok.pad_token is None or tok.pad_token_id == tok.eos_token_id:
        # Padding with EOS and masking pads would also mask the real EOS: use <unk> as the pad, or one of the
        # tokenizer's own reserved tokens where it has no <unk> (byte-level BPE: Llama-3, Qwen).
        tok.pad_token = tok.unk_token or _spare_special_token(tok)
    return tok


def _spare_special_token(tok) -> str | None:
    """A special token of the tokenizer that no chat template writes (Llama-3's <|finetune_right_pad_id|> or a
    <|reserved_special_token_N|>, Qwen's <|endoftext|>), to pad with; None if it has none."""
    for name in ("<|finetune_right_pad_id|>", "<|endoftext|>", "<|reserved_special_token_0|>", "<pad>"):
        if name in tok.get_vocab() and name != tok.eos_token:
            return name
    return None


def load_config(model: ModelParams):
    """The base's config.json alone (no weights): what the memory planner reads."""
    from transformers import AutoConfig

    where = resolve_base(model)
    try:
        return AutoConfig.from_pretrained(where, revision=None if Path(where).exists() else model.revision)
    except OSError as e:
        raise PipelineError(f"could not read the config of base model {_named(model, where)}: {e}") from None


def compute_dtype(quant: QuantParams) -> torch.dtype:
    return getattr(torch, quant.compute_dtype)


def load_base_model(
    model: ModelParams,
    quant: QuantParams,
    device: str | None = None,
    attn_implementation: str = "sdpa",
    gpu: int = 0,
    fsdp: bool = False,
):
    """Load the base for training or evaluation: 4-bit NF4 through bitsandbytes when quant.load_in_4bit.

    gpu: the CUDA device to load onto (a DDP rank loads its own copy onto its own GPU: accelerate refuses to train a
    4-bit model on another device than the rank's). fsdp: FSDP-QLoRA as bitsandbytes/PEFT document it: no
    device_map (FSDP places the shards) and the 4-bit weights stored in the model's float dtype
    (bnb_4bit_quant_storage) so FSDP can flatten and shard them with the rest; float32 under fp16, as PEFT's guide asks.
    """
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = compute_dtype(quant)
    storage = (torch.float32 if dtype == torch.float16 else dtype) if fsdp else None
    kwargs: dict = {
        "dtype": storage or dtype,
        "attn_implementation": attn_implementation,
        "device_map": None if fsdp else {"": gpu} if device == "cuda" else "cpu",
        # transformers 5 swaps layers for Hub kernels (the `kernels` package) by default whenever it is installed:
        # code fetched from the Hub at load time, unpinned and unrecorded, and on an offline GPU machine a crash
        # ("not available in the local cache"). The recipe's speed levers are its own (train.*), so: off.
        "use_kernels": False,
    }
    if quant.load_in_4bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quant.quant_type,
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_use_double_quant=quant.double_quant,
            **({"bnb_4bit_quant_storage": storage} if fsdp else {}),
        )
    where = resolve_base(model)
    try:
        return AutoModelForCausalLM.from_pretrained(
            where, revision=None if Path(where).exists() else model.revision, **kwargs
        )
    except OSError as e:
        raise PipelineError(f"could not load the base model {_named(model, where)}: {e}") from None
