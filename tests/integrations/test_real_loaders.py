"""sdtrain's loader contracts and integrations against the UIs' own code (skipped unless the checkouts are given).

    SDTRAIN_COMFYUI_DIR=... SDTRAIN_FORGE_DIR=... SDTRAIN_A1111_DIR=... SDTRAIN_LYCORIS_DIR=... \\
    SDTRAIN_UI_PYTHON=/path/to/python python3 -m pytest -q tests/integrations/test_real_loaders.py

Each variable names a checkout (Comfy-Org/ComfyUI, lllyasviel/stable-diffusion-webui-forge,
AUTOMATIC1111/stable-diffusion-webui, KohakuBlueleaf/LyCORIS); SDTRAIN_UI_PYTHON a Python that has sdtrain's
dependencies plus what those checkouts import (ComfyUI: einops, torchsde; Forge: gguf; LyCORIS: einops, toml).
The harnesses run in subprocesses (the UIs' top-level module names clash): real_loaders.py runs each UI's merge
code on sdtrain's tiny adapters, real_comfyui_node.py runs the nodes inside ComfyUI. Checked at: ComfyUI
a125cd84b054 (v0.3.64), Forge dfdcbab685e5, AUTOMATIC1111 82a973c04367 (v1.10.1), LyCORIS f49d30d670591.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CHECKOUTS = {"comfyui": "SDTRAIN_COMFYUI_DIR", "forge": "SDTRAIN_FORGE_DIR", "a1111": "SDTRAIN_A1111_DIR",
             "lycoris": "SDTRAIN_LYCORIS_DIR"}


def checkout(ui: str) -> Path:
    value = os.environ.get(CHECKOUTS[ui])
    if not value:
        pytest.skip(f"set {CHECKOUTS[ui]} to a checkout of the UI to run this check")
    return Path(value)


def harness(tmp_path, script: str, *args) -> dict:
    out = tmp_path / "result.json"
    python = os.environ.get("SDTRAIN_UI_PYTHON", sys.executable)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([python, str(HERE / script), *map(str, args), "--out", str(out)], env=env,
                          capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("ui", list(CHECKOUTS))
def test_the_rule_replays_are_the_loaders_code(tmp_path, ui):
    results = harness(tmp_path, "real_loaders.py", ui, checkout(ui))
    for case, row in results.items():
        if row["refused"]:  # LyCORIS and input-axis files: the package raises, and so does its replay
            assert ui == "lycoris" and "/input/" in case and row["modules"] == 0 and row["rule_refuses_too"], case
            continue
        assert row["rule"] <= 1e-6, (case, row)  # bit for bit in practice


@pytest.mark.parametrize("ui,tolerance", [("comfyui", 1e-6), ("forge", 1e-6), ("a1111", 4e-3)])
def test_the_integrations_are_exact_in_the_loaders(tmp_path, ui, tolerance):
    """ComfyUI's patches with the node's adapter, A1111's/Forge's Lora with the extension's wrappers (A1111: fp16)."""
    results = harness(tmp_path, "real_loaders.py", ui, checkout(ui), "--integration")
    for case, row in results.items():
        assert row["refused"] == 0 and row["exact"] <= tolerance, (case, row)


def test_the_nodes_inside_comfyui(tmp_path):
    results = harness(tmp_path, "real_comfyui_node.py", checkout("comfyui"))
    assert results["output_axis_rule"] in ("w0-norm", "merged-norm")
    for case, row in results.items():
        if not isinstance(row, dict):
            continue
        assert row["mapped"] == row["modules"] == row["node_patched"] == row["node_lowvram_patched"], case
        assert row["node"] <= 1e-6 and row["node_lowvram"] <= 1e-6 and row["unpatched_bitwise"], (case, row)
        stock_exact = "/input/" in case or ("/comfyui/" in case) == (results["output_axis_rule"] == "w0-norm")
        assert (row["stock"] <= 1e-6) == stock_exact, (case, row)
    assert results["train_interrupted"] and results["train_adapter_exists"]
    assert results["train_resumed_from"][0] >= 2 and results["train_last_progress"] == [5, 5]
    assert all(results["train_patches"])
