"""The real LLaMA / Llama 2 sentencepiece vocabulary (32000 tokens) for tokenizer tests, without the Hub.

llama.cpp ships it as a vocab-only GGUF, models/ggml-vocab-llama-spm.gguf (724 KB), and the llama-cpp-python
sdist on PyPI vendors llama.cpp. It is not committed here: it is Meta's LLaMA tokenizer, whose license asks
redistributors to carry Meta's license text with it, and a binary of that size does not belong in the repo.
So the first test run on a machine fetches the sdist with pip (about 75 MB, half a minute), keeps only that
file under ~/.cache/llm-torch-tests (checked by SHA-256), and later runs reuse it. Tests that need it skip
with the reason when it cannot be had (no network: set LLM_TEST_NO_FETCH=1 to not even try), or use
LLM_TEST_LLAMA_SPM=/path/to/ggml-vocab-llama-spm.gguf.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

SDIST = "llama-cpp-python==0.3.36"
MEMBER = "vendor/llama.cpp/models/ggml-vocab-llama-spm.gguf"
SHA256 = "16c3724582d59aa8bf84711894e833f916ee46a31d80e21312759c48bf8d0e69"
FILENAME = "ggml-vocab-llama-spm.gguf"


def _cache_dir() -> Path:
    # tests/conftest.py points XDG_CACHE_HOME at a per-run folder; this download is kept per machine.
    given = os.environ.get("LLM_TEST_DOWNLOADS")
    return Path(given) if given else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llm-torch-tests"


def _good(path: Path) -> bool:
    return path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() == SHA256


def llama_spm_gguf() -> tuple[Path | None, str]:
    """(path of the vocab GGUF, "") or (None, why it could not be had)."""
    given = os.environ.get("LLM_TEST_LLAMA_SPM")
    if given:
        return (Path(given), "") if _good(Path(given)) else (None, f"LLM_TEST_LLAMA_SPM={given} is not the expected file")
    cached = _cache_dir() / FILENAME
    if _good(cached):
        return cached, ""
    if os.environ.get("LLM_TEST_NO_FETCH"):
        return None, "LLM_TEST_NO_FETCH is set and the LLaMA vocabulary is not cached"
    with tempfile.TemporaryDirectory() as tmp:
        try:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q",
                            "--disable-pip-version-check", "--timeout", "30", SDIST, "-d", tmp],
                           check=True, capture_output=True, timeout=600)
        except (OSError, subprocess.SubprocessError) as exc:
            return None, f"cannot fetch {SDIST} from PyPI for the LLaMA vocabulary: {exc}"
        archives = list(Path(tmp).glob("*.tar.gz"))
        if not archives:
            return None, f"pip download {SDIST} gave no sdist"
        try:
            with tarfile.open(archives[0]) as tar:
                member = next((m for m in tar.getmembers() if m.name.endswith("/" + MEMBER) and m.isfile()), None)
                data = tar.extractfile(member).read() if member is not None else None
        except (OSError, tarfile.TarError) as exc:
            return None, f"cannot read the {SDIST} sdist: {exc}"
    if data is None or hashlib.sha256(data).hexdigest() != SHA256:
        return None, f"{SDIST} has no {MEMBER} with the expected contents"
    cached.parent.mkdir(parents=True, exist_ok=True)
    part = cached.with_suffix(f".{os.getpid()}.part")
    part.write_bytes(data)
    part.replace(cached)  # atomic: a concurrent run sees the whole file or none
    return cached, ""
