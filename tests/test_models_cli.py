"""`llm models` (list / --show / --rm) over a pre-populated fake Hub cache, and user aliases (`llm aliases`,
core/checkpoint/aliases.py) resolved by every command that takes a model."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from llm_torch.core.checkpoint import aliases
from llm_torch.core.errors import ConfigError, InputError, ModelNotFoundError
from llm_torch.core.tools.inventory import describe_path, gguf_architecture
from llm_torch.core.checkpoint import EMBEDDED_MODELS, embedded_model_path, resolve_model
from tests.cli_util import run_llm
from tests.test_hub_cli import fake_hub_cache

REPO = "acme/tiny-llama"


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    return fake_hub_cache(tmp_path_factory.mktemp("hub"), REPO)


@pytest.fixture
def xdg(tmp_path, monkeypatch):
    """A private $XDG_CONFIG_HOME (in this process and for the `llm` subprocesses)."""
    config = tmp_path / "xdg"
    monkeypatch.setenv("XDG_CONFIG_HOME", str(config))
    return config


def env(hub, xdg, **extra):
    return {"HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1", "XDG_CONFIG_HOME": str(xdg), **extra}


def mkdir(path):
    path.mkdir()
    return path


def one_error_line(r) -> str:
    err = r.stderr.decode()
    assert r.returncode == 1, (r.returncode, err)
    assert err.count("\n") == 1 and err.startswith("error: "), err
    return err


# ---- core/checkpoint/aliases.py --------------------------------------------------------------------------------


def test_builtin_names_match_the_embedded_models():
    assert set(aliases.BUILTIN_NAMES) == set(EMBEDDED_MODELS)


def test_aliases_file_lives_under_xdg_config_home(xdg, monkeypatch, tmp_path):
    assert aliases.aliases_path() == xdg / "llm-torch" / "aliases.json"
    monkeypatch.delenv("XDG_CONFIG_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert aliases.aliases_path() == tmp_path / "home" / ".config" / "llm-torch" / "aliases.json"


def test_set_expand_remove(xdg, tmp_path, monkeypatch):
    folder = tmp_path / "models" / "mine"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    monkeypatch.chdir(tmp_path / "models")
    assert aliases.set_alias("mine", "./mine") == str(folder.resolve())  # works from any directory later
    assert aliases.set_alias("llama", "meta-llama/Llama-2-7b-hf@main") == "meta-llama/Llama-2-7b-hf@main"
    assert aliases.set_alias("fast", "mine") == "mine"
    assert aliases.set_alias("small", "SmolLM2") == "smollm2"
    assert aliases.expand("fast") == str(folder.resolve())
    assert json.loads(aliases.aliases_path().read_text()) == {
        "fast": "mine", "llama": "meta-llama/Llama-2-7b-hf@main", "mine": str(folder.resolve()), "small": "smollm2"}
    assert aliases.remove_alias("fast") == "mine"
    assert "fast" not in aliases.load_aliases()
    assert not [p for p in aliases.aliases_path().parent.iterdir() if p.name != "aliases.json"]  # no temp files left


@pytest.mark.parametrize("name", ["org/name", "./x", "../x", "~x", "/abs", "x.gguf", "a\\b", "", "-x", "smollm2", "SmolLM2"])
def test_alias_names_that_look_like_paths_hub_ids_or_builtins_are_refused(xdg, name):
    with pytest.raises(InputError):
        aliases.set_alias(name, "smollm2")


def test_alias_targets_must_name_something(xdg, tmp_path):
    with pytest.raises(ModelNotFoundError):
        aliases.set_alias("x", str(tmp_path / "missing"))
    with pytest.raises(ModelNotFoundError):
        aliases.set_alias("x", "not a repo")
    with pytest.raises(InputError, match="unknown alias"):
        aliases.remove_alias("x")


def test_cycles_are_refused_and_detected(xdg):
    aliases.set_alias("a", "smollm2")
    aliases.set_alias("b", "a")
    with pytest.raises(InputError, match="cycle"):
        aliases.set_alias("a", "b")
    with pytest.raises(InputError, match="cycle"):
        aliases.set_alias("a", "a")
    aliases.aliases_path().write_text(json.dumps({"a": "b", "b": "a"}))  # a hand-edited file
    with pytest.raises(ConfigError, match="a -> b -> a"):
        resolve_model("a")


@pytest.mark.parametrize("text,match", [("{bad", "not valid JSON"), ("[1]", "one JSON object"),
                                        ('{"a": 1}', "one JSON object"), ('{"x/y": "smollm2"}', "invalid alias name")])
def test_corrupt_aliases_file_is_one_config_error(xdg, text, match):
    aliases.aliases_path().parent.mkdir(parents=True)
    aliases.aliases_path().write_text(text)
    with pytest.raises(ConfigError, match=match):
        resolve_model("anything")
    resolve_model("smollm2")  # references that cannot be aliases never read the file


def test_resolve_model_expands_aliases_and_keeps_the_alias_as_name(xdg, tmp_path, monkeypatch):
    aliases.set_alias("small", "smollm2")
    aliases.set_alias("tiny", "small")
    resolved = resolve_model("tiny")
    assert (resolved.name, resolved.kind, resolved.path) == ("tiny", "gguf", embedded_model_path("smollm2"))
    (tmp_path / "tiny").mkdir()  # a local folder of the same name wins, as it does over smollm2
    (tmp_path / "tiny" / "config.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    assert resolve_model("tiny").kind == "folder"


# ---- the CLI: aliases in commands --------------------------------------------------------------------


def test_alias_to_a_cached_hub_model_works_in_generate_and_tokenize(hub, xdg):
    e = env(hub, xdg)
    r = run_llm("aliases", "set", "tl", REPO, env=e)
    assert r.returncode == 0 and r.stdout == b"", r.stderr
    r = run_llm("generate", "-m", "tl", "-n", "2", "--format", "json", "hello", env=e)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["usage"]["completion_tokens"] == 2
    r = run_llm("tokenize", "tl", "Hello", "--format", "json", env=e)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["tokens"] == ["Hello"]
    r = run_llm("aliases", "list", env=e)
    assert r.stdout.decode() == f"tl: {REPO}\n"
    r = run_llm("aliases", env=e)  # alone: the list, as `llm aliases` in Simon Willison's llm
    assert r.stdout.decode() == f"tl: {REPO}\n"
    assert json.loads(run_llm("aliases", "list", "--format", "json", env=e).stdout) == {"tl": REPO}
    assert run_llm("aliases", "path", env=e).stdout.decode() == f"{xdg / 'llm-torch' / 'aliases.json'}\n"


def test_alias_errors_are_one_line(hub, xdg):
    e = env(hub, xdg)
    assert "cannot be an alias name" in one_error_line(run_llm("aliases", "set", "org/x", "smollm2", env=e))
    assert "unknown alias 'nope'" in one_error_line(run_llm("aliases", "remove", "nope", env=e))
    (xdg / "llm-torch").mkdir(parents=True)
    (xdg / "llm-torch" / "aliases.json").write_text("{oops")
    err = one_error_line(run_llm("generate", "-m", "mine", "-n", "1", "hi", env=e))
    assert "aliases file" in err and "not valid JSON" in err
    (xdg / "llm-torch" / "aliases.json").write_text('{"a": "b", "b": "a"}')
    assert "cycle: a -> b -> a" in one_error_line(run_llm("tokenize", "a", "hi", env=e))


def test_model_completion_includes_aliases(hub, xdg):
    aliases.set_alias("zephyr-ish", "smollm2")
    e = env(hub, xdg, _LLM_COMPLETE="complete_bash")
    r = run_llm(env={**e, "COMP_WORDS": "llm generate -m ", "COMP_CWORD": "3"})
    assert r.stdout.decode().split() == ["smollm2", REPO, "zephyr-ish"], r.stderr
    r = run_llm(env={**e, "COMP_WORDS": "llm models --show zep", "COMP_CWORD": "3"})
    assert r.stdout.decode().split() == ["zephyr-ish"], r.stderr
    aliases.aliases_path().write_text("{corrupt")
    r = run_llm(env={**e, "COMP_WORDS": "llm generate -m ", "COMP_CWORD": "3"})
    assert r.stdout.decode().split() == ["smollm2", REPO]  # completion never fails


# ---- llm models ---------------------------------------------------------------------------------------


def test_list_shows_builtin_cached_and_aliases(hub, xdg, tmp_path):
    quantized = tmp_path / "tiny-int8"  # what `llm quantize` writes: config.json with quantization_config
    quantized.mkdir()
    (quantized / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": {
        "quant_method": "torchao", "quant_type": {"default": {"_type": "Int8WeightOnlyConfig"}}}}))
    (quantized / "model.safetensors").write_bytes(b"x" * 1000)
    aliases.set_alias("q8", str(quantized))
    aliases.set_alias("tl", REPO)
    aliases.set_alias("gone", "acme/never-downloaded")
    r = run_llm("models", "--format", "json", env=env(hub, xdg))
    assert r.returncode == 0, r.stderr
    by_name = {m["name"]: m for m in json.loads(r.stdout)}
    assert list(by_name) == ["smollm2", REPO, "gone", "q8", "tl"]
    assert by_name["smollm2"] | {"path": None} == {
        "name": "smollm2", "kind": "built-in", "format": "gguf", "model_type": "llama",
        "size_bytes": embedded_model_path("smollm2").stat().st_size, "path": None, "target": None,
        "quantization": None, "revisions": [], "note": None}
    cached = by_name[REPO]
    assert (cached["kind"], cached["format"], cached["model_type"], cached["revisions"]) == ("hub", "safetensors", "llama", ["main"])
    blobs = hub / "models--acme--tiny-llama" / "blobs"
    assert cached["size_bytes"] == sum(p.stat().st_size for p in blobs.iterdir())
    assert by_name["tl"] | {"kind": "hub", "target": None} == cached | {"name": "tl", "revisions": []}
    assert (by_name["q8"]["format"], by_name["q8"]["quantization"]) == ("quantized", "torchao Int8WeightOnlyConfig")
    assert (by_name["gone"]["format"], by_name["gone"]["target"]) == ("not cached", "acme/never-downloaded")
    text = run_llm("models", env=env(hub, xdg)).stdout.decode().splitlines()  # piped: tab-separated rows
    assert text[0].split("\t") == ["smollm2", "built-in", "gguf", "llama", "93.8 MiB"]
    assert text[1].split("\t")[:4] == [REPO, "hub", "safetensors", "llama"]
    assert text[3].split("\t")[-1] == f"-> {quantized}"


def test_list_with_no_cache_and_hf_home(xdg, tmp_path):
    r = run_llm("models", "--format", "json", env={"HF_HOME": str(tmp_path / "hf"), "XDG_CONFIG_HOME": str(xdg)})
    assert r.returncode == 0, r.stderr
    assert [m["name"] for m in json.loads(r.stdout)] == ["smollm2"]


def test_list_honours_hf_home(hub, xdg, tmp_path):
    home = tmp_path / "hf"
    home.mkdir()
    (home / "hub").symlink_to(hub)
    r = run_llm("models", "-f", "json", env={"HF_HOME": str(home), "XDG_CONFIG_HOME": str(xdg)})
    assert [m["name"] for m in json.loads(r.stdout)] == ["smollm2", REPO]


def test_show_reads_config_template_and_generation_config(hub, xdg):
    r = run_llm("models", "--show", REPO, "--format", "json", env=env(hub, xdg))
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    c = info["config"]
    assert (c["model_type"], c["architectures"], c["layers"], c["hidden_size"], c["attention_heads"], c["kv_heads"],
            c["head_dim"], c["context"]) == ("llama", ["LlamaForCausalLM"], 2, 64, 4, 4, 16, 128)
    assert c["vocab_size"] == 49152  # SmolLM2's tokenizer
    assert info["chat_template"]["source"] == "tokenizer_config.json"
    assert "<|im_start|>" in info["chat_template"]["template"]
    assert info["generation_config"]["bos_token_id"] == 1
    text = run_llm("models", "--show", REPO, env=env(hub, xdg)).stdout.decode()
    assert "layers          2\n" in text and "chat template (from tokenizer_config.json):" in text
    assert "generation config:\n" in text and "\n  bos_token_id: 1\n" in text


def test_show_builtin_gguf():
    info = json.loads(run_llm("models", "--show", "smollm2", "-f", "json").stdout)
    assert info["kind"] == "gguf" and info["config"]["layers"] == 30
    assert info["chat_template"]["source"] == "GGUF metadata tokenizer.chat_template"
    assert info["generation_config"] == {}


def test_show_reads_no_weights(hub, xdg, tmp_path):
    no_weights = fake_hub_cache(mkdir(tmp_path / "hub2"), "acme/config-only", weights=False)
    r = run_llm("models", "--show", "acme/config-only", "-f", "json", env=env(no_weights, xdg))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["config"]["layers"] == 2
    r = run_llm("models", "-f", "json", env=env(no_weights, xdg))
    assert json.loads(r.stdout)[1]["format"] == "config only"


def test_rm_needs_confirmation_then_deletes(xdg, tmp_path):
    cache = fake_hub_cache(mkdir(tmp_path / "hub"), "acme/doomed", weights=False)
    e = env(cache, xdg)
    err = one_error_line(run_llm("models", "--rm", "acme/doomed", env=e))  # stdin is not a terminal, no --yes
    assert "without confirmation" in err and "--yes" in err
    assert (cache / "models--acme--doomed").is_dir()
    assert "no cached revision 'v9'" in one_error_line(run_llm("models", "--rm", "acme/doomed@v9", "--yes", env=e))
    assert "not in the Hugging Face cache" in one_error_line(run_llm("models", "--rm", "acme/other", "-y", env=e))
    assert "cached Hub models only" in one_error_line(run_llm("models", "--rm", "smollm2", "-y", env=e))
    aliases.set_alias("doomed", "acme/doomed")
    r = run_llm("models", "--rm", "doomed", "--yes", "--format", "json", env=e)  # an alias names the repo
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["deleted"] == "acme/doomed" and out["revisions"] == ["a" * 40] and out["freed_bytes"] > 0
    assert not (cache / "models--acme--doomed").exists()
    assert [m["name"] for m in json.loads(run_llm("models", "-f", "json", env=e).stdout)] == ["smollm2", "doomed"]


def test_rm_asks_on_a_terminal(xdg, tmp_path):
    pexpect = pytest.importorskip("pexpect")
    cache = fake_hub_cache(mkdir(tmp_path / "hub"), "acme/doomed", weights=False)
    e = {**os.environ, **env(cache, xdg), "NO_COLOR": "1"}
    llm = os.path.join(os.path.dirname(sys.executable), "llm")
    child = pexpect.spawn(llm, ["models", "--rm", "acme/doomed"], env=e, timeout=60)
    child.expect(r"delete acme/doomed \(1 revision, .*\) from the Hugging Face cache\? \[y/N\]")
    child.sendline("n")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 1 and (cache / "models--acme--doomed").is_dir()
    child = pexpect.spawn(llm, ["models", "--rm", "acme/doomed"], env=e, timeout=60)
    child.expect(r"\[y/N\]")
    child.sendline("y")
    child.expect("deleted acme/doomed")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0 and not (cache / "models--acme--doomed").exists()


def test_describe_path_formats(tmp_path):
    gguf = embedded_model_path("smollm2")
    assert describe_path(gguf) == ("gguf", "llama", gguf.stat().st_size, None)
    meta = tmp_path / "llama-2-7b"
    meta.mkdir()
    (meta / "params.json").write_text("{}")
    (meta / "consolidated.00.pth").write_bytes(b"12")
    assert describe_path(meta) == ("meta", "llama", 4, None)
    bnb = tmp_path / "nf4"
    bnb.mkdir()
    (bnb / "config.json").write_text(json.dumps({"model_type": "gemma2", "quantization_config": {
        "quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}}))
    (bnb / "model.safetensors").write_bytes(b"")
    assert describe_path(bnb)[::3] == ("quantized", "bitsandbytes nf4")


def test_gguf_architecture_reads_only_the_header(tmp_path):
    assert gguf_architecture(embedded_model_path("smollm2")) == "llama"
    (tmp_path / "bad.gguf").write_bytes(b"GGUF" + b"\xff" * 40)
    assert gguf_architecture(tmp_path / "bad.gguf") is None
    (tmp_path / "not.gguf").write_bytes(b"nope")
    assert gguf_architecture(tmp_path / "not.gguf") is None


def test_help_lists_the_commands_without_importing_torch():
    code = ("import sys; from llm_torch.cli.app import app; from typer.main import get_command; "
            "get_command(app); import llm_torch.cli.models; assert 'torch' not in sys.modules, 'torch imported'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True)
    assert r.returncode == 0, r.stderr.decode()
    help_text = run_llm("--help").stdout.decode()
    assert "models" in help_text and "aliases" in help_text
