"""Chat templates: jinja rendered in an immutable sandbox with transformers' settings and helpers."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from llm_torch.core.errors import TokenizerError


def _raise_exception(message: str):
    raise TokenizerError(f"chat template rejected the conversation: {message}",
                         hint="change the messages (e.g. drop the system message) to fit the model's template")


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # jinja's own tojson HTML-escapes; chat templates expect plain JSON (transformers overrides it the same way).
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=1)
def _environment() -> ImmutableSandboxedEnvironment:
    # Templates come from downloaded files: sandboxed, immutable, with transformers' whitespace settings.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
    return env


@lru_cache(maxsize=16)
def compile_template(source: str) -> jinja2.Template:
    """The compiled template; one that does not parse is a TokenizerError."""
    try:
        return _environment().from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise TokenizerError(f"chat template does not parse: {exc} (line {exc.lineno})",
                             hint="the model's chat template is broken; fix or replace it") from exc


def render(source: str, messages: list, add_generation_prompt: bool, variables: Mapping[str, Any]) -> str:
    """Render `source` for `messages` (already plain()), with the special-token names and extras in `variables`."""
    if not all(isinstance(m, dict) for m in messages):
        raise TokenizerError("chat messages must be mappings like {'role': ..., 'content': ...}",
                             hint="pass a list of role/content dicts")
    compiled = compile_template(source)
    try:
        return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt, **variables)
    except jinja2.TemplateError as exc:  # includes SecurityError from the sandbox
        raise TokenizerError(f"chat template failed: {exc}", hint="the template cannot render this input") from exc
    except (TypeError, ValueError) as exc:  # e.g. a template adding str to a message's list content
        raise TokenizerError(f"chat template failed on these messages: {exc}",
                             hint="check each message's role/content against what the model expects") from exc


def plain(value: Any) -> Any:
    """A copy made of JSON types only, so the template sees no object with methods of its own."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, Mapping):
        return {plain(k): plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(plain(v) for v in value)
    for base in (str, int, float):  # subclasses (str enums, numpy floats) are cut back to the base type
        if isinstance(value, base):
            return base(value) if base is not str else str.__str__(value)
    raise TokenizerError(f"chat template input holds a {type(value).__name__}, not JSON data",
                         hint="pass messages, tools and extras as str/int/float/bool/None, lists and dicts")


def named_templates(value: Any) -> dict[str, str]:
    """A `chat_template` value as configs write it: one template, or a list of {"name", "template"}."""
    if isinstance(value, str):
        return {"default": value}
    if isinstance(value, list):
        return {t["name"]: t["template"] for t in value if isinstance(t, dict) and "name" in t and "template" in t}
    return {}
