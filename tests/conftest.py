"""Project-wide test set-up.

- Without a CUDA device the fused loss runs through the Triton interpreter (that is how CI tests
  the kernel): TRITON_INTERPRET must be set before anything imports triton, so it is set here,
  before any test module is imported.
- GPU tests (marked `gpu`) skip themselves where there is no CUDA device.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
