"""A multi-turn chat with a local model: one KV cache across turns. UI-free: it never prints.

Each turn renders the whole conversation with the model's chat template, encodes it, and hands the ids to
the session's one-slot engine, whose prefix reuse finds them in the KV cache (the previous prompt plus the
tokens generated for the answer): only the ids after the longest common prefix are prefilled.
A template that renders a past answer differently from how it was generated (an end-of-turn token after
it, stripped spaces, another tokenization of the same text) just makes the common prefix a little shorter.

When the conversation no longer fits the context, the oldest exchanges (user + answer) leave the window
the model sees; the system prompt always stays. Templates without a system role (Gemma) get the system
text folded into the first user message of the window.
"""

from __future__ import annotations

from typing import Iterator, Sequence

from .chat_settings import ChatSettings
from .conversation import ChatNotice, Conversation
from llm_torch.core.engine.engine import Engine, EngineConfig
from llm_torch.core.errors import InputError
from llm_torch.core.engine.events import GenerationEvent
from llm_torch.core.engine.spec import GenerationSpec, context_length
from llm_torch.core.tokenizer.system_prompt import system_role_supported, with_system


class ChatSession(Conversation):
    """A conversation with a local model, answered by a one-slot engine kept across turns."""

    def __init__(self, model, tokenizer, *, model_name: str = "", settings: ChatSettings | None = None,
                 system: str | None = None, context: int | None = None):
        """context: KV positions the conversation may take (None: the model's context)."""
        super().__init__(model_name=model_name, settings=settings, system=system)
        self.model = model
        self.tokenizer = tokenizer
        self.context = min(context or context_length(model), context_length(model))
        self._engine: Engine | None = None  # one slot, kept across turns: its KV cache is the conversation's
        self._fold_told = False
        self.system_role = system_role_supported(tokenizer)

    @property
    def cached_tokens(self) -> int:
        return len(self._engine.slot_tokens[0]) if self._engine is not None else 0

    # ---- rendering -----------------------------------------------------------------------------------

    def chat_messages(self, messages: Sequence[dict[str, str]] | None = None) -> list[dict[str, str]]:
        """What the template gets for the window (or `messages`): system first, or folded into the first
        user message when the template has no system role."""
        window = [dict(m) for m in (self._messages[self._start:] if messages is None else messages)]
        return with_system(self.system, window, self.system_role)

    def render(self, messages: Sequence[dict[str, str]] | None = None, add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(self.chat_messages(messages),
                                                  add_generation_prompt=add_generation_prompt)

    def prompt_ids(self, messages: Sequence[dict[str, str]] | None = None) -> list[int]:
        # The rendered template holds BOS and the other specials itself.
        return self.tokenizer.encode(self.render(messages), add_special_tokens=False)

    def context_used(self) -> int:
        """Tokens the conversation in the window takes (with the generation prompt)."""
        return len(self.prompt_ids()) if self._messages[self._start:] else 0

    def _fit(self) -> tuple[list[int], int]:
        """The prompt ids of the window, dropping the oldest exchanges until it leaves room for an answer."""
        reserve = max(1, min(self.settings.max_new_tokens, self.context // 4))
        dropped = 0
        while True:
            ids = self.prompt_ids()
            if len(ids) + reserve <= self.context:
                return ids, dropped
            if len(self._messages) - self._start <= 1:
                raise InputError(
                    f"the message needs {len(ids)} tokens, with room for {reserve} more for the answer; "
                    f"the context holds {self.context}",
                    hint="shorten the message (or the system prompt), or lower max_new_tokens",
                )
            self._start += 2
            dropped += 1

    def _stream(self, ids: list[int], dropped: int, undo) -> Iterator[GenerationEvent | ChatNotice]:
        generated: list[int] = []
        final, req, failed = None, None, False
        try:
            if self.system and not self.system_role and not self._fold_told:
                self._fold_told = True
                yield ChatNotice("system_folded", "this model's chat template has no system role: the system "
                                                  "prompt is sent at the start of the first user message")
            if dropped:
                yield ChatNotice("context_trimmed",
                                 f"context full ({self.context} tokens): dropped the oldest {dropped} exchange(s) "
                                 f"from what the model sees, kept the system prompt")
            if self._engine is None:
                self._engine = Engine(self.model, self.tokenizer, EngineConfig(max_batch=1, max_context=self.context))
            spec = GenerationSpec(max_new_tokens=self.settings.max_new_tokens, sampling=self.settings.sampling)
            req = self._engine.add(ids, spec)
            events = self._engine.follow(req)
            try:
                for event in events:
                    generated.extend(event.token_ids)
                    if event.finish_reason:
                        final = event
                    yield event
            finally:
                events.close()
        except Exception:
            failed = True
            raise
        finally:
            if req is None or (failed and not generated):
                undo()  # stopped before anything was generated: the turn did not happen
            else:
                answer = self.tokenizer.decode(generated, skip_special_tokens=True)
                self._commit(len(ids), req.timings.cached_tokens, dropped, generated, answer, final, req.timings)
