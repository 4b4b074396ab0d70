"""Helpers shared by commands: prompt input, model loading with progress, sampling specs."""

from __future__ import annotations

import os
import sys
import time

from llm_torch.core.phases import mark

from . import render


def read_prompt(argument: str | None, *, required: bool = True, command: str = "generate") -> str:
    """The prompt from the argument, from piped stdin, or both (argument first, then stdin). `command`: how the
    hint starts the command that reads it ("tokenize -m MODEL")."""
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
        raise InputError("no prompt given", hint=f'pass it as an argument or pipe it in: echo "Hello" | llm {command}')
    return prompt


def stdin_lines():
    """stdin decoded line by line, so the first results come out before the input ends (llm run, llm embed)."""
    from llm_torch.core.errors import InputError

    for n, raw in enumerate(sys.stdin.buffer, 1):
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise InputError(f"stdin line {n} is not valid UTF-8 (byte offset {e.start})", hint="convert the input to UTF-8") from None


def tp_worker(tp: int | None, model_ref: str | None, dtype: str, device: str, context: int | None = None,
              kv_cache: str = "auto") -> bool:
    """On ranks > 0 of a tensor-parallel run (torchrun, or started by `--tp`): load this rank's shard and
    follow rank 0 until it stops; -> True when this process was such a rank (the command ends there,
    without reading input or printing)."""
    if not _launched():
        return False
    from llm_torch.core.placement.distributed import launched_rank

    if not launched_rank():
        return False
    import torch.distributed as dist

    from llm_torch.core.placement import distributed
    from llm_torch.core.placement.loading import load_model, resolve_device
    from llm_torch.core.engine.runner import TorchRunner
    from llm_torch.core.placement.tensor_parallel import Shard

    ctx = distributed.init(tp, resolve_device(device))
    # --context sizes every rank's memory check as it does rank 0's
    loaded = load_model(model_ref, dtype=dtype, device=str(ctx.device), progress=False, shard=Shard(ctx.rank, ctx.world),
                        context=context, kv_cache=kv_cache)
    dist.barrier()  # loaded everywhere (rank 0 waits here too)
    distributed.follow(TorchRunner(loaded.model, "tensor parallel"), ctx)
    dist.destroy_process_group()
    return True


def _launched() -> bool:
    """Started by torchrun or by `--tp` (core.placement.distributed.launched_rank's test, without importing torch)."""
    return int(os.environ.get("WORLD_SIZE") or 1) > 1


def handled_before_input(tp: int | None, model_ref: str | None, dtype: str, device: str, device_map: str | None,
                         dry_run: bool, *, context: int | None = None, kv_cache: str = "auto") -> bool:
    """True when this process's part of the command is done before any input is read: a tensor-parallel
    rank > 0 (it followed rank 0 to the end), or --dry-run (it printed the memory plan)."""
    if tp_worker(tp, model_ref, dtype, device, context, kv_cache):
        return True
    if dry_run:
        print_plan(model_ref, dtype, device, device_map, context, kv_cache)
        return True
    return False


def _tensor_parallel(tp: int | None, device: str, model_ref: str | None):
    """Rank 0's process group (starting ranks 1..tp-1 itself without a launcher)."""
    from llm_torch.core.checkpoint import open_checkpoint, resolve_model
    from llm_torch.core.placement.distributed import init
    from llm_torch.core.placement.loading import resolve_device
    from llm_torch.core.placement.tensor_parallel import check_splits

    if not _launched():  # before starting any process: a split that cannot work fails here, alone
        check_splits(open_checkpoint(resolve_model(model_ref, weights=False)).config, tp)
    return init(tp, resolve_device(device))


def print_plan(model_ref: str | None, dtype: str, device: str, device_map: str | None, context: int | None = None,
               kv_cache: str = "auto") -> None:
    """--dry-run: where the weights and one context (--context, else the model's) of KV cache would go, from the
    config alone (stdout): the plan loading would follow (core.placement.loading.plan_load)."""
    from llm_torch.core.checkpoint import open_checkpoint, resolve_model

    resolved = resolve_model(model_ref, weights=False)  # before torch is imported: an unknown model fails at once
    from llm_torch.core.placement.loading import plan_load

    plan = plan_load(open_checkpoint(resolved), dtype=dtype, device=device, device_map=device_map, context=context,
                     check=False, kv_cache=kv_cache)
    dtype_name = str(plan.dtype).removeprefix("torch.")
    what = f"GGUF blocks + {dtype_name} weights" if plan.packed_kinds else f"{dtype_name} weights"
    render.write(f"{resolved.name} ({what}):\n" + "\n".join(plan.lines()) + "\n")


def load(model_ref: str | None, dtype: str, device: str, *, compile: bool = False, quiet: bool = False,
         quantize: str | None = None, tp: int | None = None, device_map: str | None = None, head: str | None = None,
         context: int | None = None, kv_cache: str = "auto"):
    """Load a model, saying on stderr what was loaded and how long it took.

    quantize: a scheme name (--quantize int8 ...): the float model is quantized in memory after loading.
    tp: split it over this many processes (tensor parallel); this process is rank 0.
    device_map: "auto": its layers over the GPUs, then the CPU (core/placement/device_map.py).
    head: build this head instead of the checkpoint's (model.HEADS; "feature_extraction": the bare decoder).
    context: KV positions per sequence the memory checks count (--context; None: the model's).
    kv_cache: what the KV cache stores (--kv-cache), set on the model once it is final (quantized).
    """
    from llm_torch.core.errors import InputError

    if tp and tp > 1 and (quantize or compile or device_map):
        other = "--quantize" if quantize else "--compile" if compile else "--device-map"
        raise InputError(f"--tp cannot be combined with {other}")
    if device_map and (quantize or compile):
        raise InputError(f"--device-map cannot be combined with {'--quantize' if quantize else '--compile'}")
    parallel = bool(tp and tp > 1) or _launched()
    t0 = time.perf_counter()
    resolved = None
    if not parallel:  # resolved before torch is imported: an unknown model, alias or path fails at once
        from llm_torch.core.checkpoint import resolve_model

        resolved = resolve_model(model_ref, progress=not quiet and sys.stderr.isatty())
    resolving = time.perf_counter() - t0
    mark("resolve")
    spec = None
    if quantize:
        from llm_torch.core.errors import UnsupportedError
        from llm_torch.core.placement.loading import resolve_device
        from llm_torch.quant.spec import make_spec

        where = resolve_device(device)
        spec = make_spec(quantize, cuda=where.type == "cuda")  # a bad name fails before the weights are read
        if where.type not in ("cpu", "cuda"):
            raise UnsupportedError(f"--quantize runs on the CPU and on CUDA GPUs, not on {where}",
                                   hint="add --device cpu")
    t0 = time.perf_counter() - resolving  # the time shown counts resolving and reading, not torch's import
    ctx = None
    if parallel:
        ctx = _tensor_parallel(tp, device, model_ref)
        loaded = _load_rank0(ctx, model_ref, dtype, context, kv_cache)
    else:
        import torch  # noqa: F401 - alone first, so the phase marks tell torch's import from ours

        mark("import torch")
        from llm_torch.core.placement.loading import load_resolved

        mark("import loader")
        loaded = load_resolved(resolved, dtype=dtype, device=device, head=head, device_map=device_map, context=context,
                               kv_cache=kv_cache, packed=spec is None)  # --quantize works on the decoded float weights
    if spec is not None:
        from llm_torch.quant.api import quantize_loaded

        notes = quantize_loaded(loaded, spec).notes
        if not quiet:
            for note in notes:
                render.warn(note)
    if compile:
        from llm_torch.core.engine.runner import native_problem
        from llm_torch.core.engine.speed import compile_model

        if native_problem(loaded.model) is None:
            render.warn("--compile replaces the native decode step with a compiled graph of the PyTorch layers: "
                        "slower on this CPU (see README), and the first token waits 20-90 s for the compile")
        compile_model(loaded.model)
    mark("load")
    if not quiet or sys.stderr.isatty():
        from llm_torch.core.model.layers import compute_dtype

        weights = next(loaded.model.parameters())
        compute = str(compute_dtype(weights.dtype, weights.device)).removeprefix("torch.")
        how = loaded.dtype_name if compute == loaded.dtype_name else f"{loaded.dtype_name} weights, {compute} compute"
        how += f", {loaded.quantization} quantized" if spec is not None else _saved_quantization(loaded.config.raw)
        if hasattr(loaded.model, "kv_format"):
            how += f", {loaded.model.kv_format()} KV cache"
        chosen = " (--dtype auto)" if dtype == "auto" else ""
        from llm_torch.core.engine.runner import describe

        if ctx is not None or loaded.device_plan is not None:
            how += f"; {describe(loaded.model)}"
        elif weights.device.type == "cpu":
            from llm_torch.core.kernels import status

            import torch

            threads = torch.get_num_threads()
            how += f"; decode on {status().detail} ({describe(loaded.model)}), {threads} thread{'s' * (threads != 1)}"
        render.info(f"loaded {loaded.name}: {how}{chosen} on {weights.device} in {time.perf_counter() - t0:.2f} s")
    return loaded


def _load_rank0(ctx, model_ref, dtype, context=None, kv_cache="auto"):
    import torch.distributed as dist

    from llm_torch.core.placement import distributed
    from llm_torch.core.errors import ResourceError
    from llm_torch.core.placement.loading import load_model
    from llm_torch.core.engine.runner import TorchRunner, install
    from llm_torch.core.placement.tensor_parallel import Shard

    loaded = load_model(model_ref, dtype=dtype, device=str(ctx.device), progress=False, shard=Shard(0, ctx.world),
                        context=context, kv_cache=kv_cache)
    try:
        dist.barrier()
    except RuntimeError as e:  # a rank died while loading: its connection closed
        why = distributed.worker_failure(ctx) or str(e).splitlines()[0]
        raise ResourceError(f"tensor parallel rank failed: {why}") from None
    # The native step has no all-reduce between layers: the ranks run the PyTorch layers.
    install(loaded.model, lambda m: distributed.TPRunner(TorchRunner(m, "the native step has no all-reduce"), ctx))
    return loaded


def _saved_quantization(raw: dict) -> str:
    """', <scheme> quantized' for a folder written by llm quantize (or the Hub), else ''."""
    qc = raw.get("quantization_config") or {}
    if not qc:
        return ""
    from llm_torch.core.model.config import describe_quantization

    return f", {describe_quantization(qc)} quantized"


def sampling_line(sampling, generation_config: dict) -> str:
    """What --stats shows of the sampling settings in effect, and where their defaults came from."""
    if sampling.greedy and sampling.repetition_penalty == 1.0:
        how = "greedy"
    else:
        names = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed")
        off = {"top_k": 0, "top_p": 1.0, "min_p": 0.0, "repetition_penalty": 1.0, "seed": None}
        how = ", ".join(f"{k} {getattr(sampling, k)}" for k in names if getattr(sampling, k) != off.get(k, object()))
    source = "the model's generation_config" if generation_config else "llm's defaults (the model has no generation_config)"
    return f"sampling: {how} (unset flags: {source}; --temperature 0 for greedy)"


def encode_prompt(tokenizer, text: str, *, chat: bool, system: str | None) -> list[int]:
    if not chat:
        return tokenizer.encode(text, add_special_tokens=True)
    rendered = tokenizer.apply_chat_template(chat_messages(tokenizer, text, system), add_generation_prompt=True)
    # The template already holds BOS and other specials; encoding must not add them again.
    return tokenizer.encode(rendered, add_special_tokens=False)


_FOLD_TOLD: set[int] = set()


def chat_messages(tokenizer, text: str, system: str | None) -> list[dict[str, str]]:
    """One user message, with the system prompt as a message of its own, or folded into the user's for
    templates without a system role (Gemma's), as transformers users do; a warning says so."""
    from llm_torch.core.tokenizer.system_prompt import system_role_supported, with_system

    supported = not system or system_role_supported(tokenizer)
    if not supported and id(tokenizer) not in _FOLD_TOLD:
        _FOLD_TOLD.add(id(tokenizer))  # once per run, not per input line
        render.warn("this model's chat template has no system role: the system prompt is put at the start of "
                    "the user message")
    return with_system(system, [{"role": "user", "content": text}], supported)


def use_chat_template(tokenizer, value: str | None) -> None:
    """--chat-template: a file's contents, or the template text itself, instead of the model's template."""
    from pathlib import Path

    from llm_torch.core.errors import InputError

    if value is None:
        return
    path = Path(value).expanduser()
    if path.is_file():
        try:
            value = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(f"cannot read the chat template {path}: {e}") from None
    elif "{{" not in value and "{%" not in value:
        raise InputError(f"--chat-template: no file '{value}', and the text is not a jinja template",
                         hint="give a template file, or the template itself ('{% for m in messages %}...')")
    tokenizer.override_chat_template(value)