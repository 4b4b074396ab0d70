import os

# As the CLI does (cli/app.py _tune_openmp): short OpenMP spin-waits, set before torch loads libgomp.
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "1000")

import pytest  # noqa: E402
import torch  # noqa: E402

# Two cores: keep each test process from oversubscribing them.
torch.set_num_threads(max(1, min(2, len(os.sched_getaffinity(0)))))  # cpu_count() reads the host, not our share


def pytest_collection_modifyitems(config, items):
    pass
