"""The canonical conversation and every input form parsed into it (tasks/common/chat_template.py renders it).

Forms a row may come in (detected per row, by its keys):
  - `text` in raw OpenAssistant-Guanaco form: `### Human: q### Assistant: a` (multi-turn)
  - `text` already in the Llama-2 chat template: `<s>[INST] <<SYS>>..<</SYS>>\n\nq [/INST] a </s>`
  - `messages` / `conversations`: lists of {role, content} (OpenAI) or {from, value} (ShareGPT)
  - Alpaca: `instruction`, optional `input`, `output`
Parsing never judges the content (empty turns, roles out of order...): that is validation's job,
so every problem is reported by one suite. It only refuses rows it cannot read at all.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field

USER, ASSISTANT = "user", "assistant"

# The markers of the text forms parsed here: inside a turn's content they mean a form leaked into it (validation
# checks them, with the chosen chat template's own).
FORM_MARKERS = ("### Human:", "### Assistant:", "[INST]", "[/INST]", "<<SYS>>", "<</SYS>>", "<s>", "</s>")

_ROLE_ALIASES = {
    "user": USER,
    "human": USER,
    "prompter": USER,
    "assistant": ASSISTANT,
    "gpt": ASSISTANT,
    "bot": ASSISTANT,
    "model": ASSISTANT,
    "system": "system",
}

_GUANACO_MARKER = re.compile(r"### (Human|Assistant):")
# A marker with the wrong case or spacing ("### human:", "### Assistant :"): read as content, it merged the turns
# around it with no word of why, so it is named instead.
_NEAR_MARKER = re.compile(r"###\s*(?:human|assistant)\s*:", re.I)
_LLAMA2_TURN = re.compile(
    # Whitespace around the markers is not content (the format stage renders the template afresh), so a file
    # written with "answer</s>" or "[/INST]answer" reads like the canonical "[/INST] answer </s>".
    r"<s>\s*\[INST\]\s*(?:<<SYS>>\s*(?P<sys>.*?)\s*<</SYS>>\s*)?(?P<user>.*?)\s*\[/INST\](?:\s*(?P<answer>.*?)\s*</s>|(?P<open>.*)$)",  # noqa: E501
    re.S,
)


class ParseError(ValueError):
    """A row whose form cannot be recognised; the message says why."""


@dataclass(frozen=True)
class Conversation:
    turns: tuple[tuple[str, str], ...]  # (role, text), role in {user, assistant}
    system: str | None = None

    def to_dict(self) -> dict:
        return {"system": self.system, "turns": [{"role": r, "text": t} for r, t in self.turns]}

    @classmethod
    def from_dict(cls, d: dict) -> Conversation:
        return cls(turns=tuple((t["role"], t["text"]) for t in d["turns"]), system=d.get("system"))


@dataclass(frozen=True)
class Rendered:
    text: str
    answer_spans: list[tuple[int, int]] = field(default_factory=list)  # char spans that carry the loss


_NON_WORD = re.compile(r"\W+")
# For ASCII, \w is exactly [0-9A-Za-z_]: bytes.translate turns every other ASCII byte into a space in one C pass
# (UTF-8 bytes of other characters pass unchanged), where the regex tests each character in turn.
_ASCII_FOLD = bytes(c if chr(c).isalnum() or c == ord("_") else ord(" ") for c in range(128)) + bytes(range(128, 256))


def _fold_ascii(text: str) -> str:
    # surrogatepass: a lone surrogate (JSON allows "\ud800") round-trips instead of failing to encode
    return text.encode("utf-8", "surrogatepass").translate(_ASCII_FOLD).decode("utf-8", "surrogatepass")


def near_duplicate_key(conv: Conversation) -> str:
    r"""Text with case, punctuation and whitespace folded: equal keys are (near-)duplicates.

    The key is `re.sub(r"\W+", " ", text.lower()).strip()`, computed faster: after the ASCII fold, a word that is
    ASCII or all alphanumeric (\w is alphanumeric or "_") is kept whole, and only the rest go through the regex.
    """
    text = " ".join(t for _, t in conv.turns).lower()
    words = []
    for word in _fold_ascii(text).split():
        if word.isascii() or word.isalnum():
            words.append(word)
        elif folded := _NON_WORD.sub(" ", word).strip():
            words.append(folded)
    return " ".join(words)


def content_key(conv: Conversation) -> str:
    """sha256 of the near-duplicate key: what validate finds duplicates by and format splits train/eval on."""
    return hashlib.sha256(near_duplicate_key(conv).encode("utf-8")).hexdigest()


def key_words(keys: list[str]):
    """The first 128 bits of content keys (64-character hex sha256s) as two uint64 arrays (high, low): what
    validate finds duplicates by and format orders the split by, 16 bytes a row instead of a 64-character string.
    Big-endian, so (high, low) sorts as the hex keys do. Two different keys agree in 128 bits with probability
    about rows^2 / 2^129: 1.5e-25 at ten million rows."""
    import numpy as np

    words = np.frombuffer(bytes.fromhex("".join(k[:32] for k in keys)), dtype=">u8").reshape(-1, 2)
    return words[:, 0].astype(np.uint64), words[:, 1].astype(np.uint64)


def _clean(text: str) -> str:
    # Windows newlines and stray edge whitespace are transport noise, not content.
    return text.replace("\r\n", "\n").replace("\r", "\n").strip()


def _parse_guanaco(text: str) -> Conversation:
    parts = _GUANACO_MARKER.split(text)
    preamble, rest = parts[0], parts[1:]
    if preamble.strip():
        raise ParseError(f"text before the first '### Human:' marker: {preamble.strip()[:60]!r}")
    turns = tuple((USER if role == "Human" else ASSISTANT, _clean(body)) for role, body in zip(rest[::2], rest[1::2]))
    for _, body in turns:
        if near := _NEAR_MARKER.search(body):
            raise ParseError(_near_marker_message(near.group(0)))
    return Conversation(turns=turns)


def _near_marker_message(found: str) -> str:
    return f"{found!r} looks like a turn marker but is not one: write '### Human:' or '### Assistant:' exactly"


def _parse_llama2(text: str) -> Conversation:
    turns: list[tuple[str, str]] = []
    system = None
    pos = 0
    text = text.strip()
    while pos < len(text):
        m = _LLAMA2_TURN.match(text, pos)
        if not m:
            raise ParseError(f"Llama-2 template broken at character {pos}: {text[pos : pos + 60]!r}")
        if m.group("sys") is not None:
            if turns:
                raise ParseError("a <<SYS>> block after the first turn")
            system = _clean(m.group("sys"))
        turns.append((USER, _clean(m.group("user"))))
        if m.group("open") is not None:  # prompt with no answer: kept, so validation can name it
            if m.group("open").strip():
                turns.append((ASSISTANT, _clean(m.group("open"))))
        else:
            turns.append((ASSISTANT, _clean(m.group("answer") or "")))
        pos = m.end()
        while pos < len(text) and text[pos].isspace():
            pos += 1
    return Conversation(turns=tuple(turns), system=system)


def _kind(value: object) -> str:
    """What a JSON value is, in words: "null", "an int", "a list"."""
    if value is None:
        return "null"
    name = type(value).__name__
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def _text_parts(content: list, i: int) -> str:
    """OpenAI-style content parts ([{"type": "text", "text": ...}, ...]) as one text, joined as Hugging Face chat
    templates join them (one after the other); any other part (an image, audio) is not text this recipe trains on."""
    texts = []
    for k, part in enumerate(content):
        if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
            kind = repr(part.get("type")) if isinstance(part, dict) else _kind(part)
            raise ParseError(f"message {i} content part {k} is {kind}, not text: this recipe trains on text only")
        texts.append(part["text"])
    return "".join(texts)


def _parse_messages(messages: object) -> Conversation:
    if isinstance(messages, str):
        # A CSV cell can only carry the list as JSON text: read it as the list it spells.
        try:
            messages = json.loads(messages)
        except json.JSONDecodeError as e:
            raise ParseError(
                f"`messages` is text that is not JSON ({e.msg} at character {e.pos}): write the list of "
                '{"role", "content"} objects as JSON'
            ) from None
    if not isinstance(messages, list) or not messages:
        raise ParseError("`messages` must be a non-empty list of {role, content} objects")
    system = None
    turns = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise ParseError(f"message {i} is {_kind(msg)}, expected an object with role/content")
        role = msg.get("role", msg.get("from"))
        content = msg.get("content", msg.get("value"))
        if msg.get("tool_calls") or str(role).lower() in ("tool", "function", "ipython"):
            what = "a tool call (`tool_calls`)" if msg.get("tool_calls") else f"a tool result (role {role!r})"
            raise ParseError(
                f"message {i} is {what}: this recipe trains on text turns between a user and an assistant only; "
                "remove the conversations that call tools from the data"
            )
        if role is None or content is None:
            raise ParseError(f"message {i} has keys {sorted(msg)}; expected role+content or from+value")
        canon = _ROLE_ALIASES.get(str(role).lower())
        if canon is None:
            raise ParseError(f"message {i} has unknown role {role!r}")
        if isinstance(content, list):
            content = _text_parts(content, i)
        if not isinstance(content, str):
            raise ParseError(f"message {i} content is {_kind(content)}, expected text")
        if canon == "system":
            if turns or system is not None:
                raise ParseError(f"message {i}: a system message is only allowed first")
            system = _clean(content)
        else:
            turns.append((canon, _clean(content)))
    return Conversation(turns=tuple(turns), system=system)


def _parse_alpaca(row: dict) -> Conversation:
    instruction, extra, output = row.get("instruction"), row.get("input") or "", row.get("output")
    for key, val in (("instruction", instruction), ("input", extra), ("output", output)):
        if not isinstance(val, str):
            raise ParseError(f"`{key}` is {_kind(val)}, expected text")
    user = _clean(instruction) + (f"\n\n{_clean(extra)}" if extra.strip() else "")
    return Conversation(turns=((USER, user), (ASSISTANT, _clean(output))))


def parse_text(text: str) -> Conversation:
    if not isinstance(text, str):
        raise ParseError(f"`text` is {_kind(text)}, expected a string")
    stripped = text.replace("\r\n", "\n").strip()
    if not stripped:
        raise ParseError("`text` is empty")
    if stripped.startswith("<s>") or stripped.startswith("[INST]"):
        return _parse_llama2(stripped if stripped.startswith("<s>") else "<s>" + stripped)
    if _GUANACO_MARKER.search(stripped):
        return _parse_guanaco(stripped)
    if near := _NEAR_MARKER.search(stripped):
        raise ParseError(_near_marker_message(near.group(0)))
    raise ParseError("`text` has neither '### Human:'/'### Assistant:' markers nor the Llama-2 [INST] template")


FORMS = ("guanaco", "llama2", "messages", "alpaca")  # what detect_form names a row's form
TEXT_KEYS = ("text",)
MESSAGE_KEYS = ("messages", "conversations")


def detect_form(row: dict) -> str | None:
    """'messages', 'alpaca', 'llama2' or 'guanaco' by the row's keys (and text), None if none fits."""
    if any(row.get(key) is not None for key in MESSAGE_KEYS):
        return "messages"
    if "instruction" in row and "output" in row:
        return "alpaca"
    if isinstance(row.get("text"), str):
        return "llama2" if row["text"].lstrip().startswith(("<s>", "[INST]")) else "guanaco"
    return None


def has_readable_column(row: dict) -> bool:
    """Whether parse_row finds a column to read in `row` (its content may still fail to parse)."""
    return detect_form(row) is not None or "text" in row


_EXPECTED_COLUMNS = ("text", *MESSAGE_KEYS, "instruction", "input", "output")


def no_column_message(found) -> str:
    """Why no column can be read, naming the columns `found` and those expected, and any found column that is an
    expected one but for case or surrounding spaces (a spreadsheet's "Text", a header's " text")."""
    near = [(c, c.strip().lower()) for c in sorted(map(str, found))]
    near = [(c, name) for c, name in near if name in _EXPECTED_COLUMNS and c != name]
    hint = "".join(
        f"; column {c!r} is `{name}` but for case or spaces: rename it, or map it with "
        f"-S \"download.columns.{'messages' if name == 'conversations' else name}='{c}'\""
        for c, name in near
    )
    return (
        f"no column to read: found {sorted(found)}; expected `text` (guanaco or Llama-2 text), "
        f"`messages` (role/content list) or `instruction`+`output` (Alpaca){hint}"
    )


def parse_row(row: dict) -> Conversation:
    """Parse one row of any supported form; raises ParseError naming what is wrong."""
    form = detect_form(row)
    if form == "messages":
        return _parse_messages(next(row[k] for k in MESSAGE_KEYS if row.get(k) is not None))
    if form == "alpaca":
        return _parse_alpaca(row)
    if "text" in row:
        return parse_text(row["text"])
    raise ParseError(no_column_message(row))
