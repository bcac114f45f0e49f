"""Tiny random-weight bases of the other families, built offline on first use like tiny-llama (base_model.py).

`model.base: tiny-llama3 | tiny-qwen2 | tiny-mistral` gives a 2-layer model of that architecture's own config class
(Llama with grouped-query attention as Llama-3, Qwen2 with its q/k/v biases, Mistral), and a tokenizer learned from
the shipped sample that carries the family's special tokens and chat template: byte-level BPE for Llama-3 and
Qwen (as theirs are), SentencePiece BPE for Mistral. They load through the same from_pretrained +
BitsAndBytesConfig path as the real 8B/7B bases, so the CPU runs every stage with the family's real code and
template; only the sizes are small.
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from tasks.common import paths
from tasks.common.artifacts import read_json, read_jsonl, sha256_file, sha256_text, staged_dir, write_json
from tasks.common.chat_template import BUILT_IN

log = logging.getLogger(__name__)

BUILD_RECORD = "build.json"
VOCAB = 1024
SHAPE = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4)


@dataclass(frozen=True)
class Family:
    architecture: str  # the transformers config class's model_type
    template: str  # the built-in chat template the tokenizer carries
    tokenizer: str  # "bytelevel" (Llama-3, Qwen) or "sentencepiece" (Mistral)
    bos: str | None
    eos: str  # the end of an assistant turn, as the family's instruct tokenizer sets it
    pad: str
    special: tuple[str, ...]  # every special token, bos/eos/pad included
    config: dict = field(default_factory=dict)


FAMILIES = {
    "tiny-llama3": Family(
        "llama",
        "llama3",
        "bytelevel",
        bos="<|begin_of_text|>",
        eos="<|eot_id|>",
        pad="<|finetune_right_pad_id|>",
        special=(
            "<|begin_of_text|>",
            "<|end_of_text|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eot_id|>",
            "<|finetune_right_pad_id|>",
        ),
        config=dict(num_key_value_heads=2, rope_theta=500000.0, tie_word_embeddings=False),
    ),
    "tiny-qwen2": Family(
        "qwen2",
        "chatml",
        "bytelevel",
        bos=None,
        eos="<|im_end|>",
        pad="<|endoftext|>",
        special=("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
        config=dict(num_key_value_heads=2, rope_theta=1000000.0, tie_word_embeddings=False),
    ),
    "tiny-mistral": Family(
        "mistral",
        "mistral",
        "sentencepiece",
        bos="<s>",
        eos="</s>",
        pad="<unk>",
        special=("<unk>", "<s>", "</s>", "[INST]", "[/INST]"),
        config=dict(num_key_value_heads=2, rope_theta=1000000.0, tie_word_embeddings=False, sliding_window=None),
    ),
}


def fingerprint(name: str) -> str:
    spec = json.dumps([asdict(FAMILIES[name]), SHAPE, VOCAB, BUILT_IN[FAMILIES[name].template].jinja], sort_keys=True)
    return sha256_text(sha256_file(paths.SAMPLE_DATA) + spec)


def resolve(name: str) -> Path:
    """The built directory of tiny base `name`, built (or rebuilt when its recipe changed) first."""
    out = paths.MODELS_DIR / name
    record = out / BUILD_RECORD
    if not record.exists() or read_json(record).get("fingerprint") != fingerprint(name):
        build(name, out)
    return out


def _corpus(family: Family) -> list[str]:
    return rendered(family.template, read_jsonl(paths.SAMPLE_DATA))


def rendered(template: str, rows) -> list[str]:
    """Rows of any accepted form (tasks/common/conversation.py) rendered in built-in `template`."""
    from tasks.common.conversation import parse_row

    return [BUILT_IN[template].render(parse_row(r)).text for r in rows]


def _bytelevel_tokenizer(family: Family, corpus: list[str], vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=list(family.special),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token=family.bos, eos_token=family.eos, pad_token=family.pad
    )


def sentencepiece_bpe(corpus: list[str], vocab: int, symbols: tuple[str, ...] = ()) -> bytes:
    """A SentencePiece BPE model learned from `corpus`, as Llama's tokenizer.model is made (byte fallback, digits
    split, <unk>/<s>/</s> = 0/1/2); `symbols` become single pieces. One thread: every machine builds the same."""
    import sentencepiece as spm

    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus),
        model_writer=proto,
        model_type="bpe",
        vocab_size=vocab,
        byte_fallback=True,
        character_coverage=1.0,
        split_digits=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        **({"user_defined_symbols": list(symbols)} if symbols else {}),
        hard_vocab_limit=False,
        num_threads=1,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        max_sentence_length=1 << 16,
        minloglevel=2,
    )
    return proto.getvalue()


def _sentencepiece_tokenizer(family: Family, tmp: Path, corpus: list[str], vocab: int):
    from transformers import LlamaTokenizer

    symbols = tuple(t for t in family.special if t not in ("<unk>", "<s>", "</s>"))
    (tmp / "tokenizer.model").write_bytes(sentencepiece_bpe(corpus, vocab, symbols))
    tok = LlamaTokenizer.from_pretrained(tmp)
    tok.add_special_tokens({"additional_special_tokens": [t for t in family.special if t.startswith("[")]})
    tok.pad_token = family.pad
    return tok


def family_tokenizer(name: str, folder: Path, corpus: list[str], vocab: int):
    """A tokenizer of family `name` learned from `corpus` (texts rendered in the family's template) with `vocab`
    pieces plus the family's special tokens and chat template, saved into `folder`. Also what the GPU benchmarks give
    a random-weight base of a real shape (benchmarks/build_random_base.py), learned there from the 1k real rows."""
    family = FAMILIES[name]
    if family.tokenizer == "bytelevel":
        tok = _bytelevel_tokenizer(family, corpus, vocab)
    else:
        tok = _sentencepiece_tokenizer(family, folder, corpus, vocab)
    tok.chat_template = BUILT_IN[family.template].jinja
    tok.save_pretrained(folder)
    return tok


def build(name: str, out: Path) -> Path:
    """Build tiny base `name` (tokenizer + seeded random weights) into `out`, atomically."""
    from transformers import AutoConfig, AutoModelForCausalLM

    family = FAMILIES[name]
    with staged_dir(out) as tmp:
        tok = family_tokenizer(name, tmp, _corpus(family), VOCAB)
        ids = {k: tok.convert_tokens_to_ids(t) for k, t in (("bos", family.bos), ("eos", family.eos)) if t}
        config = AutoConfig.for_model(
            family.architecture,
            vocab_size=len(tok),
            bos_token_id=ids.get("bos"),
            eos_token_id=ids["eos"],
            pad_token_id=tok.convert_tokens_to_ids(family.pad),
            max_position_embeddings=4096,
            rms_norm_eps=1e-5,
            **SHAPE,
            **family.config,
        )
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config).save_pretrained(tmp)
        write_json(tmp / BUILD_RECORD, {"fingerprint": fingerprint(name)})
    log.info("built the tiny %s base in %s", name, out)
    return out
