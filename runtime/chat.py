"""Chat: a model's chat template turns a list of messages into the prompt it was tuned on.

The template is the Jinja source a checkpoint carries as `chat_template.jinja` (written by
`import` from an HF folder's chat_template.jinja or tokenizer_config.json, or from a GGUF
file's tokenizer.chat_template) and an artifact copies beside its tokenizer.json (the
manifest's `tokenizer.chat_template`). It is rendered in Jinja's immutable sandbox: a template
is code from the model's publisher, and the sandbox gives it no access to Python internals
and no way to change its inputs. The variables are those transformers gives a template:
`messages`, `add_generation_prompt`, `bos_token`, `eos_token`, and the `raise_exception` and
`strftime_now` helpers.

The turn ends where the template says: `end_of_turn_ids` renders a finished two-turn
conversation and takes the special tokens that follow the assistant's text (ChatML's
<|im_end|>, Llama 3's <|eot_id|>); those and the eos ids stop a chat decode.
"""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path

from tidar_runtime.errors import TiDARError

CHAT_TEMPLATE_FILE = "chat_template.jinja"
MAX_TEMPLATE_BYTES = 1 << 20
ROLES = ("system", "user", "assistant", "tool", "developer")


class ChatTemplate:
    """A compiled chat template with the tokenizer it renders for."""

    def __init__(self, source: str, tokenizer, bos_id: int | None = None, eos_ids=()):
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)  # Llama 3.x templates date the prompt
        try:
            self._template = env.from_string(source)
        except TemplateError as e:
            raise TiDARError(f"chat template does not compile: {_line(e)}") from None
        self.tokenizer = tokenizer
        self.eos_ids = list(eos_ids)
        self._specials = {"bos_token": _token(tokenizer, bos_id), "eos_token": _token(tokenizer, self.eos_ids[0])
                          if self.eos_ids else ""}
        self.end_of_turn_ids = end_of_turn_ids(self)

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt text of `messages` (checked by `check_messages`); a one-line TiDARError
        when the template refuses them or fails."""
        from jinja2 import TemplateError

        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         **self._specials)
        except TemplateError as e:
            raise TiDARError(f"chat template: {_line(e)}") from None
        except (TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
            raise TiDARError(f"chat template failed on these messages ({type(e).__name__}: {_line(e)})") from None

    def encode(self, messages: list[dict]) -> list[int]:
        """Prompt ids of `messages` with the assistant's turn opened; the template writes every
        special token itself, so the tokenizer adds none."""
        return self.tokenizer.encode(self.render(messages), add_special_tokens=False).ids

    @property
    def stop_ids(self) -> list[int]:
        """Ids that end the assistant's turn: the eos ids and the template's end-of-turn tokens."""
        return list(dict.fromkeys(self.eos_ids + self.end_of_turn_ids))


def _raise(message):
    from jinja2 import TemplateError

    raise TemplateError(str(message))


def _line(e: Exception) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:200]


def _token(tokenizer, token_id: int | None) -> str:
    text = tokenizer.id_to_token(token_id) if token_id is not None else None
    return text or ""


def end_of_turn_ids(chat: ChatTemplate) -> list[int]:
    """The special tokens the template writes right after an assistant message's text (none if
    the template cannot render a plain user/assistant exchange)."""
    marker = "tidar-end-of-turn-probe"
    try:
        text = chat.render([{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}],
                           add_generation_prompt=False)
    except TiDARError:
        return []
    if marker not in text:
        return []
    after = text[text.rindex(marker) + len(marker):].lstrip(" ")
    ids = chat.tokenizer.encode(after, add_special_tokens=False).ids
    special = {i for i, t in chat.tokenizer.get_added_tokens_decoder().items() if t.special}
    return ids[:1] if ids and ids[0] in special else []  # what follows that token belongs to the next turn


def check_messages(messages) -> list[dict]:
    """OpenAI chat messages -> [{"role", "content"}] with text content; a TiDARError naming the
    first bad entry. Content may be a string or a list of {"type": "text", "text"} parts."""
    if not isinstance(messages, list) or not messages:
        raise TiDARError("messages must be a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise TiDARError(f"messages[{i}] must be an object with role and content")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise TiDARError(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {str(role)[:40]!r}")
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise TiDARError(f"messages[{i}].content: only text parts ({{'type': 'text', 'text': ...}}) "
                                 "are supported")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise TiDARError(f"messages[{i}].content must be a string")
        out.append({"role": role, "content": content})
    return out


def read_template(folder: str | os.PathLike, name: str = CHAT_TEMPLATE_FILE) -> str | None:
    """The chat template source in `folder` (None when it has none)."""
    from tidar_runtime.paths import checkpoint_root, confined

    path = confined(folder, name, f"{folder}: chat template", root=checkpoint_root(folder))
    if not path.is_file():
        return None
    if path.stat().st_size > MAX_TEMPLATE_BYTES:
        raise TiDARError(f"{path}: chat template larger than {MAX_TEMPLATE_BYTES} bytes")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise TiDARError(f"{path}: chat template is not UTF-8 text") from None


def artifact_chat(artifact_dir: str | os.PathLike, tokenizer, manifest=None) -> ChatTemplate | None:
    """The chat template of an artifact (the manifest's tokenizer.chat_template), None without one
    or without a tokenizer."""
    from tidar_runtime.manifest import load_manifest

    m = manifest if manifest is not None else load_manifest(artifact_dir, verify="none")
    name = m.tokenizer.get("chat_template")
    if name is None or tokenizer is None:
        return None
    source = read_template(Path(artifact_dir), name)
    if source is None:
        raise TiDARError(f"{artifact_dir}: chat template {name} named by the manifest is missing")
    return ChatTemplate(source, tokenizer, m.tokenizer.get("bos_token_id"), m.eos_ids)
