"""Shared test set-up: no network, `tests/` importable for the shared helpers in `tests/helpers_*.py`, the tiny
pipelines built once, and accelerate's per-process state cleared after each test."""

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402
import torch  # noqa: E402

# The tiny test models are dominated by per-op overhead: one intra-op thread is as fast on a quiet machine and
# much faster on a busy one (no spin-waiting threads). Subprocesses started by tests set OMP_NUM_THREADS=1.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def sd15():
    """The tiny SD1.5 pipeline (seed 0), shared by the whole session: use it read-only (build your own to
    change weights)."""
    from sdtrain.models.tiny import build_tiny_pipeline

    return build_tiny_pipeline("sd15", seed=0)


@pytest.fixture(scope="session")
def sdxl():
    """The tiny SDXL pipeline (seed 0), shared by the whole session: use it read-only."""
    from sdtrain.models.tiny import build_tiny_pipeline

    return build_tiny_pipeline("sdxl", seed=0)


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """accelerate keeps one mixed precision per process; tests train with several, so each test starts clean
    (sdtrain itself refuses a second precision in one process, see `sdtrain.train.accelerator`)."""
    yield
    state = sys.modules.get("accelerate.state")
    if state is not None:
        state.AcceleratorState._reset_state(reset_partial_state=False)
