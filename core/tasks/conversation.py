"""A chat conversation, whatever answers it: messages, system prompt, settings, turns, save/load.
UI-free: it never prints. Subclasses answer: core/tasks/chat.py with a local model, core/tasks/remote_chat.py over HTTP.

When the conversation no longer fits the context, the oldest exchanges (user + answer) leave the window
the model sees; the system prompt always stays.
"""

from __future__ import annotations

import inspect
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generator, Iterator

from .chat_settings import SETTING_KEYS, ChatSettings
from llm_torch.core.errors import InputError
from llm_torch.core.files import atomic_write
from llm_torch.core.engine.events import GenerationEvent, Timings

FORMAT = "llm-torch-chat"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class ChatNotice:
    """Something the user should be told (on stderr): `system_folded` or `context_trimmed`."""

    kind: str
    message: str


@dataclass
class TurnInfo:
    """What one answered turn cost. `prefilled_tokens` is what the engine ran through the model before the
    first answer token: the conversation's ids after the part the KV cache already held."""

    conversation_tokens: int  # the rendered conversation, generation prompt included
    reused_tokens: int  # of those, already in the KV cache
    prefilled_tokens: int  # conversation_tokens - reused_tokens
    dropped_turns: int  # exchanges that left the window on this turn
    finish_reason: str
    timings: Timings
    answer: str
    answer_token_ids: list[int]

class ChatTurn:
    """The events of one answer. Iterate it to run the turn; closing it before the first event undoes the
    turn (nothing was generated), closing it later keeps the partial answer."""

    def __init__(self, events: Generator[GenerationEvent | ChatNotice, None, None], undo):
        self._events, self._undo = events, undo

    def __iter__(self) -> ChatTurn:
        return self

    def __next__(self) -> GenerationEvent | ChatNotice:
        return next(self._events)

    def close(self) -> None:
        if inspect.getgeneratorstate(self._events) == inspect.GEN_CREATED:
            self._undo()  # never started: the turn did not happen (a started one cleans up itself)
        self._events.close()


class Conversation:
    """A conversation: messages, system prompt, settings, turns, save/load. `send` / `regenerate` return event
    iterators: `ChatNotice`s first, then the `GenerationEvent`s of the answer (the last one carries
    finish_reason and timings). Stopping early (Ctrl-C inside the engine, or closing the iterator) keeps the
    partial answer. Subclasses answer: ChatSession with a local model, core.tasks.remote_chat with an HTTP server.
    """

    system_role = True  # whether the system prompt goes in as a message (else: folded into the first one)
    context: int | None = None  # tokens the model sees at most (None: the server does not say)

    def __init__(self, *, model_name: str = "", settings: ChatSettings | None = None, system: str | None = None):
        self.model_name = model_name
        self.settings = settings or ChatSettings()
        self.system = system or None
        self.last_turn: TurnInfo | None = None
        self._messages: list[dict[str, str]] = []  # user/assistant, alternating, starting with user
        self._start = 0  # index of the first message still in the model's window (even)

    # ---- conversation state ------------------------------------------------------------------------

    @property
    def messages(self) -> list[dict[str, str]]:
        """The whole conversation (system first when set), including exchanges dropped from the window."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + [dict(m) for m in self._messages]

    @property
    def window_start(self) -> int:
        """How many user/assistant messages at the start are no longer shown to the model."""
        return self._start

    def set_system(self, text: str | None) -> None:
        self.system = text or None

    def set(self, key: str, value: Any) -> Any:
        """`/set KEY VALUE`; -> the parsed value."""
        self.settings = self.settings.with_value(key, value)
        return self.settings.as_dict()[key.strip().lower().replace("-", "_")]

    def clear(self) -> None:
        """A new conversation; system prompt, settings and the cached system prefix stay."""
        self._messages, self._start, self.last_turn = [], 0, None

    def undo(self) -> str:
        """Remove the last exchange; -> the user text it held."""
        if not self._messages:
            raise InputError("nothing to undo", hint="the conversation is empty")
        if self._messages[-1]["role"] == "assistant":
            self._messages.pop()
        user = self._messages.pop()["content"]
        self._start = min(self._start, len(self._messages))
        self.last_turn = None
        return user

    # ---- turns ---------------------------------------------------------------------------------------

    def send(self, text: str) -> ChatTurn:
        """Add a user message and answer it."""
        if not text.strip():
            raise InputError("the message is empty")
        if self._messages and self._messages[-1]["role"] == "user":
            raise InputError("the last message has no answer yet", hint="use /regen to answer it, or /undo")
        self._messages.append({"role": "user", "content": text})
        return self._answer(self._messages.pop)

    def regenerate(self) -> ChatTurn:
        """Answer the last user message again (the previous answer is replaced)."""
        if not self._messages:
            raise InputError("nothing to regenerate", hint="send a message first")
        old = self._messages.pop() if self._messages[-1]["role"] == "assistant" else None

        def undo():
            if old is not None:
                self._messages.append(old)

        return self._answer(undo)

    def _answer(self, undo_messages) -> ChatTurn:
        start, self.last_turn = self._start, None

        def undo():  # the turn did not happen: messages and window as they were
            self._start = start
            undo_messages()

        try:
            prompt, dropped = self._fit()
        except BaseException:
            undo()
            raise
        return ChatTurn(self._stream(prompt, dropped, undo), undo)

    def _fit(self) -> tuple[Any, int]:
        """What the answer is computed from (prompt ids, messages), and how many exchanges were dropped."""
        raise NotImplementedError

    def _stream(self, prompt: Any, dropped: int, undo) -> Iterator[GenerationEvent | ChatNotice]:
        raise NotImplementedError

    @property
    def cached_tokens(self) -> int:
        return 0

    def context_used(self) -> int:
        raise NotImplementedError

    def _commit(self, conversation_tokens: int, reused: int, dropped: int, generated: list[int], answer: str,
                final, timings: Timings) -> None:
        self._messages.append({"role": "assistant", "content": answer})
        # No final event: the consumer stopped reading (Ctrl-C in its own code).
        reason = final.finish_reason if final is not None else "interrupted"
        self.last_turn = TurnInfo(conversation_tokens, reused, conversation_tokens - reused, dropped, reason, timings,
                                  answer, generated)

    # ---- status, save, load ----------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        return {
            "model": self.model_name,
            "system": self.system,
            "system_folded": bool(self.system) and not self.system_role,
            "messages": len(self._messages),
            "dropped_messages": self._start,
            "context": self.context,
            "context_used": self.context_used(),
            "cached_tokens": self.cached_tokens,
            "settings": self.settings.as_dict(),
        }

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": FORMAT_VERSION, "model": self.model_name,
                "settings": self.settings.as_dict(), "messages": self.messages}

    def save(self, path: str | os.PathLike) -> Path:
        """Write the conversation and settings as JSON, atomically (a temp file renamed over the target)."""
        target = Path(path).expanduser()
        data = json.dumps(self.to_dict(), ensure_ascii=False, indent=2) + "\n"
        with atomic_write(target) as f:
            f.write(data)
        return target

    def load(self, path: str | os.PathLike) -> dict[str, Any]:
        """Replace conversation, system prompt and settings with a saved file's; -> the file's data."""
        source = Path(path).expanduser()
        try:
            data = json.loads(source.read_text(encoding="utf-8"))
        except OSError as e:
            raise InputError(f"cannot read {source}: {e.strerror or e}") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InputError(f"{source} is not a JSON chat file: {e}", hint="use a file written by /save") from None
        self.apply_dict(data, where=str(source))
        return data

    def apply_dict(self, data: Any, *, where: str = "the chat file") -> None:
        system, messages = _check_messages(data, where)
        settings = self.settings
        if data.get("settings") is not None:
            if not isinstance(data["settings"], dict):
                raise InputError(f"{where}: 'settings' must be an object")
            known = {k: v for k, v in data["settings"].items() if k in SETTING_KEYS}
            try:
                settings = settings.with_values(known)
            except InputError as e:
                raise InputError(f"{where}: {e.message}", hint=e.hint) from None
        self.settings, self.system = settings, system
        self._messages, self._start, self.last_turn = messages, 0, None


def _check_messages(data: Any, where: str) -> tuple[str | None, list[dict[str, str]]]:
    if not isinstance(data, dict) or not isinstance(data.get("messages"), list):
        raise InputError(f"{where} is not a chat file (no 'messages' list)", hint="use a file written by /save")
    messages = data["messages"]
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in (
                "system", "user", "assistant"):
            raise InputError(f"{where}: message {i} needs a role (system/user/assistant) and a text content")
    system = None
    if messages and messages[0]["role"] == "system":
        system = messages[0]["content"] or None
        messages = messages[1:]
    out = [{"role": m["role"], "content": m["content"]} for m in messages]
    for i, m in enumerate(out):
        if m["role"] != ("user" if i % 2 == 0 else "assistant"):
            raise InputError(f"{where}: messages must alternate user/assistant after an optional system message",
                             hint=f"message {i + (system is not None)} is '{m['role']}'")
    if out and out[-1]["role"] != "assistant":
        raise InputError(f"{where}: the last message has no answer", hint="remove the trailing user message")
    return system, out
