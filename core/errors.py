"""Typed errors raised by core. Each carries a one-line message and an optional hint.

The CLI has one handler that prints `error: <message>` plus the hint and exits non-zero;
core never prints.
"""

from __future__ import annotations


class LLMError(Exception):
    """Base of every error core raises on purpose."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class ConfigError(LLMError):
    """A config.json / GGUF metadata that is missing, malformed or inconsistent."""


class UnsupportedError(LLMError):
    """A well-formed option or architecture this toolkit does not implement."""


class CheckpointError(LLMError):
    """Weights that are missing, truncated, mis-shaped or unreadable."""


class TokenizerError(LLMError):
    """Tokenizer files or chat templates that cannot be used."""


class HubError(LLMError):
    """A Hugging Face Hub lookup or download that failed."""


class ModelNotFoundError(LLMError):
    """A model reference that names nothing we can open."""


class InputError(LLMError):
    """Bad user input: prompt, flags or files given to a command."""


class ServerError(LLMError):
    """An HTTP server (llm chat --base-url) that cannot be reached or answered with an error."""


class ResourceError(LLMError):
    """Not enough memory / context / an unavailable device."""
