"""Shared test set-up: no network, and `tests/` importable for the shared helpers in `tests/helpers_*.py`."""

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402

# The tiny test models are dominated by per-op overhead: one intra-op thread is as fast on a quiet machine and
# much faster on a busy one (no spin-waiting threads). Subprocesses started by tests set OMP_NUM_THREADS=1.
torch.set_num_threads(1)
