"""OpenAI's request and response shapes for `llm serve` (chat completions, completions, models, errors).

Requests are pydantic models that ignore unknown fields (OpenAI clients send many) and are strict about
the types of the fields they know: a string where a number belongs is a 400, not silently converted.
Extensions that llama.cpp and vLLM also accept: top_k, min_p, repetition_penalty.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Callable, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from llm_torch.core.errors import InputError
from llm_torch.core.engine.events import Timings
from llm_torch.core.engine.spec import GenerationSpec
from llm_torch.core.engine.sampling_spec import sampling_spec

# The engine's finish reasons as OpenAI names them (a stop string is a 'stop' there).
FINISH = {"stop": "stop", "stop_string": "stop", "length": "length"}


class RequestError(InputError):
    """A request OpenAI's API would refuse with a 400 naming `param`."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(_Request):
    include_usage: bool = False


class _Sampling(_Request):
    model: str | None = None
    max_tokens: int | None = Field(None, ge=0)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1)
    logprobs: Any = None

    def check_supported(self) -> None:
        if self.n != 1:
            raise RequestError(f"n = {self.n}: only one choice per request is supported", "n")
        if self.logprobs:
            raise RequestError("logprobs are not supported", "logprobs")

    def spec(self, generation_config: dict, max_tokens: int | None, context: int) -> GenerationSpec:
        """The engine's spec: what the request sets, else the model's generation_config, else greedy.
        No max_tokens: up to the end of the context (OpenAI's behaviour)."""
        sampling = sampling_spec(
            generation_config, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, min_p=self.min_p,
            repetition_penalty=self.repetition_penalty, seed=self.seed, frequency_penalty=self.frequency_penalty,
            presence_penalty=self.presence_penalty)
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return GenerationSpec(max_new_tokens=context if max_tokens is None else max_tokens, sampling=sampling, stop=stop)


class TextPart(_Request):
    type: str
    text: str | None = None


class Message(_Request):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def text(self, index: int) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise RequestError(f"messages[{index}]: content parts of type '{part.type}' are not supported (text only)",
                                   f"messages.{index}.content")
            parts.append(part.text)
        return "".join(parts)


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=0)

    def template_messages(self) -> list[dict[str, str]]:
        """role/content dicts for the chat template ('developer' is OpenAI's newer name for 'system')."""
        out = [{"role": "system" if m.role == "developer" else m.role, "content": m.text(i)}
               for i, m in enumerate(self.messages)]
        if all(m["role"] == "system" for m in out):
            raise RequestError("messages hold no user or assistant message", "messages")
        return out


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    echo: bool = False

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise RequestError("prompt is an empty list", "prompt")
        if all(isinstance(x, int) for x in p):
            return [p]
        return list(p)


# ---- responses --------------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(timings: list[Timings]) -> dict[str, Any]:
    prompt = sum(t.prompt_tokens for t in timings)
    completion = sum(t.completion_tokens for t in timings)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": sum(t.cached_tokens for t in timings)}}


def chat_response(rid: str, model: str, text: str, finish: str, timings: Timings) -> dict[str, Any]:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": FINISH.get(finish, finish), "logprobs": None}],
            "usage": usage([timings])}


def chat_chunk(rid: str, model: str, created: int, delta: dict, finish: str | None = None,
               with_usage: bool = False) -> dict[str, Any]:
    out = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
           "choices": [{"index": 0, "delta": delta, "finish_reason": FINISH.get(finish, finish) if finish else None,
                        "logprobs": None}]}
    if with_usage:
        out["usage"] = None  # OpenAI: null on every chunk but the last, extra one
    return out


def chat_content_chunk(rid: str, model: str, created: int, with_usage: bool = False) -> Callable[[str], str]:
    """text -> the JSON of chat_chunk(rid, model, created, {"content": text}), as json.dumps(..., ensure_ascii=False)
    writes it: the constant parts are encoded once per stream, each token encodes only its text."""
    mark = uuid.uuid4().hex
    head, tail = json.dumps(chat_chunk(rid, model, created, {"content": mark}, with_usage=with_usage),
                            ensure_ascii=False).split(f'"{mark}"')
    encode = json.JSONEncoder(ensure_ascii=False).encode
    return lambda text: f"{head}{encode(text)}{tail}"


def completion_choice(index: int, text: str, finish: str | None) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": None, "finish_reason": FINISH.get(finish, finish) if finish else None}


def completion_response(rid: str, model: str, choices: list[dict], timings: list[Timings]) -> dict[str, Any]:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": usage(timings)}


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
