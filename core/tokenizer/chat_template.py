"""Chat templates: jinja rendered in an immutable sandbox with transformers' settings and helpers, and
bounded: a time budget, a size budget for every string or list built and for the output, and a recursion
guard, so a hostile template is one TokenizerError instead of a hang or gigabytes allocated.
"""

from __future__ import annotations

import functools
import json
import re
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.visitor import NodeTransformer

from llm_torch.core.errors import TokenizerError

# A real template renders a long conversation in milliseconds; these only stop hostile ones.
TIME_BUDGET_S = 2.0
# Characters (or items) of one value built while rendering, and of the output: far past any context window.
MAX_CHARS = 1 << 25
# Loop items between clock reads: an empty loop body stays cheap, a runaway one stops within microseconds.
_CHECK_EVERY = 1024
_DIGITS = re.compile(r"\d+")
_deadline = threading.local()
_SIZED = (str, list, tuple)
_HINT = "the chat template is hostile or broken; use the model's own template or --chat-template"


def _over_budget(what: str) -> TokenizerError:
    return TokenizerError(f"chat template {what}", hint=_HINT)


def _check_clock() -> None:
    if time.monotonic() > getattr(_deadline, "at", float("inf")):
        raise _over_budget(f"ran past its time budget of {TIME_BUDGET_S:g} s")


def _check_size(value: Any, what: str) -> Any:
    if isinstance(value, (str, list, tuple, dict)) and len(value) > MAX_CHARS:
        raise _over_budget(f"{what} {len(value)} characters/items, past the budget of {MAX_CHARS}")
    return value


def _check_arguments(args: Iterable[Any]) -> None:
    # An int argument sizes what a call builds: 'x'.center(n), a filter's width.
    for arg in args:
        if isinstance(arg, int) and abs(arg) > MAX_CHARS:
            raise _over_budget(f"passed {arg} to a call, past the size budget of {MAX_CHARS}")


def _check_format(fmt: Any) -> None:
    # A width or precision inside a format string ('%0999999999d', '{:>999999999}') sizes its result too.
    if isinstance(fmt, str) and any(len(d) > 9 or int(d) > MAX_CHARS for d in _DIGITS.findall(fmt)):
        raise _over_budget(f"formats with a width past the size budget of {MAX_CHARS}")


def _bounded_filter(name: str, f: Any) -> Any:
    # Arguments after the filtered value (and the context / environment jinja passes first to some).
    skip = 1 + (getattr(f, "jinja_pass_arg", None) is not None)
    is_format = name == "format"

    @functools.wraps(f)  # keeps jinja's pass_context / pass_environment marks
    def bounded(*args: Any, **kwargs: Any) -> Any:
        if len(args) > skip or kwargs:
            _check_arguments(args[skip:])
            _check_arguments(kwargs.values())
        if is_format:
            _check_format(args[skip - 1])
        result = f(*args, **kwargs)
        if type(result) in _SIZED and len(result) > MAX_CHARS:
            raise _over_budget(f"filter '{name}' built a value of {len(result)}, past the budget of {MAX_CHARS}")
        return result
    return bounded


class _BoundLoops(NodeTransformer):
    """Every for loop iterates through environment.bounded_iter and every `~` joins through
    environment.bounded_concat, so loops check the clock and concatenations the size budget."""

    def visit_For(self, node: nodes.For) -> nodes.Node:
        self.generic_visit(node)
        node.iter = nodes.Call(nodes.EnvironmentAttribute("bounded_iter"), [node.iter], [], None, None,
                               lineno=node.lineno)
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:
        self.generic_visit(node)
        return nodes.Call(nodes.EnvironmentAttribute("bounded_concat"), node.nodes, [], None, None, lineno=node.lineno)


class _BoundedEnvironment(ImmutableSandboxedEnvironment):
    """The sandbox with a clock checked at every call and loop, and sizes checked before (`*`, `**`, a
    call's int arguments) or right after (`+`, `%`, `~`, filters: at most doubling past the budget) a
    value is built."""

    intercepted_binops = frozenset({"+", "*", "**", "%"})

    def _parse(self, source: str, name: str | None, filename: str | None) -> nodes.Template:
        return _BoundLoops().visit(super()._parse(source, name, filename))

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805 (jinja's spelling)
        _check_clock()
        _check_arguments(args)
        _check_arguments(kwargs.values())
        return _check_size(super().call(__context, __obj, *args, **kwargs), "call built a value of")

    def wrap_str_format(self, value: Any) -> Any:
        # str.format / format_map reach templates only through this wrapper: check the format string first.
        wrapped = super().wrap_str_format(value)
        if wrapped is not None:
            _check_format(value.__self__)
        return wrapped

    def call_binop(self, context: Any, op: str, left: Any, right: Any) -> Any:
        if op == "+":  # the common case (message + separator), kept short: chat templates run it per message
            result = left + right
            if type(result) in _SIZED and len(result) > MAX_CHARS:
                raise _over_budget(f"built a value of {len(result)} characters/items, past the budget of {MAX_CHARS}")
            return result
        if op == "*":
            seq, n = (left, right) if isinstance(right, int) else (right, left)
            if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > MAX_CHARS:
                raise _over_budget(f"multiplies a value of {len(seq)} by {n}, past the size budget of {MAX_CHARS}")
        if op == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1 \
                and right * left.bit_length() > 4096:
            raise _over_budget(f"raises {left} to the power {right}, past 4096 bits")
        if op == "%" and isinstance(left, str):
            _check_format(left)
        return _check_size(super().call_binop(context, op, left, right), "built a value of")

    @staticmethod
    def bounded_iter(iterable: Iterable[Any]) -> Iterator[Any]:
        _check_clock()
        for i, item in enumerate(iterable):
            if i % _CHECK_EVERY == _CHECK_EVERY - 1:
                _check_clock()
            yield item

    @staticmethod
    def bounded_concat(*parts: Any) -> str:
        return _check_size("".join(map(str, parts)), "joined a string of")


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
    env = _BoundedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.filters = {name: _bounded_filter(name, f) for name, f in env.filters.items()}
    # lipsum(n) builds n paragraphs in one uninterruptible call; no chat template needs it.
    del env.globals["lipsum"]
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
    _deadline.at = time.monotonic() + TIME_BUDGET_S
    try:
        return _bounded_output(compiled.generate(messages=messages, add_generation_prompt=add_generation_prompt,
                                                 **variables))
    except RecursionError:
        raise _over_budget("recursed too deeply (a macro or recursive loop that does not end)") from None
    except OverflowError as exc:  # the sandbox's own refusal of range() past MAX_RANGE
        raise _over_budget(f"asked for too much: {exc}") from None
    except MemoryError:
        raise _over_budget("ran out of memory") from None
    except jinja2.TemplateError as exc:  # includes SecurityError from the sandbox
        raise TokenizerError(f"chat template failed: {exc}", hint="the template cannot render this input") from exc
    except (TypeError, ValueError) as exc:  # e.g. a template adding str to a message's list content
        raise TokenizerError(f"chat template failed on these messages: {exc}",
                             hint="check each message's role/content against what the model expects") from exc
    finally:
        _deadline.at = float("inf")


def _bounded_output(chunks: Iterator[str]) -> str:
    out: list[str] = []
    append, size = out.append, 0
    for chunk in chunks:
        size += len(chunk)
        if size > MAX_CHARS:
            raise _over_budget(f"output passed the budget of {MAX_CHARS} characters")
        append(chunk)
    _check_clock()
    return "".join(out)


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
