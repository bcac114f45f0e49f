"""Every input form parses into one Conversation, and the one renderer gives the exact Llama-2 chat text."""

from __future__ import annotations

import json
import re

import pytest

from tasks.common.chat_template import BUILT_IN
from tasks.common.conversation import (
    ASSISTANT,
    USER,
    Conversation,
    ParseError,
    detect_form,
    parse_row,
    parse_text,
)
from tests.conftest import needs_shared

LLAMA2 = BUILT_IN["llama2"]

# --- raw guanaco text ---------------------------------------------------------------------------


def test_guanaco_single_turn():
    conv = parse_row({"text": "### Human: What is 2+2?### Assistant: It is 4."})
    assert conv == Conversation(turns=((USER, "What is 2+2?"), (ASSISTANT, "It is 4.")), system=None)
    assert detect_form({"text": "### Human: a### Assistant: b"}) == "guanaco"


def test_guanaco_multi_turn():
    text = "### Human: Hi### Assistant: Hello!### Human: Name a color.### Assistant: Blue."
    conv = parse_row({"text": text})
    assert conv.turns == ((USER, "Hi"), (ASSISTANT, "Hello!"), (USER, "Name a color."), (ASSISTANT, "Blue."))
    assert conv.system is None


def test_guanaco_markdown_headings_stay_inside_the_turn():
    answer = "Here is how.\n\n### Step 1\nBoil water.\n\n### Step 2\nAdd pasta.\n#### Note: salt it"
    conv = parse_row({"text": f"### Human: How do I cook pasta?### Assistant: {answer}"})
    assert conv.turns == ((USER, "How do I cook pasta?"), (ASSISTANT, answer))


def test_guanaco_windows_newlines_and_edge_spaces_are_cleaned():
    text = "  ### Human:   line one\r\nline two  \r\n### Assistant:  first\r\n\r\nsecond \r\n  "
    conv = parse_row({"text": text})
    assert conv.turns == ((USER, "line one\nline two"), (ASSISTANT, "first\n\nsecond"))
    assert all("\r" not in t for _, t in conv.turns)


@pytest.mark.parametrize(
    "text, found",
    [
        ("### human: Hi### assistant: Hello.", "### human:"),
        ("### Human: Hi\n\n### Assistant : Hello.", "### Assistant :"),
        ("### Human: Hi### Assistant: Hello.### HUMAN:More?### Assistant: Yes.", "### HUMAN:"),
    ],
)
def test_guanaco_marker_with_wrong_case_or_spacing_is_named(text, found):
    # Read as content, "### Assistant :" merged the answer into the user turn, failing other rules with no word why.
    with pytest.raises(ParseError, match=re.escape(f"{found!r} looks like a turn marker but is not one")):
        parse_text(text)


def test_guanaco_text_before_first_marker_is_refused():
    with pytest.raises(ParseError, match="before the first"):
        parse_row({"text": "preamble ### Human: q### Assistant: a"})


# --- Llama-2 templated text ---------------------------------------------------------------------


def test_llama2_text_without_and_with_system_parse_to_same_turns():
    plain = "<s>[INST] Hi [/INST] Hello! </s><s>[INST] Name a color. [/INST] Blue. </s>"
    with_sys = (
        "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello! </s><s>[INST] Name a color. [/INST] Blue. </s>"
    )
    a, b = parse_row({"text": plain}), parse_row({"text": with_sys})
    expected = ((USER, "Hi"), (ASSISTANT, "Hello!"), (USER, "Name a color."), (ASSISTANT, "Blue."))
    assert a.turns == expected and b.turns == expected
    assert a.system is None
    assert b.system == "Be brief."
    assert detect_form({"text": plain}) == "llama2"
    # both re-render to the text they came from
    assert LLAMA2.render(a).text == plain
    assert LLAMA2.render(b).text == with_sys


def test_llama2_text_without_leading_bos():
    conv = parse_text("[INST] What is up? [/INST] The sky. </s>")
    assert conv.turns == ((USER, "What is up?"), (ASSISTANT, "The sky."))


@pytest.mark.parametrize(
    "text",
    [
        "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nWhat is up? [/INST] The sky. </s><s>[INST] And? [/INST] Blue. </s>",
        "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nWhat is up? [/INST] The sky.</s><s>[INST] And? [/INST] Blue.</s>",
        "<s>[INST]<<SYS>>Be brief.<</SYS>>What is up?[/INST]The sky.</s> <s>[INST]And?[/INST]Blue.</s>",
    ],
    ids=["canonical", "no-space-before-eos", "no-spaces-at-all"],
)
def test_llama2_spacing_around_markers_is_not_content(text):
    # A file written without the space before </s> used to keep "</s>" (and every later turn) inside the first
    # answer, which validation then reported as template markers inside content.
    conv = parse_text(text)
    assert conv.system == "Be brief."
    assert conv.turns == ((USER, "What is up?"), (ASSISTANT, "The sky."), (USER, "And?"), (ASSISTANT, "Blue."))


def test_llama2_prompt_without_answer_is_kept_for_validation():
    # an open prompt ends with the user; an explicitly empty answer is an empty assistant turn
    assert parse_text("<s>[INST] Unanswered? [/INST]").turns == ((USER, "Unanswered?"),)
    assert parse_text("<s>[INST] Unanswered? [/INST] </s>").turns == ((USER, "Unanswered?"), (ASSISTANT, ""))


# --- messages and Alpaca ------------------------------------------------------------------------


def test_openai_messages_with_system():
    row = {
        "messages": [
            {"role": "system", "content": " You are terse. "},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Bye"},
            {"role": "assistant", "content": "Goodbye."},
        ]
    }
    conv = parse_row(row)
    assert detect_form(row) == "messages"
    assert conv.system == "You are terse."
    assert conv.turns == ((USER, "Hi"), (ASSISTANT, "Hello."), (USER, "Bye"), (ASSISTANT, "Goodbye."))


def test_openai_content_parts_of_text_read_as_one_text():
    row = {
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "Hi, "}, {"type": "text", "text": "there."}]},
            {"role": "assistant", "content": [{"type": "text", "text": "Hello."}]},
        ]
    }
    assert parse_row(row).turns == ((USER, "Hi, there."), (ASSISTANT, "Hello."))
    image = {"type": "image_url", "image_url": {"url": "https://example.org/cat.png"}}
    row["messages"][0]["content"].append(image)
    with pytest.raises(ParseError, match=r"message 0 content part 2 is 'image_url', not text"):
        parse_row(row)
    with pytest.raises(ParseError, match=r"message 0 content is an int, expected text"):
        parse_row({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]})


def test_messages_as_json_text_from_a_csv_cell():
    cell = json.dumps([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}])
    assert parse_row({"messages": cell}).turns == ((USER, "Hi"), (ASSISTANT, "Hello."))
    with pytest.raises(ParseError, match=r"`messages` is text that is not JSON"):
        parse_row({"messages": "[{'role': 'user', 'content': 'Hi'}]"})  # a Python repr, not JSON


def test_sharegpt_conversations():
    row = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]}
    conv = parse_row(row)
    assert detect_form(row) == "messages"
    assert conv == Conversation(turns=((USER, "Hi"), (ASSISTANT, "Hello.")), system=None)


def test_alpaca_with_and_without_input():
    row = {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"}
    assert detect_form(row) == "alpaca"
    assert parse_row(row).turns == ((USER, "Translate to French.\n\nGood morning"), (ASSISTANT, "Bonjour"))
    row2 = {"instruction": "Say hi.", "input": "", "output": "Hi!"}
    assert parse_row(row2).turns == ((USER, "Say hi."), (ASSISTANT, "Hi!"))


# --- unparseable rows ---------------------------------------------------------------------------


def test_no_recognised_column():
    with pytest.raises(ParseError, match=r"no column to read: found \['prompt', 'response'\]"):
        parse_row({"prompt": "q", "response": "a"})
    assert detect_form({"prompt": "q"}) is None


def test_text_without_markers():
    with pytest.raises(ParseError, match="neither .*### Human:.* nor the Llama-2"):
        parse_row({"text": "just some prose with no markers"})


def test_empty_and_non_string_text():
    with pytest.raises(ParseError, match="empty"):
        parse_row({"text": "   "})
    with pytest.raises(ParseError, match="`text` is an int"):
        parse_row({"text": 123})


def test_messages_with_unknown_role():
    with pytest.raises(ParseError, match="message 1 has unknown role 'narrator'"):
        parse_row({"messages": [{"role": "user", "content": "q"}, {"role": "narrator", "content": "x"}]})


def test_messages_malformed():
    with pytest.raises(ParseError, match="non-empty list"):
        parse_row({"messages": []})
    with pytest.raises(ParseError, match="message 0 has keys"):
        parse_row({"messages": [{"speaker": "user", "text": "q"}]})
    with pytest.raises(ParseError, match="system message is only allowed first"):
        parse_row({"messages": [{"role": "user", "content": "q"}, {"role": "system", "content": "s"}]})


# --- golden renderings --------------------------------------------------------------------------

ONE = Conversation(turns=((USER, "What is 2+2?"), (ASSISTANT, "4.")))
ONE_SYS = Conversation(turns=ONE.turns, system="Be exact.")
MULTI = Conversation(turns=((USER, "Hi"), (ASSISTANT, "Hello!"), (USER, "Name a color."), (ASSISTANT, "Blue.")))
MULTI_SYS = Conversation(turns=MULTI.turns, system="Be brief.")


@pytest.mark.parametrize(
    "conv, expected",
    [
        (ONE, "<s>[INST] What is 2+2? [/INST] 4. </s>"),
        (ONE_SYS, "<s>[INST] <<SYS>>\nBe exact.\n<</SYS>>\n\nWhat is 2+2? [/INST] 4. </s>"),
        (MULTI, "<s>[INST] Hi [/INST] Hello! </s><s>[INST] Name a color. [/INST] Blue. </s>"),
        (
            MULTI_SYS,
            "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello! </s>"
            "<s>[INST] Name a color. [/INST] Blue. </s>",
        ),
    ],
    ids=["single", "single-system", "multi", "multi-system"],
)
def test_render_golden(conv, expected):
    rendered = LLAMA2.render(conv)
    assert rendered.text == expected
    answers = [t for r, t in conv.turns if r == ASSISTANT]
    assert [rendered.text[a:b] for a, b in rendered.answer_spans] == [f"{ans} </s>" for ans in answers]
    assert rendered.text.count("<<SYS>>") == (1 if conv.system else 0)


def test_render_default_system_applies_only_when_conversation_has_none():
    assert LLAMA2.render(ONE, default_system="Default.").text == (
        "<s>[INST] <<SYS>>\nDefault.\n<</SYS>>\n\nWhat is 2+2? [/INST] 4. </s>"
    )
    assert "Be exact." in LLAMA2.render(ONE_SYS, default_system="Default.").text
    assert "Default." not in LLAMA2.render(ONE_SYS, default_system="Default.").text


def test_to_dict_round_trip():
    assert Conversation.from_dict(json.loads(json.dumps(MULTI_SYS.to_dict()))) == MULTI_SYS


# --- the real 1k dataset ------------------------------------------------------------------------


def test_raw_guanaco_renders_to_published_llama2_text():
    import pandas as pd

    raw_path = needs_shared("guanaco-raw-1k", "train.jsonl")
    parquet = needs_shared("guanaco-llama2-1k", "train.parquet")
    with open(raw_path, encoding="utf-8") as f:
        raw = [json.loads(line) for line in f if line.strip()]
    published = pd.read_parquet(parquet)["text"].tolist()
    assert len(raw) == len(published) == 1000
    mismatches = [i for i, (row, text) in enumerate(zip(raw, published)) if LLAMA2.render(parse_row(row)).text != text]
    assert mismatches == []
    # and the templated text parses back to itself
    back = [i for i, text in enumerate(published) if LLAMA2.render(parse_text(text)).text != text]
    assert back == []


@pytest.mark.parametrize(
    ("message", "said"),
    [
        ({"role": "assistant", "content": None, "tool_calls": [{"type": "function"}]}, "a tool call (`tool_calls`)"),
        ({"role": "tool", "content": "sunny", "tool_call_id": "1"}, "a tool result (role 'tool')"),
    ],
)
def test_a_tool_call_or_result_is_named_as_such(message, said):
    """OpenAI-style tool use holds role and content keys (content null): it is named for what it is, not as
    missing role+content, and the row is reported (validation leaves it out within its tolerance)."""
    row = {"messages": [{"role": "user", "content": "Weather?"}, message, {"role": "assistant", "content": "Sunny."}]}
    with pytest.raises(ParseError, match=rf"message 1 is {re.escape(said)}: this recipe trains on text turns"):
        parse_row(row)
