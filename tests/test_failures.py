"""Input and environment failures are typed errors in the user's terms, never the generic handler (kept for
bugs); outputs are atomic (core/files.py); safetensors offsets tile the data section exactly."""

from __future__ import annotations

import errno
import json
import os
import struct
import subprocess
from pathlib import Path

import pytest

from llm_torch.core.checkpoint.safetensors import read_index
from llm_torch.core.errors import CheckpointError, InputError, ResourceError
from llm_torch.core.files import atomic_write, staged_output
from tests.cli_util import run_llm
from tests.tiny import LLAMA_BASE, config_dict, hf_model, write_tokenizer_files

GENERIC = "LLM_DEBUG=1"  # the generic handler's hint: its presence means an untyped exception got through


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny")
    hf_model(config_dict(LLAMA_BASE, {})).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_with_tokenizer(tmp_path_factory) -> Path:
    from llm_torch.core.placement.loading import load_tokenizer, resolve_model

    tokenizer = load_tokenizer(resolve_model("smollm2"))
    folder = tmp_path_factory.mktemp("tiny-tok")
    hf_model(config_dict(LLAMA_BASE, dict(vocab_size=tokenizer.vocab_size))).save_pretrained(folder)
    write_tokenizer_files(folder, tokenizer)
    return folder


def assert_one_typed_error(r: subprocess.CompletedProcess) -> str:
    err = r.stderr.decode()
    lines = [line for line in err.splitlines() if line.strip()]
    assert r.returncode == 1, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert GENERIC not in err and "Traceback" not in err, err
    return err


def with_config(tiny: Path, folder: Path, **changes) -> Path:
    folder.mkdir()
    for f in tiny.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))
    return folder


def _mount_tmpfs(where: Path, options: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    where.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")


@pytest.fixture
def read_only_folder(tmp_path):
    """A folder no one can write to: a read-only tmpfs for root (who ignores permissions), else mode 0555."""
    where = tmp_path / "ro"
    if os.geteuid() != 0:
        where.mkdir()
        where.chmod(0o555)
        yield where
        where.chmod(0o755)
        return
    _mount_tmpfs(where, "ro,size=1m")
    yield where
    subprocess.run(["umount", str(where)])


@pytest.fixture
def full_disk(tmp_path):
    """A 64 KiB tmpfs: every model written there runs out of space part-way."""
    where = tmp_path / "full"
    _mount_tmpfs(where, "size=64k")
    yield where
    subprocess.run(["umount", str(where)])


# ---- the catalogue: each kind of input / environment failure reaches the user as one typed line --------


@pytest.mark.parametrize("changes", [
    {"vocab_size": -1}, {"hidden_size": 0}, {"num_attention_heads": 0}, {"num_hidden_layers": -2},
    {"intermediate_size": 0}, {"head_dim": -4}, {"num_key_value_heads": 3}, {"hidden_size": "abc"},
    {"vocab_size": 300}, {"layer_types": 7},
], ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_bad_config_values_are_config_errors(tiny, tmp_path, changes):
    bad = with_config(tiny, tmp_path / "bad", **changes)
    err = assert_one_typed_error(run_llm("convert", str(bad), "-o", str(tmp_path / "out"), "--verify"))
    assert not (tmp_path / "out").exists(), err


@pytest.mark.parametrize("command", ["quantize", "convert", "run", "aliases"])
def test_a_read_only_destination_is_named_as_such(tiny, tiny_with_tokenizer, read_only_folder, command):
    out = read_only_folder / "out"
    args = {"quantize": ("quantize", str(tiny), "--int8", "-o", str(out)),
            "convert": ("convert", str(tiny), "-o", str(out)),
            "run": ("run", "-m", str(tiny_with_tokenizer), "hello", "-n", "2", "-o", str(out)),
            "aliases": ("aliases", "set", "t", str(tiny))}[command]
    err = assert_one_typed_error(run_llm(*args, env={"XDG_CONFIG_HOME": str(read_only_folder)}))
    assert "cannot write" in err and ("read-only" in err.lower() or "permission" in err.lower()), err
    assert list(read_only_folder.iterdir()) == []


@pytest.mark.parametrize("command", ["quantize", "convert"])
def test_a_full_disk_is_named_as_such_and_leaves_nothing(tiny, full_disk, command):
    out = full_disk / "out"
    args = ("quantize", str(tiny), "--int8", "-o", str(out)) if command == "quantize" else ("convert", str(tiny), "-o", str(out))
    err = assert_one_typed_error(run_llm(*args))
    assert "no space left" in err and "permission" not in err, err
    assert list(full_disk.iterdir()) == []


def test_overlapping_safetensors_is_refused_by_the_cli(tiny, tmp_path):
    bad = with_config(tiny, tmp_path / "bad")
    entries = {name: (info.shape, offset, n) for info, offset, n in read_index(bad / "model.safetensors")
               for name in [info.name]}
    data = (bad / "model.safetensors").read_bytes()
    header_len = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + header_len])
    # Two same-sized tensors made to share the first one's bytes; the freed bytes stay as trailing data.
    a, b = "model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight"
    assert entries[a][2] == entries[b][2]
    header[b]["data_offsets"] = header[a]["data_offsets"]
    write_raw(bad / "model.safetensors", header, data[8 + header_len:])
    err = assert_one_typed_error(run_llm("convert", str(bad), "-o", str(tmp_path / "out")))
    assert "overlaps" in err


# ---- safetensors layout: in range, non-overlapping, covering the data section exactly ------------------


def write_raw(path: Path, header: dict, data: bytes) -> Path:
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return path


def f32(begin: int, end: int, n: int = 4) -> dict:
    return {"dtype": "F32", "shape": [n], "data_offsets": [begin, end]}


LAYOUTS = {
    "overlap": ({"a": f32(0, 16), "b": f32(8, 24)}, 24, "overlaps"),
    "gap": ({"a": f32(0, 16), "b": f32(24, 40)}, 40, "gap"),
    "not from the start": ({"a": f32(8, 24)}, 24, "gap"),
    "trailing bytes": ({"a": f32(0, 16)}, 24, "after its last tensor"),
    "past the end": ({"a": f32(0, 16), "b": f32(16, 32)}, 24, "outside the file"),
    "duplicate range": ({"a": f32(0, 16), "b": f32(0, 16)}, 16, "overlaps"),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_safetensors_offsets_must_tile_the_data(tmp_path, name):
    from safetensors import safe_open

    header, size, message = LAYOUTS[name]
    path = write_raw(tmp_path / "x.safetensors", header, bytes(size))
    with pytest.raises(CheckpointError, match=message):
        read_index(path)
    with pytest.raises(Exception):  # the reference library refuses the same file
        safe_open(str(path), "pt")


def test_a_valid_layout_passes_both(tmp_path):
    from safetensors import safe_open

    header = {"b": f32(16, 32), "a": f32(0, 16), "empty": f32(32, 32, 0)}
    path = write_raw(tmp_path / "x.safetensors", header, bytes(32))
    start = path.stat().st_size - 32
    assert [(i.name, o, n) for i, o, n in read_index(path)] == [("a", start, 16), ("b", start + 16, 16), ("empty", start + 32, 0)]
    with safe_open(str(path), "pt") as f:
        assert sorted(f.keys()) == ["a", "b", "empty"]


# ---- atomic outputs: a failure mid-write keeps the old content and leaves no temp file -----------------


class DiskFull:
    """os.fdopen whose files write half of what they are given, then fail as a full disk does."""

    def __init__(self, monkeypatch):
        real = os.fdopen

        def fdopen(fd, *args, **kwargs):
            f = real(fd, *args, **kwargs)
            write = f.write

            def half_then_fail(data):
                write(data[: len(data) // 2])
                f.flush()
                raise OSError(errno.ENOSPC, "No space left on device")

            f.write = half_then_fail
            return f

        monkeypatch.setattr(os, "fdopen", fdopen)


def test_atomic_write_keeps_the_old_content_under_a_full_disk(tmp_path, monkeypatch):
    target = tmp_path / "out.json"
    target.write_text("old\n")
    DiskFull(monkeypatch)
    with pytest.raises(ResourceError, match="no space left"):
        with atomic_write(target) as f:
            f.write("new content\n")
    assert target.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_atomic_write_removes_its_temp_file_on_any_exception(tmp_path):
    target = tmp_path / "out.txt"
    with pytest.raises(KeyboardInterrupt):
        with atomic_write(target) as f:
            f.write("partial")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_publishes_with_ordinary_permissions(tmp_path):
    with atomic_write(tmp_path / "out.bin", "wb") as f:
        f.write(b"\x00\x01")
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "out.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "out.bin").stat().st_mode & 0o777 == 0o666 & ~umask


def test_chat_save_and_aliases_keep_the_old_file_under_a_full_disk(tmp_path, monkeypatch):
    from llm_torch.core.checkpoint.aliases import aliases_path, load_aliases, set_alias
    from llm_torch.core.tasks.conversation import Conversation

    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    set_alias("t", str(tmp_path))
    before = aliases_path().read_text()
    saved = tmp_path / "chat.json"
    saved.write_text("old chat\n")
    chat = Conversation(model_name="t")
    DiskFull(monkeypatch)
    with pytest.raises(ResourceError):
        set_alias("u", str(tmp_path))
    with pytest.raises(ResourceError):
        chat.save(saved)
    assert aliases_path().read_text() == before and load_aliases() == {"t": str(tmp_path.resolve())}
    assert saved.read_text() == "old chat\n"
    assert sorted(p.name for p in aliases_path().parent.iterdir()) == ["aliases.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chat.json", "xdg"]


def test_staged_output_replaces_only_when_complete(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "config.json").write_text("old")
    with pytest.raises(InputError, match="already exists"):
        with staged_output(out) as staged:
            (staged / "config.json").write_text("new")
    with pytest.raises(ResourceError):
        with staged_output(out, replace=True) as staged:
            (staged / "config.json").write_text("half")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert (out / "config.json").read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["model"]
    with staged_output(out, replace=True) as staged:
        (staged / "config.json").write_text("new")
    assert (out / "config.json").read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["model"]


def test_write_errors_blame_the_cause(tmp_path):
    from llm_torch.core.files import write_error

    assert isinstance(write_error(OSError(errno.ENOSPC, "No space left on device"), tmp_path), ResourceError)
    assert isinstance(write_error(OSError(errno.EDQUOT, "Disk quota exceeded"), tmp_path), ResourceError)
    for code in (errno.EROFS, errno.EACCES):
        e = write_error(OSError(code, os.strerror(code)), tmp_path)
        assert isinstance(e, InputError) and "permissions" in e.hint
    assert "permissions" not in write_error(OSError(errno.ENOSPC, "x"), tmp_path).hint

