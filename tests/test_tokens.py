"""Tokenization of the rendered chat text: one BOS per turn, one labelled EOS per answer, prompts masked."""

from __future__ import annotations

import pytest

from tasks.common.base_model import load_tokenizer
from tasks.common.chat_template import BUILT_IN
from tasks.common.config import ModelParams
from tasks.common.conversation import ASSISTANT, USER, Conversation
from tasks.common.tokens import IGNORE, tokenize_rendered
from tests.conftest import needs_shared

BOS, EOS = 1, 2
LLAMA2 = BUILT_IN["llama2"]
SYSTEM = "You are a careful assistant. Answer briefly."
USERS = ["What is the capital of France?", "And how many people live there?"]
ANSWERS = ["The capital of France is Paris.", "About 2.1 million people live in Paris proper."]
MESSAGES = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": USERS[0]},
    {"role": "assistant", "content": ANSWERS[0]},
    {"role": "user", "content": USERS[1]},
    {"role": "assistant", "content": ANSWERS[1]},
]
CONV = Conversation(
    turns=((USER, USERS[0]), (ASSISTANT, ANSWERS[0]), (USER, USERS[1]), (ASSISTANT, ANSWERS[1])), system=SYSTEM
)


@pytest.fixture(scope="module")
def llama2_tokenizer():
    path = needs_shared("llama-2-tokenizer")
    return load_tokenizer(ModelParams(base="tiny-llama", revision=None, tokenizer=str(path), max_length=512))


@pytest.fixture(scope="module")
def tokenized(llama2_tokenizer):
    rendered = LLAMA2.render(CONV)
    return rendered, tokenize_rendered(llama2_tokenizer, [rendered])[0]


def _turns(ids: list[int]) -> list[tuple[int, int]]:
    """[start, end) index ranges of each turn: from a BOS to just before the next one."""
    starts = [i for i, t in enumerate(ids) if t == BOS]
    return list(zip(starts, starts[1:] + [len(ids)]))


def test_bos_and_eos_placement(tokenized, llama2_tokenizer):
    _, tok = tokenized
    ids, labels = tok.input_ids, tok.labels
    assert llama2_tokenizer.bos_token_id == BOS and llama2_tokenizer.eos_token_id == EOS
    assert ids[0] == BOS
    assert ids.count(BOS) == 2  # one per turn
    assert all(not (a == BOS and b == BOS) for a, b in zip(ids, ids[1:]))
    assert ids.count(EOS) == 2  # one per assistant turn
    assert ids[-1] == EOS
    turns = _turns(ids)
    assert len(turns) == 2
    for start, end in turns:
        turn_ids = ids[start:end]
        assert turn_ids.count(BOS) == 1 and turn_ids.count(EOS) == 1 and turn_ids[-1] == EOS
        assert labels[end - 1] == EOS  # the EOS carries the loss
        assert labels[start] == IGNORE  # the BOS does not


def test_prompts_are_masked_and_answers_labelled(tokenized, llama2_tokenizer):
    rendered, tok = tokenized
    ids, labels = tok.input_ids, tok.labels
    assert len(labels) == len(ids)
    assert all(lab in (IGNORE, i) for lab, i in zip(labels, ids))
    enc = llama2_tokenizer(rendered.text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    # every token lying inside the system prompt or a user message is masked
    for needle in [SYSTEM, *USERS]:
        a = rendered.text.index(needle)
        b = a + len(needle)
        inside = [k for k, (s, e) in enumerate(offsets) if s >= a and e <= b and e > s]
        assert inside, needle
        assert all(labels[k] == IGNORE for k in inside), needle
    # the labelled tokens of each turn decode to that turn's answer (plus its EOS)
    for (start, end), answer in zip(_turns(ids), ANSWERS):
        labelled = [lab for lab in labels[start:end] if lab != IGNORE]
        assert labelled[-1] == EOS
        text = llama2_tokenizer.decode(labelled[:-1])
        assert text.strip() == answer
    assert tok.answer_tokens == sum(lab != IGNORE for lab in labels)


def test_ids_match_plain_tokenizer_and_chat_template(tokenized, llama2_tokenizer):
    rendered, tok = tokenized
    assert tok.input_ids == llama2_tokenizer(rendered.text, add_special_tokens=False)["input_ids"]
    # Meta's Llama-2-chat template (what a release's tokenizer carries): the same text, the same ids
    jinja = LLAMA2.jinja
    assert llama2_tokenizer.apply_chat_template(MESSAGES, tokenize=False, chat_template=jinja) == rendered.text
    templated = llama2_tokenizer.apply_chat_template(MESSAGES, tokenize=True, chat_template=jinja)
    template_ids = templated["input_ids"] if hasattr(templated, "keys") else templated
    assert list(template_ids) == tok.input_ids


def test_batches_give_the_same_result(llama2_tokenizer):
    convs = [CONV, Conversation(turns=((USER, "Hi"), (ASSISTANT, "Hello!"))), CONV]
    rendered = [LLAMA2.render(c) for c in convs]
    one = tokenize_rendered(llama2_tokenizer, rendered, batch=1000)
    small = tokenize_rendered(llama2_tokenizer, rendered, batch=1)
    assert one == small
    assert one[0] == one[2] and one[0] != one[1]


def test_tiny_tokenizer_full_loss_labels_everything(params, workdir):
    tokenizer = load_tokenizer(params.model)
    rendered = [LLAMA2.render(CONV), LLAMA2.render(Conversation(turns=((USER, "Hi"), (ASSISTANT, "Hello!"))))]
    full = tokenize_rendered(tokenizer, rendered, answer_only=False)
    masked = tokenize_rendered(tokenizer, rendered, answer_only=True)
    for f, m in zip(full, masked):
        assert f.labels == f.input_ids
        assert f.input_ids == m.input_ids
        assert 0 < m.answer_tokens < f.answer_tokens == len(f.input_ids)
        assert f.input_ids.count(tokenizer.bos_token_id) == f.input_ids.count(tokenizer.eos_token_id)
