import os

import pytest
import torch

# Two cores: keep each test process from oversubscribing them.
torch.set_num_threads(max(1, min(2, len(os.sched_getaffinity(0)))))  # cpu_count() reads the host, not our share


def pytest_collection_modifyitems(config, items):
    pass
