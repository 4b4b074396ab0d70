"""Turn a model reference (local folder, .gguf file or Hub repo id) into a local path.

Hub downloads go through huggingface_hub's standard cache and fetch only what a safetensors
checkpoint needs; every Hub failure becomes one `HubError` line with a hint.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import httpx2  # huggingface_hub 2.x's HTTP client: its transport errors mean "no network"
from huggingface_hub import HfApi, constants, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    DisabledRepoError,
    EntryNotFoundError,
    GatedRepoError,
    HFValidationError,
    HfHubHTTPError,
    IncompleteSnapshotError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
    XetDownloadError,
)
from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
from huggingface_hub.utils import validate_repo_id

from llm_torch.core.errors import HubError, ModelNotFoundError

_ALLOW = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
          "special_tokens_map.json", "chat_template.jinja", "chat_template.json",
          "model.safetensors.index.json", "*.safetensors"]
_ALLOW_NO_WEIGHTS = [p for p in _ALLOW if "safetensors" not in p]
# Root files only ("*/*"): repos keep alternate weights in original/, onnx/...; a consolidated
# copy next to HF-format shards would double the download.
_IGNORE = ["*/*", "consolidated*.safetensors"]
_PICKLE_SUFFIXES = (".bin", ".pth", ".pt", ".ckpt")
_TRUE = {"1", "ON", "YES", "TRUE"}


@dataclass(frozen=True)
class ModelRef:
    """What a model argument names: a local folder, a local .gguf, or a Hub repo (optionally one .gguf in it)."""

    kind: Literal["folder", "gguf", "hub"]
    path: Path | None = None
    repo_id: str | None = None
    revision: str | None = None
    filename: str | None = None


def parse_model_ref(text: str) -> ModelRef:
    """Classify `text` as an existing local folder/.gguf, or a Hub ref `org/name[/file.gguf][@revision]`.

    Raises ModelNotFoundError for a missing local path, an ambiguous folder, or an invalid repo id.
    """
    path = Path(os.path.expanduser(text))
    if text and path.exists():
        if path.is_dir():
            ggufs = sorted(p.name for p in path.glob("*.gguf"))
            if (path / "config.json").exists() or not ggufs:
                return ModelRef("folder", path=path)
            if len(ggufs) == 1:
                return ModelRef("gguf", path=path / ggufs[0])
            raise ModelNotFoundError(f"{text} holds several GGUF files: {', '.join(ggufs)}",
                                     hint=f"name one, e.g. {path / ggufs[0]}")
        if path.suffix.lower() == ".gguf":
            return ModelRef("gguf", path=path)
        raise ModelNotFoundError(f"{text} is neither a model folder nor a .gguf file",
                                 hint="pass the folder holding config.json and *.safetensors")
    # Backslashes never occur in repo ids, so they mark a (Windows) path too.
    if text.startswith(("./", "../", "~", "/", ".\\")) or "\\" in text:
        raise ModelNotFoundError(f"no model at {text}", hint="check the path")
    # Repo ids cannot contain '@', so the first one starts the revision (which may hold '/').
    ref, at, revision = text.partition("@")
    parts = ref.split("/")
    is_gguf = parts[-1].lower().endswith(".gguf")
    if len(parts) >= 3 and is_gguf and not {"", ".", ".."} & set(parts):
        repo_id, filename = "/".join(parts[:2]), "/".join(parts[2:])
    elif len(parts) == 2 and not is_gguf:
        repo_id, filename = ref, None
    else:
        hint = ("check the path" if len(parts) >= 2 or is_gguf
                else "not a local path; Hub models are named org/name[@revision], or org/name/file.gguf")
        raise ModelNotFoundError(f"no model at {text}", hint=hint)
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise ModelNotFoundError(f"'{text}' is neither a local path nor a valid Hub repo id",
                                 hint="Hub models are named org/name, e.g. meta-llama/Llama-2-7b-hf") from e
    if at and not revision:
        raise ModelNotFoundError(f"empty revision in '{text}'", hint="use org/name@<branch, tag or commit>")
    return ModelRef("hub", repo_id=repo_id, revision=revision or None, filename=filename)


def resolve_hub_model(repo_id: str, revision: str | None = None, *, token: str | None = None,
                      offline: bool | None = None, progress: bool = True,
                      cache_dir: Path | None = None, weights: bool = True) -> Path:
    """Download (or find in the HF cache) the config, tokenizer and safetensors files of a Hub repo.

    `offline` defaults to HF_HUB_OFFLINE (cache only); `cache_dir` defaults to HF_HUB_CACHE / HF_HOME.
    weights=False: config and tokenizer files only (tokenize, template, visualize-mask, --dry-run).
    Returns the snapshot folder. Raises HubError.
    """
    offline = _offline() if offline is None else offline
    kw = dict(revision=revision, token=token, local_files_only=offline, cache_dir=_cache_dir(cache_dir),
              endpoint=os.environ.get("HF_ENDPOINT") or None)
    allow = _ALLOW if weights else _ALLOW_NO_WEIGHTS
    with _hub_errors(repo_id, revision, offline), _progress(progress):
        folder = Path(snapshot_download(repo_id, allow_patterns=allow, ignore_patterns=_IGNORE, **kw))
    _check_snapshot(folder, repo_id, offline, kw, weights)
    return folder


def resolve_hub_gguf(repo_id: str, filename: str, revision: str | None = None, *, token: str | None = None,
                     offline: bool | None = None, progress: bool = True,
                     cache_dir: Path | None = None) -> Path:
    """Download (or find in the HF cache) one .gguf file of a Hub repo and return its path. Raises HubError."""
    offline = _offline() if offline is None else offline
    with _hub_errors(repo_id, revision, offline, filename), _progress(progress):
        return Path(hf_hub_download(repo_id, filename, revision=revision, token=token, local_files_only=offline,
                                    cache_dir=_cache_dir(cache_dir), endpoint=os.environ.get("HF_ENDPOINT") or None))


# Env vars are read per call, not at huggingface_hub's import time, so a late setenv still counts.
def _offline() -> bool:
    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return constants.HF_HUB_OFFLINE or env.upper() in _TRUE


def cache_root(cache_dir: Path | None = None) -> Path:
    """The Hub cache folder: `cache_dir`, else HF_HUB_CACHE, else $HF_HOME/hub, else huggingface_hub's default."""
    if cache_dir is not None:
        return Path(cache_dir)
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.path.expanduser(os.environ["HF_HUB_CACHE"]))
    home = os.environ.get("HF_HOME")
    return Path(os.path.expanduser(home)) / "hub" if home else Path(constants.HF_HUB_CACHE)


def _cache_dir(cache_dir: Path | None) -> str:
    return str(cache_root(cache_dir))


@contextmanager
def _progress(enabled: bool) -> Iterator[None]:
    # Progress bars are a global switch: only undo what we changed; HF_HUB_DISABLE_PROGRESS_BARS=0 wins.
    forced_on = constants.HF_HUB_DISABLE_PROGRESS_BARS is False
    changed = not enabled and not forced_on and not are_progress_bars_disabled()
    if changed:
        disable_progress_bars()
    try:
        yield
    finally:
        if changed:
            enable_progress_bars()


def _check_snapshot(folder: Path, repo_id: str, offline: bool, kw: dict, weights: bool = True) -> None:
    """Raise HubError when the snapshot lacks config.json or safetensors weights, naming what it has instead."""
    names = [p.name for p in folder.iterdir()] if folder.is_dir() else []
    has_config, has_weights = "config.json" in names, any(n.endswith(".safetensors") for n in names)
    if has_config and (has_weights or not weights):
        return
    if not offline:  # the snapshot only holds allowed files: ask the Hub what else the repo has
        try:
            # model_info, not list_repo_files: the latter retries ~23 s with back-off when the Hub is down.
            info = HfApi(endpoint=kw["endpoint"], token=kw["token"]).model_info(repo_id, revision=folder.name)
            names += [s.rfilename for s in info.siblings or []]
        except (httpx2.HTTPError, OSError):
            pass  # the listing only improves the message below
    ggufs = [n for n in names if n.endswith(".gguf")]
    if not has_weights and any(n.endswith(_PICKLE_SUFFIXES) for n in names):
        raise HubError(f"'{repo_id}' has only pickle checkpoints (.bin/.pth), which are not loaded for safety",
                       hint="use a repo with *.safetensors weights, or convert the checkpoint to safetensors")
    if not has_weights and ggufs:
        raise HubError(f"'{repo_id}' holds GGUF files, not a safetensors checkpoint",
                       hint=f"name one: {repo_id}/{ggufs[0]}")
    missing = "*.safetensors weights" if has_config else "config.json"
    raise HubError(f"'{repo_id}' has no {missing}", hint="only transformers-format safetensors repos are supported")


@contextmanager
def _hub_errors(repo_id: str, revision: str | None, offline: bool, filename: str | None = None) -> Iterator[None]:
    """Turn huggingface_hub / network exceptions raised inside the block into one-line HubErrors."""
    rev = f" (revision '{revision}')" if revision else ""
    name = f"'{repo_id}'{rev}"
    try:
        yield
    except (HFValidationError, HfHubHTTPError, EntryNotFoundError, XetDownloadError, httpx2.HTTPError, OSError) as e:
        # snapshot_download hides network failures behind LocalEntryNotFoundError: the cause says which.
        cause = e.__cause__ if isinstance(e, LocalEntryNotFoundError) and e.__cause__ is not None else e
        no_net_hint = "check your connection, or set HF_HUB_OFFLINE=1 to use the local cache"
        if isinstance(e, IncompleteSnapshotError):
            raise HubError(f"the cached copy of {name} is incomplete and the Hub was not reached",
                           hint="run once online to finish the download") from e
        if isinstance(cause, OfflineModeIsEnabled) or (isinstance(e, LocalEntryNotFoundError) and offline):
            what = f"'{repo_id}/{filename}'{rev}" if filename else name
            raise HubError(f"{what} is not in the local cache and offline mode is on",
                           hint="run once online, or unset HF_HUB_OFFLINE") from e
        if isinstance(cause, (httpx2.TransportError, ConnectionError)):
            raise HubError(f"cannot reach the Hugging Face Hub ({_one_line(cause)})", hint=no_net_hint) from e
        if isinstance(e, GatedRepoError):
            raise HubError(f"'{repo_id}' is gated: accept its license on huggingface.co and set HF_TOKEN",
                           hint=f"https://huggingface.co/{repo_id}") from e
        if isinstance(e, RepositoryNotFoundError):
            raise HubError(f"model '{repo_id}' not found on the Hub",
                           hint="check the name; private repos need HF_TOKEN") from e
        if isinstance(e, DisabledRepoError):
            raise HubError(f"model '{repo_id}' has been disabled on the Hub") from e
        if isinstance(e, RevisionNotFoundError):
            raise HubError(f"revision '{revision}' not found in '{repo_id}'",
                           hint="check the branch, tag or commit hash") from e
        if isinstance(e, RemoteEntryNotFoundError):
            raise HubError(f"no file '{filename}' in {name}", hint="check the file name on huggingface.co") from e
        if isinstance(cause, HfHubHTTPError):
            status = cause.response.status_code
            if status in (401, 403):
                raise HubError(f"access to {name} denied (HTTP {status})",
                               hint="set HF_TOKEN to a token that can read this repo") from e
            raise HubError(f"the Hugging Face Hub answered HTTP {status} for {name}", hint=no_net_hint) from e
        if isinstance(e, HFValidationError):
            raise HubError(f"invalid Hub repo id or revision: {_one_line(e)}") from e
        raise HubError(f"fetching {name} failed: {_one_line(cause)}", hint=no_net_hint) from e


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
