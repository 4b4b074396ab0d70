import os
import tempfile
from pathlib import Path

# Hermetic: every test (and every `llm` subprocess it starts) sees its own config, cache, state and Hub
# folders, never the user's (an alias set by the README's `llm aliases set` must not change a test), and
# runs in its own empty working folder (the README's recipe creates ./tiny in the repo root).
_ROOT = Path(tempfile.mkdtemp(prefix="llm-tests-"))
# Downloads the tests fetch once per machine (the real LLaMA vocabulary) stay in the user's cache.
os.environ.setdefault("LLM_TEST_DOWNLOADS", str(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
                                                / "llm-torch-tests"))
for _var in ("XDG_CONFIG_HOME", "XDG_CACHE_HOME", "XDG_STATE_HOME", "XDG_DATA_HOME", "HF_HOME"):
    os.environ[_var] = str(_ROOT / _var.lower())
for _var in ("HF_HUB_CACHE", "HF_HUB_OFFLINE", "HF_TOKEN", "HF_ENDPOINT", "LLM_KERNEL_CACHE", "LLM_DEBUG"):
    os.environ.pop(_var, None)
HERMETIC_ROOT = _ROOT

from llm_torch.core.openmp import tune_openmp  # noqa: E402

tune_openmp()  # as the CLI does, before torch loads libgomp

import pytest  # noqa: E402
import torch  # noqa: E402

# Two cores: keep each test process from oversubscribing them.
torch.set_num_threads(max(1, min(2, len(os.sched_getaffinity(0)))))  # cpu_count() reads the host, not our share


@pytest.fixture(autouse=True)
def _own_working_folder(tmp_path_factory, monkeypatch):
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))


def pytest_sessionfinish(session, exitstatus):
    import shutil

    shutil.rmtree(_ROOT, ignore_errors=True)
