"""The chat template: how a conversation becomes the text a base model is trained on, and the one owner of it.

`format.template` picks one:
  - `llama2` (the default): Llama-2-chat's `<s>[INST] <<SYS>>..<</SYS>>\n\n{user} [/INST] {answer} </s>`
  - `llama3`: Llama-3-Instruct's header form, each turn closed by `<|eot_id|>`
  - `chatml`: `<|im_start|>{role}\n{content}<|im_end|>\n` (Qwen)
  - `mistral`: Mistral-7B-Instruct-v0.3's `<s>[INST] {user}[/INST] {answer}</s>`
  - `tokenizer`: the base tokenizer's own Jinja `chat_template`, split into turns by rendering it turn by turn

A template renders the text with the character spans that carry the loss (each answer and the token that ends
its turn), the generation prompt, the token generation stops at, the strings that mean it leaked into content,
and the Jinja the release's tokenizer carries (so a server renders what was trained: publish checks it). The
built-ins render in Python (fast enough for millions of rows); a test holds each equal to its Jinja, and the
Jinja of llama3 and chatml equal to the originals that trl keeps of Meta's and Qwen's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tasks.common.conversation import USER, Conversation, Rendered
from tasks.common.errors import PipelineError

TEMPLATES = ("llama2", "llama3", "chatml", "mistral", "tokenizer")  # format.template's choices

# Llama-2-chat's own chat template (as shipped in its tokenizer_config.json).
LLAMA2_JINJA = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)
# Meta-Llama-3-8B-Instruct's chat template.
LLAMA3_JINJA = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}"
    "{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# Plain ChatML: Qwen2.5's template less its default system message and tools.
CHATML_JINJA = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>'"
    " + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Mistral-7B-Instruct-v0.3's form: one <s>, the system message in the last user turn, "[INST] {user}[/INST]",
# " {answer}</s>". Its shipped template puts the system message there only when that turn is the conversation's
# last message, so a training row (which ends with an answer) would lose it; here it goes to the last user turn
# always, which renders the same generation prompts.
MISTRAL_JINJA = (
    "{% if messages[0]['role'] == 'system' %}{% set system_message = messages[0]['content'] %}"
    "{% set loop_messages = messages[1:] %}{% else %}{% set loop_messages = messages %}{% endif %}"
    "{% set last_user = (loop_messages | selectattr('role', 'equalto', 'user') | list | length) - 1 %}"
    "{% set ns = namespace(users=0) %}{{ bos_token }}{% for message in loop_messages %}"
    "{% if message['role'] == 'user' %}{% if ns.users == last_user and system_message is defined %}"
    "{{ '[INST] ' + system_message + '\n\n' + message['content'] + '[/INST]' }}"
    "{% else %}{{ '[INST] ' + message['content'] + '[/INST]' }}{% endif %}{% set ns.users = ns.users + 1 %}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] | trim + eos_token }}{% endif %}"
    "{% endfor %}"
)


@dataclass(frozen=True)
class ChatTemplate:
    """One chat template. Subclasses render; the fields say what a tokenizer must hold for it."""

    name: str
    jinja: str  # the chat_template the release's tokenizer carries
    end_of_turn: str  # the token closing an assistant turn: trained with the answer, where generation stops
    special_tokens: tuple[str, ...]  # every token the rendering writes that must be one special token
    markers: tuple[str, ...]  # strings that, inside a turn's content, mean a template leaked into it

    def render(self, conv: Conversation, default_system: str | None = None) -> Rendered:
        raise NotImplementedError

    def prompt(self, user: str, system: str | None = None) -> str:
        """The generation prompt for one user message: the text the model continues with its answer."""
        raise NotImplementedError

    def messages(self, conv: Conversation, default_system: str | None = None) -> list[dict]:
        """The conversation as the {role, content} list a tokenizer's apply_chat_template takes."""
        system = conv.system if conv.system is not None else default_system
        head = [{"role": "system", "content": system}] if system else []
        return head + [{"role": role, "content": text} for role, text in conv.turns]


def _pairs(conv: Conversation):
    """(user, answer) pairs; a trailing user turn without its answer is not rendered (validation names it)."""
    turns = conv.turns
    return [(turns[i][1], turns[i + 1][1]) for i in range(0, len(turns) - 1, 2)]


class _Builder:
    """Text in pieces, and the spans of the pieces that carry the loss."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.spans: list[tuple[int, int]] = []
        self.length = 0

    def add(self, text: str, loss: bool = False) -> None:
        if loss:
            self.spans.append((self.length, self.length + len(text)))
        self.parts.append(text)
        self.length += len(text)

    def done(self) -> Rendered:
        return Rendered(text="".join(self.parts), answer_spans=self.spans)


class Llama2(ChatTemplate):
    def render(self, conv: Conversation, default_system: str | None = None) -> Rendered:
        """`<s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {answer} </s>` for the first turn,
        `<s>[INST] {user} [/INST] {answer} </s>` for each later one, with no separator (the form of
        mlabonne/guanaco-llama2-1k and of Meta's reference chat code); the loss on `{answer} </s>`."""
        system = conv.system if conv.system is not None else default_system
        out = _Builder()
        for i, (user, answer) in enumerate(_pairs(conv)):
            sys_block = f"<<SYS>>\n{system}\n<</SYS>>\n\n" if (i == 0 and system) else ""
            out.add(f"<s>[INST] {sys_block}{user} [/INST] ")
            out.add(f"{answer} </s>", loss=True)
        return out.done()

    def prompt(self, user: str, system: str | None = None) -> str:
        sys_block = f"<<SYS>>\n{system}\n<</SYS>>\n\n" if system else ""
        return f"<s>[INST] {sys_block}{user} [/INST]"


class Llama3(ChatTemplate):
    def render(self, conv: Conversation, default_system: str | None = None) -> Rendered:
        out = _Builder()
        out.add("<|begin_of_text|>")
        for message in self.messages(conv, default_system):
            role, content = message["role"], message["content"].strip()
            if role == "assistant":
                out.add("<|start_header_id|>assistant<|end_header_id|>\n\n")
                out.add(f"{content}<|eot_id|>", loss=True)
            else:
                out.add(f"<|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>")
        return out.done()

    def prompt(self, user: str, system: str | None = None) -> str:
        head = f"<|start_header_id|>system<|end_header_id|>\n\n{system.strip()}<|eot_id|>" if system else ""
        return (
            f"<|begin_of_text|>{head}<|start_header_id|>user<|end_header_id|>\n\n{user.strip()}<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n"
        )


class ChatML(ChatTemplate):
    def render(self, conv: Conversation, default_system: str | None = None) -> Rendered:
        out = _Builder()
        for message in self.messages(conv, default_system):
            role, content = message["role"], message["content"]
            if role == "assistant":
                out.add("<|im_start|>assistant\n")
                out.add(f"{content}<|im_end|>", loss=True)
                out.add("\n")
            else:
                out.add(f"<|im_start|>{role}\n{content}<|im_end|>\n")
        return out.done()

    def prompt(self, user: str, system: str | None = None) -> str:
        head = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""
        return f"{head}<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


class Mistral(ChatTemplate):
    def render(self, conv: Conversation, default_system: str | None = None) -> Rendered:
        system = conv.system if conv.system is not None else default_system
        pairs = _pairs(conv)
        out = _Builder()
        out.add("<s>")
        for i, (user, answer) in enumerate(pairs):
            sys_block = f"{system}\n\n" if (system and i == len(pairs) - 1) else ""
            out.add(f"[INST] {sys_block}{user}[/INST] ")
            out.add(f"{answer.strip()}</s>", loss=True)
        return out.done()

    def prompt(self, user: str, system: str | None = None) -> str:
        sys_block = f"{system}\n\n" if system else ""
        return f"<s>[INST] {sys_block}{user}[/INST]"


@dataclass(frozen=True)
class FromTokenizer(ChatTemplate):
    """The base tokenizer's own Jinja template. Its turns are found from the rendering itself: the first k messages
    rendered with the generation prompt must be a prefix of the first k+1 rendered, and each of those a prefix of
    the whole; the text between is the answer, which must end with a special token (the turn's end). A template
    that rewrites earlier turns as the conversation grows (one that drops past reasoning, say) cannot be split so,
    and stops with an error naming it."""

    tokenizer: object = field(default=None, compare=False, repr=False)  # the base's, whose Jinja this renders

    def _apply(self, messages: list[dict], generation: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)

    def render(self, conv: Conversation, default_system: str | None = None) -> Rendered:
        messages = self.messages(conv, default_system)
        if messages and messages[-1]["role"] == USER:
            messages = messages[:-1]  # a trailing question without its answer is not rendered (validation names it)
        whole = self._apply(messages, False)
        spans = []
        for k, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before, after = self._apply(messages[:k], True), self._apply(messages[: k + 1], False)
            if not (after.startswith(before) and whole.startswith(after)):
                raise PipelineError(
                    f"format.template tokenizer: the chat template of {self.name} cannot be split into turns: "
                    f"rendering the first {k} messages (with the generation prompt) and then {k + 1} does not add "
                    "the answer after the text before it (the template rewrites earlier turns). Choose a built-in "
                    "format.template (llama2, llama3, chatml, mistral) that matches this base."
                )
            answer = after[len(before) :].rstrip()
            if not answer.endswith(self.end_of_turn):
                raise PipelineError(
                    f"format.template tokenizer: the chat template of {self.name} ends an answer with "
                    f"{answer[-20:]!r}, not with its end-of-turn token {self.end_of_turn!r}: the end of a turn "
                    "cannot be trained. Choose a built-in format.template that matches this base."
                )
            spans.append((len(before), len(before) + len(answer)))
        return Rendered(text=whole, answer_spans=spans)

    def prompt(self, user: str, system: str | None = None) -> str:
        head = [{"role": "system", "content": system}] if system else []
        return self._apply([*head, {"role": "user", "content": user}], True)


BUILT_IN = {
    "llama2": Llama2(
        "llama2",
        LLAMA2_JINJA,
        end_of_turn="</s>",
        special_tokens=("<s>", "</s>"),
        markers=("[INST]", "[/INST]", "<<SYS>>", "<</SYS>>", "<s>", "</s>"),
    ),
    "llama3": Llama3(
        "llama3",
        LLAMA3_JINJA,
        end_of_turn="<|eot_id|>",
        special_tokens=("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
        markers=("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|end_of_text|>"),
    ),
    "chatml": ChatML(
        "chatml",
        CHATML_JINJA,
        end_of_turn="<|im_end|>",
        special_tokens=("<|im_start|>", "<|im_end|>"),
        markers=("<|im_start|>", "<|im_end|>", "<|endoftext|>"),
    ),
    "mistral": Mistral(
        "mistral",
        MISTRAL_JINJA,
        end_of_turn="</s>",
        special_tokens=("<s>", "</s>", "[INST]", "[/INST]"),
        markers=("[INST]", "[/INST]", "<s>", "</s>"),
    ),
}


def chat_template(name: str, tokenizer=None) -> ChatTemplate:
    """The template `format.template` names; `tokenizer` (the base's) is needed for `tokenizer` and checked for
    the built-ins: each token the template writes must be one special token of it, or the rendered text would be
    cut into ordinary pieces and the model never learn where a turn ends."""
    if name == "tokenizer":
        return _from_tokenizer(tokenizer)
    if name not in BUILT_IN:
        raise PipelineError(f"format.template {name!r} is not one of {', '.join(TEMPLATES)}.")
    template = BUILT_IN[name]
    if tokenizer is not None:
        check_special_tokens(template, tokenizer)
    return template


def check_special_tokens(template: ChatTemplate, tokenizer) -> None:
    vocab = tokenizer.get_vocab()
    for token in template.special_tokens:
        ids = tokenizer(token, add_special_tokens=False)["input_ids"]
        if token not in vocab or len(ids) != 1:
            raise PipelineError(
                f"format.template {template.name}: the tokenizer of {tokenizer.name_or_path!r} has no token "
                f"{token!r} (it would be split into {len(ids)} ordinary pieces), so this is not the template of "
                "this base. Choose the template the base was made with, or `tokenizer` to use its own."
            )


def _from_tokenizer(tokenizer) -> ChatTemplate:
    name = repr(getattr(tokenizer, "name_or_path", "the base"))
    jinja = getattr(tokenizer, "chat_template", None)
    if not isinstance(jinja, str) or not jinja:
        raise PipelineError(
            f"format.template tokenizer: the tokenizer of {name} carries no chat_template (a base model, not a "
            "chat model, or a tokenizer saved without one). Choose a built-in format.template: llama2, llama3, "
            "chatml or mistral."
        )
    probe = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    answer = tokenizer.apply_chat_template(probe, tokenize=False).rstrip()
    specials = sorted(set(tokenizer.all_special_tokens) | {t.content for t in _added_special(tokenizer)}, key=len)
    end = next((t for t in reversed(specials) if t and answer.endswith(t)), None)
    if end is None:
        raise PipelineError(
            f"format.template tokenizer: the chat template of {name} ends an answer with {answer[-20:]!r}, no "
            "special token: the end of a turn cannot be trained or stopped at. Choose a built-in format.template."
        )
    used = tuple(t for t in specials if t and t in answer)
    template = FromTokenizer(f"tokenizer:{name}", jinja, end, used, used, tokenizer=tokenizer)
    template.render(Conversation(turns=((USER, "q"), ("assistant", "a"), (USER, "q2"), ("assistant", "a2"))))
    return template


def _added_special(tokenizer):
    return [t for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if getattr(t, "special", False)]
