"""Helpers shared by commands: prompt input, model loading with progress, sampling specs."""

from __future__ import annotations

import sys
import time
from typing import Any

from . import render


def read_prompt(argument: str | None, *, required: bool = True) -> str:
    """The prompt from the argument, from piped stdin, or both (argument first, then stdin)."""
    from llm_torch.core.errors import InputError

    parts = [argument] if argument else []
    if not sys.stdin.isatty():
        data = sys.stdin.buffer.read()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise InputError(
                f"stdin is not valid UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start})",
                hint="convert the input to UTF-8, e.g. with iconv",
            ) from None
        if text.strip():
            parts.append(text.rstrip("\n"))
    prompt = "\n".join(parts)
    if required and not prompt.strip():
        raise InputError("no prompt given", hint='pass it as an argument or pipe it in: echo "Hello" | llm generate')
    return prompt


def load(model_ref: str | None, dtype: str, device: str, *, compile: bool = False, quiet: bool = False,
         quantize: str | None = None):
    """Load a model, saying on stderr what was loaded and how long it took.

    quantize: a scheme name (--quantize int8 ...): the float model is quantized in memory after loading.
    """
    from llm_torch.core.loading import load_model

    spec = None
    if quantize:
        from llm_torch.quant.spec import make_spec

        spec = make_spec(quantize)  # a bad name fails before the weights are read
    t0 = time.perf_counter()
    loaded = load_model(model_ref, dtype=dtype, device=device, progress=not quiet and sys.stderr.isatty())
    if spec is not None:
        from llm_torch.quant.api import quantize_loaded

        notes = quantize_loaded(loaded, spec).notes
        if not quiet:
            for note in notes:
                render.warn(note)
    if compile:
        from llm_torch.core.runner import native_problem
        from llm_torch.core.speed import compile_model

        if native_problem(loaded.model) is None:
            render.warn("--compile replaces the native decode step with a compiled graph of the PyTorch layers: "
                        "slower on this CPU (see README), and the first token waits 20-90 s for the compile")
        compile_model(loaded.model)
    if not quiet or sys.stderr.isatty():
        from llm_torch.core.layers import compute_dtype

        weights = next(loaded.model.parameters())
        compute = str(compute_dtype(weights.dtype, weights.device)).removeprefix("torch.")
        how = loaded.dtype_name if compute == loaded.dtype_name else f"{loaded.dtype_name} weights, {compute} compute"
        how += f", {spec.label} quantized" if spec is not None else _saved_quantization(loaded.config.raw)
        chosen = " (--dtype auto)" if dtype == "auto" else ""
        if weights.device.type == "cpu":
            from llm_torch.core.kernels import status
            from llm_torch.core.runner import describe

            how += f"; decode on {status().detail} ({describe(loaded.model)})"
        render.info(f"loaded {loaded.name}: {how}{chosen} on {weights.device} in {time.perf_counter() - t0:.2f} s")
    return loaded


def _saved_quantization(raw: dict) -> str:
    """', <scheme> quantized' for a folder written by llm quantize (or the Hub), else ''."""
    qc = raw.get("quantization_config") or {}
    if not qc:
        return ""
    from llm_torch.quant.load import describe_config

    return f", {describe_config(qc)} quantized"


def encode_prompt(tokenizer, text: str, *, chat: bool, system: str | None) -> list[int]:
    if not chat:
        return tokenizer.encode(text, add_special_tokens=True)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    # The template already holds BOS and other specials; encoding must not add them again.
    return tokenizer.encode(rendered, add_special_tokens=False)
