"""Streaming detokenization: text emitted token by token that adds up to exactly the full decode."""

from __future__ import annotations

from .tokenizer import Tokenizer

_REPLACEMENT = "\ufffd"


class StreamingDetokenizer:
    """Incremental decode: the segments `add_token` and `finalize` return concatenate to exactly
    `tokenizer.decode(all_ids)`, and never end inside a UTF-8 character.

    Like text-generation-inference, each step decodes only a window: the tokens of the previous emission
    (the prefix) plus the unread ones, and emits what the prefix's own decode lacks. Decoding with the
    prefix keeps sentencepiece's leading space right, since both decodes strip the same first space.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self.reset()

    def reset(self) -> None:
        """Forget everything; the next token starts a new text."""
        self._window: list[int] = []  # prefix tokens, then unread tokens
        self._read = 0  # how many of the window's tokens are prefix
        self._prefix_text = ""  # decode of the prefix tokens alone
        self._segments: list[str] = []

    @property
    def text(self) -> str:
        """All text emitted so far."""
        return "".join(self._segments)

    def add_token(self, token_id: int) -> str:
        """Take one token id; return the text it completes (often "", when it is held back)."""
        self._window.append(token_id)
        # ByteFallback decodes a run of <0xNN> tokens all-or-nothing: one bad byte turns the whole run into
        # U+FFFD, so no part of a run is final until a token that is not a byte ends it. A skipped special
        # token decodes to nothing and does not end the run.
        if token_id in self._tok.byte_fallback_ids or (self._skip and token_id in self._tok.special_ids):
            return ""
        return self._emit(final=False)

    def finalize(self) -> str:
        """Flush the held-back remainder (an unfinished character becomes U+FFFD, as in decode()).
        The stream ends here: call reset() before feeding a new one."""
        segment = self._emit(final=True)
        self._window, self._read, self._prefix_text = [], 0, ""
        return segment

    def _emit(self, final: bool) -> str:
        text = self._tok.decode(self._window, skip_special_tokens=self._skip)
        # A trailing U+FFFD is a character still missing bytes, which later tokens may complete.
        if len(text) <= len(self._prefix_text) or (text.endswith(_REPLACEMENT) and not final):
            return ""
        segment = text[len(self._prefix_text):]
        self._segments.append(segment)
        # The tokens just read become the next prefix; older ones are dropped, so the window stays short.
        self._window = self._window[self._read:]
        self._read = len(self._window)
        self._prefix_text = self._tok.decode(self._window, skip_special_tokens=self._skip)
        return segment
