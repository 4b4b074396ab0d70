"""Model references and Hub resolution, against a hand-built HF cache: never touches huggingface.co."""

from __future__ import annotations

import hashlib
import importlib
import json
import socket
from pathlib import Path
from types import SimpleNamespace

import httpx2
import huggingface_hub.utils._http
import pytest
from huggingface_hub import constants
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import are_progress_bars_disabled

from llm_torch.core.checkpoint import hub
from llm_torch.core.errors import HubError, ModelNotFoundError
from llm_torch.core.checkpoint.hub import ModelRef, parse_model_ref, resolve_hub_gguf, resolve_hub_model

COMMIT = "0123456789abcdef0123456789abcdef01234567"
OTHER = "fedcba9876543210fedcba9876543210fedcba98"
GOOD = {"config.json": b"{}", "tokenizer.json": b"{}", "model.safetensors": b"weights"}


def closed_port() -> int:
    # Bind then release: nothing listens there, so connecting fails at once (no DNS, no timeout).
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(autouse=True)
def hub_env(tmp_path, monkeypatch):
    """Isolate every test: empty cache under tmp_path, online mode, and an endpoint nobody listens on."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE", "HF_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # import-time constant: the outer env may set it


def cache_repo(cache: Path, repo_id: str, files: dict[str, bytes], commit: str = COMMIT,
               ref: str | None = "main") -> Path:
    """Lay files out as huggingface_hub does: blobs/<sha256>, snapshots/<commit>/<name> -> blob, refs/<ref>."""
    root = cache / f"models--{repo_id.replace('/', '--')}"
    snap = root / "snapshots" / commit
    for name, data in files.items():
        digest = hashlib.sha256(data).hexdigest()
        (root / "blobs").mkdir(parents=True, exist_ok=True)
        (root / "blobs" / digest).write_bytes(data)
        link = snap / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(Path("../" * (name.count("/") + 2)) / "blobs" / digest)
    if ref:
        (root / "refs").mkdir(exist_ok=True)
        (root / "refs" / ref).write_text(commit)
    return snap


def http_error(cls, status: int):
    """A real huggingface_hub HTTP exception, built the way hf_raise_for_status builds it."""
    request = httpx2.Request("GET", "https://huggingface.co/api/models/org/name")
    return cls(f"{status} Client Error", response=httpx2.Response(status, request=request))


# ---- parse_model_ref ----------------------------------------------------------------------


def test_parse_local_folder_and_gguf(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    (tmp_path / "m" / "extra.gguf").write_bytes(b"GGUF")  # config.json wins: it's a folder model
    assert parse_model_ref(str(tmp_path / "m")) == ModelRef("folder", path=tmp_path / "m")
    gguf = tmp_path / "x.Q4_0.gguf"
    gguf.write_bytes(b"GGUF")
    assert parse_model_ref(str(gguf)) == ModelRef("gguf", path=gguf)


def test_parse_dir_with_one_or_two_gguf(tmp_path):
    (tmp_path / "a.gguf").write_bytes(b"GGUF")
    assert parse_model_ref(str(tmp_path)) == ModelRef("gguf", path=tmp_path / "a.gguf")
    (tmp_path / "b.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelNotFoundError, match="several GGUF files: a.gguf, b.gguf") as e:
        parse_model_ref(str(tmp_path))
    assert "a.gguf" in e.value.hint


@pytest.mark.parametrize("text", ["./nope", "/no/such/dir", "~/no-such-model-dir", "gone.gguf",
                                  "a/b/c/d", "org/model.gguf", "org/name/../x.gguf", "C:\\models\\x"])
def test_parse_missing_path(text):
    with pytest.raises(ModelNotFoundError, match="no model at"):
        parse_model_ref(text)


def test_parse_other_local_file_is_rejected(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelNotFoundError, match="neither a model folder nor a .gguf"):
        parse_model_ref(str(tmp_path / "config.json"))


@pytest.mark.parametrize("text, expected", [
    ("meta-llama/Llama-2-7b-hf", ModelRef("hub", repo_id="meta-llama/Llama-2-7b-hf")),
    ("org/name@v1.0", ModelRef("hub", repo_id="org/name", revision="v1.0")),
    ("org/name@refs/pr/3", ModelRef("hub", repo_id="org/name", revision="refs/pr/3")),
    ("org/name-GGUF/q4/m.Q4_K_M.gguf@main",
     ModelRef("hub", repo_id="org/name-GGUF", revision="main", filename="q4/m.Q4_K_M.gguf")),
])
def test_parse_hub_refs(text, expected):
    assert parse_model_ref(text) == expected


@pytest.mark.parametrize("text, match", [("--bad", "no model at"), ("org/--bad", "nor a valid Hub repo id"),
                                          ("org/a..b", "nor a valid Hub repo id"), ("org/name@", "empty revision")])
def test_parse_invalid_repo_ids(text, match):
    with pytest.raises(ModelNotFoundError, match=match) as e:
        parse_model_ref(text)
    assert e.value.hint


# ---- resolve_hub_model: cache and offline ---------------------------------------------------


def test_cached_repo_resolves_offline_via_env(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    snap = cache_repo(cache, "org/name", GOOD)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))  # read per call, not at import
    folder = resolve_hub_model("org/name", progress=False)
    assert folder == snap
    assert (folder / "model.safetensors").read_bytes() == b"weights"


def test_revision_commit_resolves_and_unknown_revision_is_reported(tmp_path):
    cache = tmp_path / "cache"
    cache_repo(cache, "org/name", GOOD)
    old = cache_repo(cache, "org/name", GOOD, commit=OTHER, ref=None)
    assert resolve_hub_model("org/name", OTHER, offline=True, cache_dir=cache) == old
    with pytest.raises(HubError, match=r"^'org/name' \(revision 'v9'\) is not in the local cache and offline"):
        resolve_hub_model("org/name", "v9", offline=True, cache_dir=cache)


def test_not_cached_offline(tmp_path):
    with pytest.raises(HubError, match="'org/name' is not in the local cache and offline mode is on") as e:
        resolve_hub_model("org/name", offline=True, cache_dir=tmp_path)
    assert e.value.hint == "run once online, or unset HF_HUB_OFFLINE"


def test_not_cached_unreachable_hub(tmp_path):
    with pytest.raises(HubError, match=r"^cannot reach the Hugging Face Hub \(") as e:
        resolve_hub_model("org/name", cache_dir=tmp_path, progress=False)
    assert "HF_HUB_OFFLINE=1" in e.value.hint
    assert "\n" not in str(e.value)


def test_cached_repo_used_when_hub_unreachable(tmp_path):
    snap = cache_repo(tmp_path, "org/name", GOOD)
    assert resolve_hub_model("org/name", cache_dir=tmp_path, progress=False) == snap


def test_pickle_only_repo_is_refused(tmp_path):
    cache_repo(tmp_path, "org/old", {"config.json": b"{}", "pytorch_model.bin": b"pickle"})
    with pytest.raises(HubError, match="only pickle checkpoints .* not loaded for safety") as e:
        resolve_hub_model("org/old", offline=True, cache_dir=tmp_path)
    assert "safetensors" in e.value.hint
    with pytest.raises(HubError, match="only pickle checkpoints"):  # online, Hub unreachable: cache fallback
        resolve_hub_model("org/old", cache_dir=tmp_path, progress=False)


def test_gguf_only_repo_points_at_its_files(tmp_path):
    cache_repo(tmp_path, "org/q", {"m.Q4_0.gguf": b"GGUF"})
    with pytest.raises(HubError, match="holds GGUF files") as e:
        resolve_hub_model("org/q", offline=True, cache_dir=tmp_path)
    assert e.value.hint == "name one: org/q/m.Q4_0.gguf"


def test_sharded_repo_resolves(tmp_path):
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    files = {"config.json": b"{}", "model.safetensors.index.json": json.dumps(index).encode(),
             "model-00001-of-00002.safetensors": b"1", "model-00002-of-00002.safetensors": b"2"}
    snap = cache_repo(tmp_path, "org/big", files)
    assert resolve_hub_model("org/big", offline=True, cache_dir=tmp_path) == snap


# ---- resolve_hub_model: download filtering and Hub errors (snapshot_download mocked) ---------


def fake_snapshot(tmp_path, files: dict[str, bytes], calls: list):
    """A snapshot_download stand-in that 'downloads' the allowed files of `files` into one snapshot."""
    from fnmatch import fnmatchcase

    def fake(repo_id, *, allow_patterns, ignore_patterns, revision, **kw):
        calls.append({"allow": allow_patterns, "ignore": ignore_patterns, "revision": revision, **kw})
        snap = tmp_path / "snapshots" / COMMIT
        snap.mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            allowed = any(fnmatchcase(name, p) for p in allow_patterns)
            if allowed and not any(fnmatchcase(name, p) for p in ignore_patterns):
                (snap / name).write_bytes(data)
        return str(snap)
    return fake


def test_download_fetches_only_needed_files_from_one_commit(tmp_path, monkeypatch):
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    files = {"config.json": b"{}", "tokenizer.json": b"{}", "model.safetensors.index.json": json.dumps(index).encode(),
             "model-00001-of-00002.safetensors": b"1", "model-00002-of-00002.safetensors": b"2",
             "consolidated.safetensors": b"dup", "pytorch_model.bin": b"pickle", "model.gguf": b"G",
             "flax_model.msgpack": b"m", "original/consolidated.00.pth": b"p", "onnx/model.safetensors": b"o"}
    calls = []
    monkeypatch.setattr(hub, "snapshot_download", fake_snapshot(tmp_path, files, calls))
    folder = resolve_hub_model("org/name", "main", token="hf_x", offline=False)
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
        "model.safetensors.index.json", "tokenizer.json"]
    assert len(calls) == 1 and calls[0]["revision"] == "main"
    assert calls[0]["token"] == "hf_x" and calls[0]["local_files_only"] is False


def test_online_pickle_only_repo_is_explained(tmp_path, monkeypatch):
    files = {"config.json": b"{}", "pytorch_model.bin": b"pickle"}
    monkeypatch.setattr(hub, "snapshot_download", fake_snapshot(tmp_path, files, []))
    info = SimpleNamespace(siblings=[SimpleNamespace(rfilename=name) for name in files])
    monkeypatch.setattr(hub.HfApi, "model_info", lambda self, repo_id, revision=None: info)
    with pytest.raises(HubError, match="only pickle checkpoints"):
        resolve_hub_model("org/old", offline=False)


@pytest.mark.parametrize("exc, match, hint", [
    (http_error(RepositoryNotFoundError, 401), "^model 'org/name' not found on the Hub$",
     "private repos need HF_TOKEN"),
    (http_error(GatedRepoError, 403), "'org/name' is gated: accept its license on huggingface.co and set HF_TOKEN",
     "huggingface.co/org/name"),
    (http_error(RevisionNotFoundError, 404), "revision 'main' not found in 'org/name'", "commit hash"),
    (http_error(HfHubHTTPError, 401), r"access to 'org/name' \(revision 'main'\) denied \(HTTP 401\)", "HF_TOKEN"),
    (http_error(HfHubHTTPError, 503), "answered HTTP 503", "HF_HUB_OFFLINE=1"),
    (httpx2.ConnectTimeout("timed out"), r"cannot reach the Hugging Face Hub \(timed out\)", "connection"),
    (OSError(28, "No space left on device"), "fetching 'org/name' .* No space left", "connection"),
])
def test_hub_errors_are_one_line(monkeypatch, exc, match, hint):
    def boom(*args, **kwargs):
        raise exc
    monkeypatch.setattr(hub, "snapshot_download", boom)
    with pytest.raises(HubError, match=match) as e:
        resolve_hub_model("org/name", "main", offline=False)
    assert hint in e.value.hint
    assert "\n" not in e.value.message


def test_progress_false_disables_bars_only_during_the_call(tmp_path, monkeypatch):
    # Start from "bars on", whatever HF_HUB_DISABLE_PROGRESS_BARS said at import time.
    tqdm_module = importlib.import_module("huggingface_hub.utils.tqdm")  # the package attr is the class
    monkeypatch.setattr(tqdm_module, "HF_HUB_DISABLE_PROGRESS_BARS", None)
    monkeypatch.setattr(tqdm_module, "progress_bar_states", {})
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_PROGRESS_BARS", None)
    seen = []
    fake = fake_snapshot(tmp_path, GOOD, [])
    def spy(*args, **kwargs):
        seen.append(are_progress_bars_disabled())
        return fake(*args, **kwargs)
    monkeypatch.setattr(hub, "snapshot_download", spy)
    assert not are_progress_bars_disabled()
    resolve_hub_model("org/name", offline=False, progress=False)
    assert seen == [True] and not are_progress_bars_disabled()
    resolve_hub_model("org/name", offline=False)
    assert seen == [True, False]


# ---- GGUF files in Hub repos -----------------------------------------------------------------


def test_resolve_hub_gguf_from_cache_and_errors(tmp_path, monkeypatch):
    snap = cache_repo(tmp_path, "org/q", {"m.Q4_0.gguf": b"GGUF"})
    assert resolve_hub_gguf("org/q", "m.Q4_0.gguf", offline=True, cache_dir=tmp_path) == snap / "m.Q4_0.gguf"
    ref = parse_model_ref("org/q/m.Q4_0.gguf")
    assert (ref.kind, ref.repo_id, ref.filename) == ("hub", "org/q", "m.Q4_0.gguf")
    with pytest.raises(HubError, match="^'org/q/m.Q8_0.gguf' is not in the local cache and offline mode is on"):
        resolve_hub_gguf("org/q", "m.Q8_0.gguf", offline=True, cache_dir=tmp_path)
    # hf_hub_download retries connection errors with back-off (~23 s): skip the sleeps.
    monkeypatch.setattr(huggingface_hub.utils._http.time, "sleep", lambda seconds: None)
    with pytest.raises(HubError, match="cannot reach"):
        resolve_hub_gguf("org/q", "m.Q8_0.gguf", cache_dir=tmp_path, progress=False)

    def missing(*args, **kwargs):
        raise http_error(RemoteEntryNotFoundError, 404)
    monkeypatch.setattr(hub, "hf_hub_download", missing)
    with pytest.raises(HubError, match="no file 'x.gguf' in 'org/q'"):
        resolve_hub_gguf("org/q", "x.gguf", offline=False)
