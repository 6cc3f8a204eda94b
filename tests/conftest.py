"""Shared test set-up: no network, and `tests/` importable for the shared helpers in `tests/helpers_*.py`."""

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))
