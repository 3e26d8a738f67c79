"""The training tests run their own torch work (reference losses, PEFT greedy) on one thread: on
the shared 2-core CI machine a 2-thread OpenMP team is many times slower whenever another process
competes for the cores, and one thread keeps these tests' cost predictable. The trainer's own
thread budget is set per test through ``LoraTrainingConfig.max_threads``."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
