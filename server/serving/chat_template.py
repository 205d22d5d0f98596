"""Which chat template turns a conversation into a prompt, and rendering it.

Precedence: the tokenizer's own template when it ships one; else the operator's
`--chat-template` (a Jinja file, or the template itself as a string, as vLLM takes it); else
`DEFAULT_TEMPLATE`, a plain-text transcript suited to a base model such as GPT-2, which has no
chat format of its own and continues text it has seen in that shape:

    <system prompt>

    User: Hello
    Assistant: Hi there
    User: What is LoRA?
    Assistant:

With the default template the request also stops at "\\nUser:" (when it has room for another
stop string), so a base model does not go on to write the user's next turn.
Templates render in transformers' sandboxed Jinja environment (`apply_chat_template`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from server.engine.errors import InvalidRequest

DEFAULT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] in ('system', 'developer') %}{{ m['content'] }}\n\n"
    "{% else %}{{ m['role'] | capitalize }}: {{ m['content'] }}\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
DEFAULT_STOP = "\nUser:"


@dataclass(frozen=True)
class ChatTemplate:
    template: str
    source: str  # "tokenizer" | "setting" | "default"

    @property
    def stop(self) -> tuple[str, ...]:
        """Stop strings the template implies (only the plain-text default has one)."""
        return (DEFAULT_STOP,) if self.source == "default" else ()


def load_template(value: str | None) -> str | None:
    """The `--chat-template` setting: a path to a Jinja file, or a template string (it must then
    contain Jinja syntax, so a mistyped path is an error rather than a literal template). Raises
    ValueError with the reason; the server refuses to start on it."""
    if not value:
        return None
    path = Path(value).expanduser()
    try:
        text = path.read_text() if path.is_file() else None
    except OSError as e:
        raise ValueError(f"--chat-template {value!r} could not be read: {e}") from e
    if text is None:
        if not any(c in value for c in "{}\n"):
            raise ValueError(f"--chat-template {value!r} is neither a readable file nor a Jinja template")
        text = value
    try:
        ImmutableSandboxedEnvironment().parse(text)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"--chat-template is not valid Jinja: {e}") from e
    return text


def resolve(tokenizer, configured: str | None) -> ChatTemplate:
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, str) and own:
        return ChatTemplate(own, "tokenizer")
    if configured:
        return ChatTemplate(configured, "setting")
    return ChatTemplate(DEFAULT_TEMPLATE, "default")


def render(tokenizer, template: ChatTemplate, messages: list[dict[str, str]], add_generation_prompt: bool = True,
           extra: dict | None = None) -> str:
    """The prompt text, ending with the template's generation prompt (the assistant's turn) unless
    `add_generation_prompt` is false; `extra`: vLLM's `chat_template_kwargs`, the template's own variables."""
    kwargs = {k: v for k, v in (extra or {}).items() if k not in ("add_generation_prompt", "tokenize", "chat_template")}
    try:
        text = tokenizer.apply_chat_template(messages, chat_template=template.template,
                                             add_generation_prompt=add_generation_prompt, tokenize=False, **kwargs)
    except jinja2.TemplateError as e:  # e.g. a template's raise_exception on role order
        raise InvalidRequest(f"the chat template refused the conversation: {e}", param="messages") from e
    return str(text)
