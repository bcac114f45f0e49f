"""Every chat template: its rendering equals its Jinja (and Meta's and Qwen's originals), its answer mask is exactly
each answer and the token ending its turn (checked against transformers' return_assistant_tokens_mask with trl's
generation-marked templates), the cut at max_length, the `tokenizer` template split from the rendering, and the
errors for a template a base cannot take. Tokenizers: the tiny bases of each family (tasks/common/tiny_families.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks.common import tiny_families
from tasks.common.base_model import load_tokenizer
from tasks.common.chat_template import BUILT_IN, chat_template
from tasks.common.config import ModelParams
from tasks.common.conversation import ASSISTANT, USER, Conversation
from tasks.common.errors import PipelineError
from tasks.common.tokens import IGNORE, cut, tokenize_rendered
from tests.conftest import ROOT

TRL_TEMPLATES = Path(__import__("trl").__file__).parent / "chat_templates"
ONE = Conversation(turns=((USER, "What is 2+2?"), (ASSISTANT, "4.")))
MULTI = Conversation(
    turns=((USER, "Hi there"), (ASSISTANT, "Hello! How can I help?"), (USER, "Name a color."), (ASSISTANT, "Blue.")),
    system="Be brief.",
)
# the base each template is the family's own of, and what a template's answer mask must decode to
BASES = {"llama2": "tiny-llama", "llama3": "tiny-llama3", "chatml": "tiny-qwen2", "mistral": "tiny-mistral"}
TRAINED = {
    "llama2": ["Hello! How can I help? </s>", "Blue. </s>"],
    "llama3": ["Hello! How can I help?<|eot_id|>", "Blue.<|eot_id|>"],
    "chatml": ["Hello! How can I help?<|im_end|>", "Blue.<|im_end|>"],
    "mistral": ["Hello! How can I help?</s>", "Blue.</s>"],
}


@pytest.fixture(scope="module")
def tokenizers():
    """Each family's tiny tokenizer, built (once, into the repository's ignored models/) as the pipeline builds it."""
    import os

    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        return {
            name: load_tokenizer(ModelParams(base=base, revision=None, tokenizer=None, max_length=512))
            for name, base in BASES.items()
        }
    finally:
        os.chdir(cwd)


@pytest.mark.parametrize("name", list(BASES))
@pytest.mark.parametrize("conv", [ONE, MULTI, Conversation(MULTI.turns)], ids=["one", "multi-system", "multi"])
def test_the_python_rendering_is_the_jinja_one(tokenizers, name, conv):
    """What format writes (Python) is what the release's tokenizer renders (the template's Jinja), and the
    generation prompt is the Jinja's with add_generation_prompt."""
    tok, template = tokenizers[name], BUILT_IN[name]
    tok.chat_template = template.jinja
    assert template.render(conv).text == tok.apply_chat_template(template.messages(conv), tokenize=False)
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why?"}]
    assert template.prompt("Why?", "Be brief.") == tok.apply_chat_template(
        prompt, tokenize=False, add_generation_prompt=True
    )


@pytest.mark.parametrize(("name", "original"), [("llama3", "llama3.jinja"), ("chatml", "qwen2_5.jinja")])
def test_the_jinja_renders_as_the_models_own(tokenizers, name, original):
    """llama3 is Meta-Llama-3-Instruct's template and chatml Qwen2.5's (given a system message: without one, Qwen's
    adds its own default), as trl keeps them (its copies are checked weekly against the Hub)."""
    tok, template = tokenizers[name], BUILT_IN[name]
    theirs = (TRL_TEMPLATES / original).read_text()
    for conv in (MULTI, ONE if name == "llama3" else Conversation(ONE.turns, system="S.")):
        ours = tok.apply_chat_template(template.messages(conv), tokenize=False, chat_template=template.jinja)
        assert ours == tok.apply_chat_template(template.messages(conv), tokenize=False, chat_template=theirs)


@pytest.mark.parametrize("name", list(BASES))
def test_the_answer_mask_is_each_answer_and_its_end_of_turn_token(tokenizers, name):
    tok, template = tokenizers[name], BUILT_IN[name]
    (row,) = tokenize_rendered(tok, [template.render(MULTI)])
    runs, current = [], []
    for token, label in zip(row.input_ids, row.labels):
        if label != IGNORE:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    runs += [current] if current else []
    assert [tok.decode(r) for r in runs] == TRAINED[name]
    end = tok.convert_tokens_to_ids(template.end_of_turn)
    assert all(r[-1] == end for r in runs)  # each turn's end is trained, as the one token the template names


@pytest.mark.parametrize(
    ("name", "training"), [("llama3", "llama3_training.jinja"), ("chatml", "qwen2_5_training.jinja")]
)
def test_the_mask_agrees_with_transformers_assistant_mask(tokenizers, name, training):
    """transformers' return_assistant_tokens_mask over trl's generation-marked copy of the model's template. Llama-3's
    marks exactly what ours trains; Qwen's also marks the newline after `<|im_start|>assistant` (part of the
    generation prompt, never generated) and the one after `<|im_end|>` (after the stop): those two, nothing else."""
    tok, template = tokenizers[name], BUILT_IN[name]
    (row,) = tokenize_rendered(tok, [template.render(MULTI)])
    theirs = tok.apply_chat_template(
        template.messages(MULTI),
        chat_template=(TRL_TEMPLATES / training).read_text(),
        return_assistant_tokens_mask=True,
        return_dict=True,
    )
    assert list(theirs["input_ids"]) == row.input_ids
    ours = [label != IGNORE for label in row.labels]
    extra = [i for i, (a, b) in enumerate(zip(ours, theirs["assistant_masks"])) if a != bool(b)]
    if name == "llama3":
        assert not extra
    else:
        assert all(not ours[i] and tok.decode([row.input_ids[i]]) == "\n" for i in extra) and len(extra) == 4


@pytest.mark.parametrize("name", list(BASES))
def test_a_cut_answer_keeps_only_its_own_tokens(tokenizers, name):
    """The cut at max_length inside the second answer: what stays labelled is the first answer whole and the start
    of the second, never a prompt token."""
    tok, template = tokenizers[name], BUILT_IN[name]
    (row,) = tokenize_rendered(tok, [template.render(MULTI)])
    second = [i for i, label in enumerate(row.labels) if label != IGNORE][-2]  # inside the last answer
    kept = cut(row, second)
    labelled = tok.decode([t for t, label in zip(kept.input_ids, kept.labels) if label != IGNORE])
    assert labelled.startswith(TRAINED[name][0]) and "Name a color" not in labelled


def test_the_tokenizer_template_is_split_from_its_own_rendering(tokenizers):
    """`tokenizer`: Qwen2.5's own template (its default system message included) on the Qwen tokenizer."""
    tok = tokenizers["chatml"]
    tok.chat_template = (TRL_TEMPLATES / "qwen2_5.jinja").read_text()
    template = chat_template("tokenizer", tok)
    assert template.end_of_turn == "<|im_end|>"
    rendered = template.render(Conversation(MULTI.turns))
    assert rendered.text.startswith("<|im_start|>system\nYou are Qwen")  # the template's own default
    assert [rendered.text[a:b] for a, b in rendered.answer_spans] == [
        "Hello! How can I help?<|im_end|>",
        "Blue.<|im_end|>",
    ]
    assert template.prompt("Why?").endswith("<|im_start|>user\nWhy?<|im_end|>\n<|im_start|>assistant\n")


def test_a_template_that_rewrites_earlier_turns_is_refused_by_name(tokenizers):
    tok = tokenizers["chatml"]
    # renders only the latest exchange: the first k messages are not a prefix of the first k+1
    tok.chat_template = (
        "{% for m in messages[-2:] %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    with pytest.raises(PipelineError, match="cannot be split into turns"):
        chat_template("tokenizer", tok)


def test_a_tokenizer_without_a_template_and_a_foreign_template_are_refused(tokenizers):
    tok = tokenizers["llama2"]
    tok.chat_template = None
    with pytest.raises(PipelineError, match="carries no chat_template"):
        chat_template("tokenizer", tok)
    with pytest.raises(PipelineError, match="<|eot_id|>"):
        chat_template("llama3", tok)  # Llama-3's tokens on Llama-2's tokenizer would be ordinary text


def test_each_family_base_is_its_architecture_with_grouped_query_attention(tokenizers):
    from transformers import AutoConfig

    for name, base in BASES.items():
        if base == "tiny-llama":
            continue
        config = AutoConfig.from_pretrained(ROOT / "models" / base)
        assert config.model_type == tiny_families.FAMILIES[base].architecture
        assert config.num_key_value_heads < config.num_attention_heads
        assert config.eos_token_id == tokenizers[name].convert_tokens_to_ids(BUILT_IN[name].end_of_turn)


@pytest.mark.parametrize("name", list(BASES))
def test_packed_rows_of_each_family_attend_and_learn_only_within_themselves(tokenizers, name):
    """Padding-free packing of rendered rows on the family's architecture (the varlen attention train uses): each
    row's logits are its own alone, and no label of one row is predicted from another (the first of each is -100)."""
    import copy

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from tasks.train import attention

    tok, template = tokenizers[name], BUILT_IN[name]
    rows = tokenize_rendered(tok, [template.render(c) for c in (ONE, MULTI, Conversation(MULTI.turns))])
    batch = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id, padding_free=True)(
        [{"input_ids": r.input_ids, "labels": r.labels} for r in rows]
    )
    starts = batch["cu_seq_lens_q"][:-1].tolist()
    assert all(batch["labels"][0, s].item() == IGNORE for s in starts)

    arch = AutoConfig.from_pretrained(ROOT / "models" / BASES[name])
    models = {}
    for impl in (attention.register(), "sdpa"):
        torch.manual_seed(0)
        models[impl] = AutoModelForCausalLM.from_config(copy.deepcopy(arch), attn_implementation=impl).eval()
    packed_model, plain_model = models.values()
    plain_model.load_state_dict(packed_model.state_dict())
    with torch.no_grad():
        packed = packed_model(
            input_ids=batch["input_ids"],
            position_ids=batch["position_ids"],
            cu_seq_lens_q=batch["cu_seq_lens_q"],
            cu_seq_lens_k=batch["cu_seq_lens_k"],
            max_length_q=batch["max_length_q"],
            max_length_k=batch["max_length_k"],
        ).logits[0]
        alone = torch.cat([plain_model(input_ids=torch.tensor([r.input_ids])).logits[0] for r in rows])
    torch.testing.assert_close(packed, alone, atol=1e-4, rtol=1e-4)
