"""Where a checkpoint comes from, as one object: a source (HF folder, Hub repo, GGUF file, Meta's
original layout, our quantized folder) resolves to a ResolvedModel, which opens as a Checkpoint that
yields config, tokenizer, generation defaults and tensors by name, lazily. The loader (core/placement/loading.py),
`llm convert`, `llm quantize`, `llm tokenize`, `llm visualize-mask` and `llm template` all read through it.

    resolved = resolve_model("smollm2")            # alias / path / org/name[@rev] -> files on disk
    checkpoint = open_checkpoint(resolved)         # config only
    checkpoint.config, checkpoint.tokenizer(), checkpoint.generation_config()
    for name, tensor in checkpoint.read(torch.float16): ...   # one tensor at a time

Modules: resolve (references, embedded models), hub (huggingface_hub: cache, tokens, offline), base
(Checkpoint, TensorInfo), hf + safetensors (the one safetensors reader / writer), gguf + gguf_reader +
gguf_rope (reading GGUF), gguf_writer (writing it), meta (consolidated.*.pth).
"""

from __future__ import annotations

from .base import Checkpoint, TensorInfo
from .resolve import DEFAULT_MODEL, EMBEDDED_MODELS, ResolvedModel, embedded_model_path, resolve_model


def open_checkpoint(resolved: ResolvedModel) -> Checkpoint:
    """The Checkpoint for a resolved reference (reads its config; tensors and tokenizer stay unread)."""
    if resolved.kind == "gguf":
        from .gguf import GGUFCheckpoint

        return GGUFCheckpoint(resolved.path)
    if resolved.kind == "meta":
        from .meta import MetaCheckpoint

        return MetaCheckpoint(resolved.path)  # torch.load(weights_only=True, mmap=True): no pickled code
    from .hf import HFCheckpoint

    return HFCheckpoint(resolved.path)


__all__ = ["Checkpoint", "TensorInfo", "DEFAULT_MODEL", "EMBEDDED_MODELS", "ResolvedModel", "embedded_model_path",
           "resolve_model", "open_checkpoint"]
