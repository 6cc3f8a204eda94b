"""Import sdtrain's UI integrations from integrations/ the way the UIs do, without the UIs."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

import pytest

INTEGRATIONS = Path(__file__).resolve().parents[2] / "integrations"
sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture(scope="session")
def comfyui_package():
    from real_loaders import load_node_package

    package = load_node_package("sdtrain_comfyui_under_test")
    importlib.import_module(f"{package.__name__}.exact_dora")
    importlib.import_module(f"{package.__name__}.comfy_patches")
    importlib.import_module(f"{package.__name__}.training")
    return package


@pytest.fixture(scope="session")
def webui_extension():
    """integrations/webui/sdtrain_dora_webui.py (A1111/Forge put the extension folder on sys.path for its scripts)."""
    spec = importlib.util.spec_from_file_location("sdtrain_dora_webui", INTEGRATIONS / "webui" / "sdtrain_dora_webui.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
