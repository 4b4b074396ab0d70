import os

from llm_torch.core.openmp import tune_openmp

tune_openmp()  # as the CLI does, before torch loads libgomp

import pytest  # noqa: E402
import torch  # noqa: E402

# Two cores: keep each test process from oversubscribing them.
torch.set_num_threads(max(1, min(2, len(os.sched_getaffinity(0)))))  # cpu_count() reads the host, not our share


def pytest_collection_modifyitems(config, items):
    pass
