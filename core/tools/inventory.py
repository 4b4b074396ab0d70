"""The models a user has (`llm models`): the built-in one, the Hugging Face cache and the user's aliases;
what each one is (format, model_type, size) read from config.json / a GGUF header, never the weights;
and removal of a cached Hub model (huggingface_hub's delete_revisions strategy).
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from llm_torch.core.checkpoint import aliases as user_aliases
from llm_torch.core.checkpoint.hub import cache_root
from llm_torch.core.checkpoint.resolve import is_meta_layout
from llm_torch.core.errors import HubError, InputError, LLMError, ModelNotFoundError
from llm_torch.core.model.config import describe_quantization

@dataclass
class ModelEntry:
    name: str  # what to type after -m
    kind: str  # "built-in" | "hub" | "alias"
    format: str  # safetensors | gguf | quantized | meta | config only | not cached | missing
    model_type: str | None = None
    size_bytes: int | None = None
    path: str | None = None
    target: str | None = None  # aliases: the reference they name
    quantization: str | None = None  # quantized folders: "torchao Int8WeightOnlyConfig", "bitsandbytes nf4"
    revisions: list[str] = field(default_factory=list)  # hub: the refs (or short commits) in the cache
    note: str | None = None  # why an alias is broken

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def scan_hub_cache(cache_dir: Path | None = None):
    """huggingface_hub's HFCacheInfo of the cache, or None when there is no cache folder yet."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    cache_dir = cache_root(cache_dir)
    try:
        return scan_cache_dir(cache_dir)
    except CacheNotFound:
        return None
    except (OSError, ValueError) as e:
        raise HubError(f"cannot read the Hugging Face cache {cache_dir}: {e}") from None


def list_models(cache_dir: Path | None = None) -> list[ModelEntry]:
    """Built-in models, then cached Hub models (a GGUF repo: one entry per .gguf), then aliases."""
    from llm_torch.core.checkpoint.resolve import EMBEDDED_MODELS, embedded_model_path

    entries = []
    for name in EMBEDDED_MODELS:
        try:
            path = embedded_model_path(name)
            entries.append(ModelEntry(name, "built-in", *describe_path(path)[:3], path=str(path)))
        except ModelNotFoundError:
            entries.append(ModelEntry(name, "built-in", "not installed"))
    info = scan_hub_cache(cache_dir)
    hub_entries = _hub_entries(info) if info is not None else []
    entries += hub_entries
    known = {e.name: e for e in entries}
    for name, target in sorted(user_aliases.load_aliases().items()):
        entries.append(_alias_entry(name, target, known))
    return entries


def _hub_entries(info) -> list[ModelEntry]:
    out = []
    for repo in sorted(info.repos, key=lambda r: r.repo_id.lower()):
        if repo.repo_type != "model":
            continue
        revision = _newest(repo)
        refs = sorted({ref for rev in repo.revisions for ref in rev.refs}) or [r.commit_hash[:8] for r in repo.revisions]
        ggufs = sorted((f for f in revision.files if f.file_name.lower().endswith(".gguf")),
                       key=lambda f: str(f.file_path)) if revision else []
        has_st = revision is not None and any(f.file_name.endswith(".safetensors") for f in revision.files)
        if revision is not None and (has_st or not ggufs):
            fmt, model_type, _, quant = describe_path(revision.snapshot_path)
            out.append(ModelEntry(repo.repo_id, "hub", fmt, model_type, repo.size_on_disk,
                                  str(revision.snapshot_path), quantization=quant, revisions=refs))
        for f in ggufs:
            out.append(ModelEntry(f"{repo.repo_id}/{f.file_path.relative_to(revision.snapshot_path).as_posix()}", "hub",
                                  "gguf", gguf_architecture(f.file_path), f.size_on_disk, str(f.file_path), revisions=refs))
    return out


def _newest(repo):
    """The revision `main` points at, else the most recently modified one (None for an empty repo)."""
    revisions = sorted(repo.revisions, key=lambda r: r.last_modified, reverse=True)
    main = [r for r in revisions if "main" in r.refs]
    return (main or revisions or [None])[0]


def _alias_entry(name: str, target: str, known: dict[str, ModelEntry]) -> ModelEntry:
    try:
        final = user_aliases.expand(name)
    except LLMError as e:
        return ModelEntry(name, "alias", "broken", target=target, note=e.message)
    e = known.get(final) or known.get(final.partition("@")[0])
    if e is not None:
        return ModelEntry(name, "alias", e.format, e.model_type, e.size_bytes, e.path, target, e.quantization)
    path = Path(final)
    if path.is_absolute() or final.startswith(("~", ".")):
        path = Path(os.path.expanduser(final))
        if not path.exists():
            return ModelEntry(name, "alias", "missing", target=target, path=str(path))
        fmt, model_type, size, quant = describe_path(path)
        return ModelEntry(name, "alias", fmt, model_type, size, str(path), target, quant)
    return ModelEntry(name, "alias", "not cached", target=target)  # a Hub id (or @revision) not in the cache


def describe_path(path: Path) -> tuple[str, str | None, int, str | None]:
    """(format, model_type, bytes on disk, quantization) of a local .gguf file or model folder."""
    path = Path(path)
    if path.is_file():
        return "gguf", gguf_architecture(path), path.stat().st_size, None
    files = [p for p in path.rglob("*") if p.is_file()]
    size = sum(p.stat().st_size for p in files)
    config = read_json(path / "config.json")
    model_type = config.get("model_type") if isinstance(config.get("model_type"), str) else None
    names = {p.name for p in path.iterdir()}
    if any(n.endswith(".safetensors") for n in names):
        quant = config.get("quantization_config")
        if isinstance(quant, dict):
            return "quantized", model_type, size, describe_quantization(quant)
        return "safetensors", model_type, size, None
    ggufs = sorted(n for n in names if n.lower().endswith(".gguf"))
    if ggufs and not config:
        return "gguf", gguf_architecture(path / ggufs[0]), size, None
    if is_meta_layout(path):
        return "meta", "llama", size, None
    return ("config only" if config else "unknown"), model_type, size, None


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object file, or {} when it is absent or unreadable (listing never fails on one bad folder)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def gguf_architecture(path: Path) -> str | None:
    """`general.architecture` from a GGUF header, reading only the first key/value pairs (llama.cpp writes
    it first); None when it is not among them. Parsing the whole file (~0.3 s, the vocabulary) is not needed."""
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 16)
    except OSError:
        return None
    if head[:4] != b"GGUF" or len(head) < 24:
        return None
    (count,) = struct.unpack_from("<Q", head, 16)
    pos = 24
    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUF scalar value types
    try:
        for _ in range(min(count, 64)):
            (n,) = struct.unpack_from("<Q", head, pos)
            key = head[pos + 8:pos + 8 + n].decode("utf-8")
            (vtype,) = struct.unpack_from("<I", head, pos + 8 + n)
            pos += 12 + n
            if vtype == 8:  # string
                (m,) = struct.unpack_from("<Q", head, pos)
                value = head[pos + 8:pos + 8 + m].decode("utf-8")
                pos += 8 + m
                if key == "general.architecture":
                    return value
            elif vtype in sizes:
                pos += sizes[vtype]
            else:
                return None  # an array before the key: give up rather than walk the vocabulary
    except (struct.error, UnicodeDecodeError):
        return None
    return None


@dataclass
class Removal:
    """What `llm models --rm` would delete: every cached revision of a repo, or one."""

    repo_id: str
    revisions: list[str]  # commit hashes
    freed_bytes: int
    strategy: Any  # huggingface_hub DeleteCacheStrategy

    def execute(self) -> None:
        try:
            self.strategy.execute()
        except OSError as e:
            raise HubError(f"deleting {self.repo_id} from the cache failed: {e}") from None


def plan_removal(ref: str, cache_dir: Path | None = None) -> Removal:
    """The delete strategy for a cached Hub model `org/name[@revision]` (or an alias naming one)."""
    if user_aliases.looks_like_alias(ref) and ref in user_aliases.load_aliases():
        ref = user_aliases.expand(ref)
    repo_id, _, revision = ref.partition("@")
    if repo_id.count("/") != 1:
        raise InputError(f"'{ref}' is not a Hub model in the cache; --rm deletes cached Hub models only",
                         hint="delete local folders and files yourself; `llm aliases remove NAME` drops an alias")
    info = scan_hub_cache(cache_dir)
    repo = next((r for r in (info.repos if info else ()) if r.repo_type == "model" and r.repo_id == repo_id), None)
    if repo is None:
        raise InputError(f"'{repo_id}' is not in the Hugging Face cache ({cache_root(cache_dir)})",
                         hint="see `llm models`")
    revs = list(repo.revisions)
    if revision:
        revs = [r for r in revs if revision in r.refs or r.commit_hash.startswith(revision)]
        if not revs:
            raise InputError(f"no cached revision '{revision}' of '{repo_id}'",
                             hint=f"cached: {', '.join(sorted(r.commit_hash[:8] for r in repo.revisions))}")
    hashes = [r.commit_hash for r in revs]
    strategy = info.delete_revisions(*hashes)
    return Removal(repo_id, hashes, strategy.expected_freed_size, strategy)


def show_model(ref: str, *, offline: bool | None = None, progress: bool = False) -> dict[str, Any]:
    """Config summary, chat template (and where it comes from) and generation config of a model, from its
    config and tokenizer files (a Hub id fetches only those; a GGUF file's metadata), never its weights."""
    from llm_torch.core.checkpoint import open_checkpoint, resolve_model

    resolved = resolve_model(ref, offline=offline, progress=progress, weights=False)
    checkpoint = open_checkpoint(resolved)
    c = checkpoint.config
    summary = {
        "model_type": c.model_type, "architectures": list(c.architectures), "layers": c.num_hidden_layers,
        "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
        "attention_heads": c.num_attention_heads, "kv_heads": c.num_key_value_heads, "head_dim": c.head_dim,
        "context": c.max_position_embeddings, "vocab_size": c.vocab_size, "sliding_window": c.sliding_window,
        "rope_theta": c.rope_parameters.get("rope_theta"), "tie_word_embeddings": c.tie_word_embeddings,
        "dtype": c.torch_dtype,
    }
    quant = c.quantization_config
    if isinstance(quant, dict):
        summary["quantization"] = describe_quantization(quant)
    if c.id2label:
        summary["labels"] = [c.id2label[i] for i in sorted(c.id2label)]
    if resolved.kind == "gguf":
        template = checkpoint.meta.get("tokenizer.chat_template")
        where = "GGUF metadata tokenizer.chat_template" if template else None
        generation: dict[str, Any] = {}
    elif resolved.kind == "meta":
        template, where, generation = None, None, {}
    else:
        template, where = folder_chat_template(resolved.path)
        generation = checkpoint.generation_config()
    return {"name": resolved.name, "kind": resolved.kind, "path": str(resolved.path), "config": summary,
            "chat_template": {"source": where, "template": template}, "generation_config": generation}


def folder_chat_template(folder: Path) -> tuple[str | None, str | None]:
    """(default template, the file it comes from), by the tokenizer's precedence: chat_template.jinja,
    then chat_template.json, then tokenizer_config.json (a list of named templates: the "default" one)."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8"), jinja.name
    for name in ("chat_template.json", "tokenizer_config.json"):
        value = read_json(folder / name).get("chat_template")
        if isinstance(value, list):
            value = next((t.get("template") for t in value if isinstance(t, dict) and t.get("name") == "default"), None)
        if isinstance(value, str):
            return value, name
    return None, None
