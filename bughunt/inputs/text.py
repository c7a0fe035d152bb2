"""Text from `--prompt`, `--prompt-file` and `--chat` (and their keys in a ci matrix): a prompt is non-empty text; a
prompt file is UTF-8 text (one prompt: the whole file, less one final newline); a chat file is a JSON list of messages,
each an object with a non-empty string `role` and a string `content` (checked with pydantic)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from bughunt.errors import BughuntError
from bughunt.inputs.files import parse_json, read_text, validation_message

MAX_TEXT_FILE_BYTES = 16 * 1024 * 1024
PROMPT_FIX = "Give the text itself with --prompt TEXT, or a UTF-8 text file with --prompt-file FILE."
CHAT_FIX = ('Write a JSON list of messages, e.g. [{"role": "user", "content": "Hello"}, '
            '{"role": "assistant", "content": "Hi."}].')


class ChatMessage(BaseModel):
    """One message of a chat file; the chat template decides which roles it accepts."""

    model_config = ConfigDict(extra="forbid", strict=True)
    role: Annotated[str, Field(min_length=1)]
    content: str


_CHAT = TypeAdapter(Annotated[list[ChatMessage], Field(min_length=1)])


def check_prompt(text: str, source: str) -> str:
    """Refuse an empty prompt: it has no ids to compare (whitespace is text, and is kept)."""
    if not isinstance(text, str) or text == "":
        raise BughuntError(f"{source} is empty: a prompt needs at least one character. {PROMPT_FIX}")
    if "\x00" in text:
        raise BughuntError(f"{source} holds a NUL character, so it is binary, not text. {PROMPT_FIX}")
    return text


def read_prompt_file(path: Path, what: str = "--prompt-file") -> str:
    """The prompt a file holds: its whole text, less one final newline (editors add it). `what` names the option."""
    text = read_text(Path(path), what, PROMPT_FIX, MAX_TEXT_FILE_BYTES)
    text = text[:-2] if text.endswith("\r\n") else text[:-1] if text.endswith("\n") else text
    if not text.strip("\n\r"):
        raise BughuntError(f"{what} {path} is empty. {PROMPT_FIX}")
    return check_prompt(text, f"{what} {path}")


def read_chat_file(path: Path, what: str = "--chat") -> list[dict]:
    """The messages of a chat file, as plain dicts for the chat template. `what` names the option."""
    text = read_text(Path(path), what, CHAT_FIX, MAX_TEXT_FILE_BYTES)
    doc = parse_json(text, Path(path), what, CHAT_FIX)
    try:
        messages = _CHAT.validate_python(doc)
    except ValidationError as e:
        raise BughuntError(validation_message(e, f"{what} {path}", CHAT_FIX, prefix="messages")) from None
    return [m.model_dump() for m in messages]
