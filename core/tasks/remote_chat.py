"""A conversation answered by any OpenAI-compatible server (`llm chat --base-url`): ours, llama.cpp's
llama-server, ollama, vLLM. The same conversation object as a local chat (core/tasks/conversation.py), so the REPL, its
commands, save/load and Ctrl-C behave the same; the server applies the chat template and owns the context.
"""

from __future__ import annotations

import json
import time
from typing import Any, Iterator

import httpx

from .chat_settings import ChatSettings
from .conversation import ChatNotice, Conversation
from llm_torch.core.errors import InputError, ServerError
from llm_torch.core.engine.events import GenerationEvent, Timings

FINISH = {"stop": "stop", "length": "length"}  # OpenAI's names -> ours ('content_filter' etc. pass through)


def api_base(url: str) -> str:
    """The /v1 base of an OpenAI-compatible server: 'http://host:8000' and 'http://host:8000/v1' both work."""
    url = url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise InputError(f"--base-url must start with http:// or https://, got '{url}'", hint="e.g. http://127.0.0.1:8000/v1")
    return url if url.endswith("/v1") else url + "/v1"


class RemoteChatSession(Conversation):
    def __init__(self, base_url: str, *, api_key: str | None = None, model: str | None = None,
                 settings: ChatSettings | None = None, system: str | None = None, timeout: float = 600.0):
        self.base = api_base(base_url)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(headers=headers, timeout=httpx.Timeout(timeout, connect=10.0))
        card = self._model_card(model)
        super().__init__(model_name=card["id"], settings=settings, system=system)
        self.context = card.get("max_model_len") or card.get("context_length")
        self._used = 0
        self._cached = 0

    def _model_card(self, wanted: str | None) -> dict[str, Any]:
        data = self._get("/models").get("data") or []
        ids = [m.get("id") for m in data if isinstance(m, dict)]
        if wanted is None:
            if not ids:
                raise ServerError(f"{self.base} lists no models", hint="pass the model name with -m")
            return data[0]
        # Some servers (ollama) serve more than they list: an unlisted name is left to the request to refuse.
        return next((m for m in data if m.get("id") == wanted), {"id": wanted})

    # ---- HTTP --------------------------------------------------------------------------------------

    def _get(self, path: str) -> dict[str, Any]:
        try:
            r = self.http.get(self.base + path)
        except httpx.HTTPError as e:
            raise ServerError(f"cannot reach {self.base}: {e}", hint="is the server running? (llm serve MODEL)") from None
        _raise_for(r)
        return r.json()

    @property
    def cached_tokens(self) -> int:
        return self._cached

    def context_used(self) -> int:
        return self._used if self._messages[self._start:] else 0

    def _fit(self) -> tuple[list[dict[str, str]], int]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + [dict(m) for m in self._messages[self._start:]], 0

    def _stream(self, messages, dropped: int, undo) -> Iterator[GenerationEvent | ChatNotice]:
        s = self.settings.sampling
        body = {"model": self.model_name, "messages": messages, "stream": True, "max_tokens": self.settings.max_new_tokens,
                "stream_options": {"include_usage": True}, "temperature": s.temperature, "top_p": s.top_p}
        extra = {"top_k": s.top_k or None, "min_p": s.min_p or None, "seed": s.seed,
                 "repetition_penalty": s.repetition_penalty if s.repetition_penalty != 1.0 else None}
        body.update({k: v for k, v in extra.items() if v is not None})
        pieces: list[str] = []
        final, usage, failed = None, None, False
        timings = Timings()
        t0 = time.perf_counter()
        first = None
        try:
            response = self._post_stream(body)
            try:
                for data in _sse_data(response):
                    if data == "[DONE]":
                        break
                    chunk = json.loads(data)
                    if "error" in chunk:
                        raise ServerError(f"the server stopped the answer: {_message(chunk)}")
                    usage = chunk.get("usage") or usage
                    for choice in chunk.get("choices") or []:
                        text = (choice.get("delta") or {}).get("content") or ""
                        if text:
                            now = time.perf_counter()
                            first = first if first is not None else now
                            timings.completion_tokens += 1  # chunks until the server's usage says better
                            timings.prefill_seconds, timings.decode_seconds = first - t0, now - first
                            pieces.append(text)
                            yield GenerationEvent(text, ())
                        if choice.get("finish_reason"):
                            final = choice["finish_reason"]
            finally:
                response.close()  # on Ctrl-C too: the server sees the disconnect and cancels
            if final is None:
                raise ServerError("the server ended the stream without a finish reason")
            if usage:
                timings.prompt_tokens = usage.get("prompt_tokens", 0)
                timings.completion_tokens = usage.get("completion_tokens", timings.completion_tokens)
                timings.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
                self._used = usage.get("total_tokens", 0)
                self._cached = timings.cached_tokens
            event = GenerationEvent("", (), FINISH.get(final, final), timings)
            yield event
            final = event
        except KeyboardInterrupt:
            final = GenerationEvent("", (), "interrupted", timings)  # closing the response tells the server
            yield final
        except Exception:
            failed = True
            raise
        finally:
            if failed and not pieces:
                undo()
            else:
                done = final if isinstance(final, GenerationEvent) else None
                self._commit(timings.prompt_tokens, timings.cached_tokens, dropped, [], "".join(pieces), done, timings)

    def _post_stream(self, body: dict):
        try:
            request = self.http.build_request("POST", self.base + "/chat/completions", json=body)
            response = self.http.send(request, stream=True)
        except httpx.HTTPError as e:
            raise ServerError(f"cannot reach {self.base}: {e}", hint="is the server running? (llm serve MODEL)") from None
        if response.status_code >= 400:
            response.read()
            response.close()
            _raise_for(response)
        return response


def _sse_data(response: httpx.Response) -> Iterator[str]:
    try:
        for line in response.iter_lines():
            if line.startswith("data:"):
                yield line[5:].strip()
    except httpx.HTTPError as e:
        raise ServerError(f"the connection to the server broke: {e}") from None


def _message(body: Any) -> str:
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return str(body["error"].get("message") or body["error"])
    if isinstance(body, dict) and "error" in body:
        return str(body["error"])
    return str(body)[:200]


def _raise_for(r: httpx.Response) -> None:
    if r.status_code < 400:
        return
    try:
        detail = _message(r.json())
    except ValueError:
        detail = r.text[:200] or r.reason_phrase
    if r.status_code == 401:
        raise ServerError(f"the server refused the API key: {detail}", hint="pass --api-key KEY (or set LLM_API_KEY)")
    if r.status_code in (400, 404, 413, 422):
        raise InputError(f"the server refused the request ({r.status_code}): {detail}")
    raise ServerError(f"the server answered {r.status_code}: {detail}")
