"""The ComfyUI node pack without ComfyUI: import hygiene, node conventions, path choice, and the training node.

What needs ComfyUI itself (key mapping, ModelPatcher patch / low-VRAM / unpatch, ComfyUI's own DoRA rule) is run
against a real checkout by test_real_loaders.py. Here the training node runs a real `sdtrain train` subprocess;
only ComfyUI's progress bar, interrupt flag and model folders are stand-ins (`comfy.utils.ProgressBar`,
`comfy.model_management`, `folder_paths`), recording what the node tells them.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
import threading
import types
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
INTEGRATIONS = REPO / "integrations"


def test_package_imports_without_comfyui_and_without_side_effects(tmp_path):
    folder = INTEGRATIONS / "comfyui"
    script = f"""
import importlib.util, json, os, sys
folder = {str(folder)!r}
before = sorted(os.listdir(folder))
spec = importlib.util.spec_from_file_location("pack", os.path.join(folder, "__init__.py"),
                                              submodule_search_locations=[folder])
pack = importlib.util.module_from_spec(spec)
sys.modules["pack"] = pack
spec.loader.exec_module(pack)
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "comfy", "folder_paths", "safetensors", "sdtrain"))
nodes = {{name: [hasattr(cls, attr) for attr in ("INPUT_TYPES", "RETURN_TYPES", "FUNCTION", "CATEGORY")]
         + [callable(getattr(cls, cls.FUNCTION))] for name, cls in pack.NODE_CLASS_MAPPINGS.items()}}
print(json.dumps({{"heavy": heavy, "nodes": nodes, "names": pack.NODE_DISPLAY_NAME_MAPPINGS,
                  "unchanged": before == sorted(os.listdir(folder))}}))
"""
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "PYTHONPATH": ""}
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and not done.stderr, done.stderr
    found = json.loads(done.stdout)
    assert found["heavy"] == []  # no torch, no ComfyUI, no sdtrain at import
    assert found["unchanged"] and not list(tmp_path.iterdir())
    assert found["names"] == {"SdtrainLoadDoRA": "Load DoRA (sdtrain, exact)", "SdtrainTrainDoRA": "Train DoRA (sdtrain)"}
    assert all(all(flags) for flags in found["nodes"].values()) and set(found["nodes"]) == set(found["names"])


@pytest.fixture
def comfy_stand_ins(monkeypatch, tmp_path):
    """folder_paths, comfy.utils.ProgressBar and comfy.model_management as the nodes use them (recording)."""
    loras = tmp_path / "models" / "loras"
    loras.mkdir(parents=True)
    state = types.SimpleNamespace(progress=[], interrupt=threading.Event(), stop_at=None, unloaded=0)

    class ProgressBar:
        def __init__(self, total):
            self.total = total

        def update_absolute(self, value, total=None):
            state.progress.append((value, total))
            if state.stop_at is not None and value >= state.stop_at:
                state.interrupt.set()

    def throw():
        if state.interrupt.is_set():
            raise InterruptedError("Processing interrupted")

    folder_paths = types.ModuleType("folder_paths")
    folder_paths.get_folder_paths = lambda kind: [str(loras)]
    folder_paths.get_filename_list = lambda kind: ["a.safetensors"]
    folder_paths.get_full_path = lambda kind, name: None
    comfy = types.ModuleType("comfy")
    comfy.utils = types.ModuleType("comfy.utils")
    comfy.utils.ProgressBar = ProgressBar
    comfy.model_management = types.ModuleType("comfy.model_management")
    comfy.model_management.processing_interrupted = state.interrupt.is_set
    comfy.model_management.throw_exception_if_processing_interrupted = throw
    comfy.model_management.unload_all_models = lambda: setattr(state, "unloaded", state.unloaded + 1)
    comfy.model_management.soft_empty_cache = lambda: None
    for name, module in (("folder_paths", folder_paths), ("comfy", comfy), ("comfy.utils", comfy.utils),
                         ("comfy.model_management", comfy.model_management)):
        monkeypatch.setitem(sys.modules, name, module)
    state.loras = loras
    return state


def test_node_conventions(comfyui_package, comfy_stand_ins):
    nodes = comfyui_package.NODE_CLASS_MAPPINGS
    load, train = nodes["SdtrainLoadDoRA"], nodes["SdtrainTrainDoRA"]
    inputs = load.INPUT_TYPES()
    assert list(inputs["required"]) == ["model", "clip", "lora_name", "strength_model", "strength_clip"]
    assert inputs["required"]["lora_name"][0] == ["a.safetensors"] and load.RETURN_TYPES == ("MODEL", "CLIP")
    inputs = train.INPUT_TYPES()
    assert {"base", "images", "output_name", "rank", "steps", "resume"} == set(inputs["required"])
    assert {"config", "model", "clip"} <= set(inputs["optional"])
    assert train.RETURN_TYPES == ("MODEL", "CLIP", "STRING") and train.OUTPUT_NODE
    assert load.CATEGORY == train.CATEGORY == "sdtrain"


@pytest.mark.parametrize("shape,weight,axis,rule,comfy_rule,expected", [
    ((1, 24), (40, 24), "input", "magnitude", "w0-norm", True),
    ((1, 16, 1, 1), (24, 16, 3, 3), "input", "magnitude", None, True),
    ((24,), (40, 24), "input", "magnitude", "w0-norm", False),  # 1-D: ComfyUI's branch test misreads it
    ((1, 16), (24, 16, 1, 1), "input", "magnitude", "w0-norm", False),  # 2-D scale on a 4-D weight
    ((40, 1), (40, 24), "output", "magnitude", "w0-norm", False),  # v0.3.64 divides by |W0|
    ((40, 1), (40, 24), "output", "comfyui-w0-norm", "w0-norm", True),  # ... which the encoding compensates
    ((40, 1), (40, 24), "output", "magnitude", "merged-norm", True),  # ComfyUI with the fix
    ((40, 1), (40, 24), "output", "comfyui-w0-norm", "merged-norm", False),
    ((40, 1), (40, 24), "output", "magnitude", None, False),  # unknown ComfyUI: the exact path
])
def test_comfyui_path_only_where_comfyui_is_exact(comfyui_package, shape, weight, axis, rule, comfy_rule, expected):
    assert comfyui_package.comfy_patches.comfyui_is_exact(shape, weight, axis, rule, comfy_rule) is expected


def test_sdtrain_command_resolution(comfyui_package, monkeypatch, tmp_path):
    training = comfyui_package.training
    monkeypatch.delenv("SDTRAIN_COMMAND", raising=False)
    monkeypatch.setattr(training, "COMMAND_FILE", tmp_path / "sdtrain_command.json")
    assert training.sdtrain_command() == ([sys.executable, "-m", "sdtrain"], {})
    (tmp_path / "sdtrain_command.json").write_text(json.dumps({"command": ["/v/bin/python", "-m", "sdtrain"],
                                                               "pythonpath": "/src"}))
    command, env = training.sdtrain_command()
    assert command == ["/v/bin/python", "-m", "sdtrain"] and env["PYTHONPATH"].split(os.pathsep)[0] == "/src"
    monkeypatch.setenv("SDTRAIN_COMMAND", "/opt/sdtrain --x")
    assert training.sdtrain_command() == (["/opt/sdtrain", "--x"], {})
    assert training.sdtrain_command("/a b/c")[0] == ["/a", "b/c"]


FAST = "\n".join([
    "data.resolution=64", "data.min_bucket_side=64", "data.max_bucket_side=64", "data.num_workers=0",
    'train.mixed_precision="no"', "sample.every_n_steps=0", "log.tensorboard=false", "save.targets=[]",
    'optimizer.type="AdamW"', 'network.preset="attn"', 'save.target="lycoris"',
])


def test_training_node_streams_progress_stops_and_resumes(comfyui_package, comfy_stand_ins, tmp_path, monkeypatch):
    images = tmp_path / "images"
    images.mkdir()
    for name in ("star_000", "star_001"):
        for suffix in (".png", ".txt"):
            shutil.copy(REPO / "datasets" / "demo" / "4_star" / f"{name}{suffix}", images)
    node = comfyui_package.NODE_CLASS_MAPPINGS["SdtrainTrainDoRA"]()
    command = f"{sys.executable} -m sdtrain"
    steps = 24  # enough steps that a fast machine cannot finish the run between the stop press and the signal
    fields = dict(base="builtin:tiny-sd15", images=str(images), output_name="shapes", rank=4, steps=steps,
                  extra_settings=FAST, sdtrain_command=command)
    training = comfyui_package.training
    monkeypatch.setattr(training, "run_training", functools.partial(training.run_training, poll_seconds=0.01))

    comfy_stand_ins.stop_at = 2  # ComfyUI's stop button, pressed at step 2
    with pytest.raises(InterruptedError):
        node.train(resume=True, **fields)
    output_dir = comfy_stand_ins.loras / "sdtrain" / "shapes"
    assert comfyui_package.training.has_state(output_dir)  # sdtrain saved a state on SIGINT
    stopped_at = comfy_stand_ins.progress[-1][0]
    assert 2 <= stopped_at < steps and comfy_stand_ins.unloaded == 1

    comfy_stand_ins.stop_at, comfy_stand_ins.progress = None, []
    comfy_stand_ins.interrupt.clear()
    model, clip, path = node.train(resume=True, **fields)
    assert (model, clip) == (None, None)
    assert Path(path) == output_dir / "shapes.safetensors" and Path(path).is_file()
    assert comfy_stand_ins.progress[0][0] >= stopped_at and comfy_stand_ins.progress[-1] == (steps, steps)
    from safetensors import safe_open

    with safe_open(path, "pt") as handle:  # the run wrote the file for save.target (set through extra_settings)
        assert handle.metadata()["sdtrain_target"] == "lycoris"
    config = (output_dir / "comfyui_train.toml").read_text()
    assert 'path = "builtin:tiny-sd15"' in config and f"max_steps = {steps}" in config and "rank = 4" in config


def test_training_node_reports_sdtrain_errors(comfyui_package, comfy_stand_ins, tmp_path):
    node = comfyui_package.NODE_CLASS_MAPPINGS["SdtrainTrainDoRA"]()
    with pytest.raises(RuntimeError, match="data.subsets"):
        node.train(base="builtin:tiny-sd15", images=str(tmp_path / "missing"), output_name="x", rank=4, steps=2,
                   resume=False, sdtrain_command=f"{sys.executable} -m sdtrain")
    with pytest.raises(ValueError, match="give a config file"):
        node.train(base="", images="", output_name="x", rank=4, steps=2, resume=False)
