"""`llm serve`'s API key: refused when blank, compared in constant time. Torch- and FastAPI-free, so the CLI
checks the key before it loads anything."""

from __future__ import annotations

import hashlib
import hmac

from llm_torch.core.errors import InputError


def checked_api_key(key: str | None) -> str | None:
    """The key to require, stripped (as the header's token is); None for no key. A blank key is an error, never
    "no authentication": `--api-key "$(cat missing-file)"` must not open the server to everyone."""
    if key is None:
        return None
    if not key.strip():
        raise InputError("the API key is empty",
                         hint="give --api-key (or LLM_API_KEY) a key, or leave both unset to serve without one")
    return key.strip()


class ApiKey:
    def __init__(self, key: str):
        self._digest = hashlib.sha256(key.encode()).digest()

    def matches(self, token: bytes) -> bool:
        """In constant time: compare_digest is constant-time for equal lengths only, so both sides are hashed
        first (a fixed 32 bytes, whatever the token's length)."""
        return hmac.compare_digest(hashlib.sha256(token).digest(), self._digest)
