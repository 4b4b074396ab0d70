"""The system prompt and chat templates: does a template take a system role, and if not, fold the system
text into the first user message (as transformers users do for Gemma's template)."""

from __future__ import annotations

from llm_torch.core.errors import TokenizerError

_PROBE = "llm-torch system probe"


def system_role_supported(tokenizer) -> bool:
    """Probe the template once: does it accept (and show) a system message?"""
    user = [{"role": "user", "content": "hi"}]
    try:
        text = tokenizer.apply_chat_template([{"role": "system", "content": _PROBE}] + user)
    except TokenizerError:
        tokenizer.apply_chat_template(user)  # a template that fails here too is broken: say so
        return False
    return _PROBE in text


def with_system(system: str | None, messages: list[dict[str, str]], supported: bool) -> list[dict[str, str]]:
    """messages with the system prompt first, or folded into the first user message (as transformers users
    do for templates without a system role, e.g. Gemma's)."""
    if not system:
        return messages
    if supported:
        return [{"role": "system", "content": system}] + messages
    if messages and messages[0]["role"] == "user":
        messages = [dict(messages[0], content=f"{system}\n\n{messages[0]['content']}")] + messages[1:]
    return messages
