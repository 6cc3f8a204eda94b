"""The A1111/Forge extension's wiring: what it patches in each UI, once, and when the Lora code loads late.

The UIs' modules are stand-ins with the attributes the extension patches (A1111's `network.NetworkModule`,
Forge's `backend.patcher.lora` and `networks`); the weight math is in test_weight_math.py, the real UIs' code in
test_real_loaders.py.
"""

from __future__ import annotations

import runpy
import sys
import types
from pathlib import Path

import pytest

EXTENSION = Path(__file__).resolve().parents[2] / "integrations" / "webui"


def stand_in(monkeypatch, name, **attrs):
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    monkeypatch.setitem(sys.modules, name, module)
    return module


@pytest.fixture
def no_ui(monkeypatch):
    for name in ("backend", "backend.patcher", "backend.patcher.lora", "network", "networks"):
        monkeypatch.delitem(sys.modules, name, raising=False)


def test_forge_is_patched_once(monkeypatch, no_ui, webui_extension):
    def weight_decompose(*args):
        return "forge"

    def load_lora_for_models(*args, **kwargs):
        return "loaded"

    lora = stand_in(monkeypatch, "backend.patcher.lora", weight_decompose=weight_decompose)
    stand_in(monkeypatch, "backend.patcher", lora=lora)
    stand_in(monkeypatch, "backend", patcher=sys.modules["backend.patcher"])
    networks = stand_in(monkeypatch, "networks", load_lora_for_models=load_lora_for_models)
    patched = webui_extension.install()
    assert patched == ["Forge backend.patcher.lora.weight_decompose",
                       "Forge networks.load_lora_for_models (reads sdtrain_dora_scale)"]
    assert lora.weight_decompose.sdtrain_original is weight_decompose
    assert networks.load_lora_for_models.sdtrain_original is load_lora_for_models
    first = lora.weight_decompose
    assert webui_extension.install() == patched and lora.weight_decompose is first  # not wrapped twice


def test_a1111_is_patched_once(monkeypatch, no_ui, webui_extension):
    class NetworkModule:
        def apply_weight_decompose(self, updown, orig_weight):
            return "a1111"

    original = NetworkModule.apply_weight_decompose
    stand_in(monkeypatch, "network", NetworkModule=NetworkModule)
    assert webui_extension.install() == ["A1111 network.NetworkModule.apply_weight_decompose"]
    assert NetworkModule.apply_weight_decompose.sdtrain_original is original
    wrapped = NetworkModule.apply_weight_decompose
    webui_extension.install()
    assert NetworkModule.apply_weight_decompose is wrapped


def test_script_waits_for_the_lora_extension(monkeypatch, no_ui, capsys):
    """Loaded before the built-in Lora, the script patches when the app starts."""
    registered = {}
    callbacks = types.SimpleNamespace(on_before_ui=lambda f: registered.setdefault("before_ui", f),
                                      on_app_started=lambda f: registered.setdefault("app_started", f))
    stand_in(monkeypatch, "modules", script_callbacks=callbacks)
    stand_in(monkeypatch, "modules.script_callbacks", **vars(callbacks))
    monkeypatch.syspath_prepend(str(EXTENSION))
    monkeypatch.delitem(sys.modules, "sdtrain_dora_webui", raising=False)
    runpy.run_path(str(EXTENSION / "scripts" / "sdtrain_dora.py"))
    assert set(registered) == {"before_ui", "app_started"} and capsys.readouterr().out == ""

    class NetworkModule:
        def apply_weight_decompose(self, updown, orig_weight):
            return "a1111"

    stand_in(monkeypatch, "network", NetworkModule=NetworkModule)
    assert registered["app_started"](None, None) is True
    assert hasattr(NetworkModule.apply_weight_decompose, "sdtrain_original")
    assert "[sdtrain] exact output-axis DoRA: patched A1111" in capsys.readouterr().out
