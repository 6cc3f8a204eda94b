"""The node classes. Importing this module imports nothing from ComfyUI or torch; the nodes do when they run."""

from __future__ import annotations

import os
from pathlib import Path

CATEGORY = "sdtrain"


def _read_adapter(path: str) -> tuple[dict, dict]:
    """(state dict, metadata) of an adapter file, read by ComfyUI's own loader."""
    import comfy.utils

    try:
        lora, metadata = comfy.utils.load_torch_file(path, safe_load=True, return_metadata=True)
    except TypeError:  # a ComfyUI without return_metadata
        from safetensors import safe_open

        lora = comfy.utils.load_torch_file(path, safe_load=True)
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata()
    return lora, dict(metadata or {})


class LoadDoRAExact:
    """MODEL + CLIP + an adapter file → patched MODEL + CLIP, DoRA rebuilt exactly on both axes."""

    def __init__(self):
        self.loaded = None  # (path, state dict, metadata) of the last file, as LoraLoader caches it

    @classmethod
    def INPUT_TYPES(cls):
        import folder_paths

        strength = {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01}
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The diffusion model the adapter is applied to."}),
                "clip": ("CLIP", {"tooltip": "The text encoder(s) the adapter is applied to."}),
                "lora_name": (folder_paths.get_filename_list("loras"), {"tooltip": "A LoRA/DoRA file in models/loras."}),
                "strength_model": ("FLOAT", {**strength, "tooltip": "k in W0 + k·(W' − W0) for the diffusion model."}),
                "strength_clip": ("FLOAT", {**strength, "tooltip": "k in W0 + k·(W' − W0) for the text encoders."}),
            },
            "optional": {
                "adapter_path": ("STRING", {"forceInput": True,
                                            "tooltip": "A file path (e.g. from Train DoRA); replaces lora_name."}),
            },
        }

    RETURN_TYPES = ("MODEL", "CLIP")
    FUNCTION = "load_dora"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Loads a DoRA/LoRA file (sdtrain, kohya, LyCORIS, OneTrainer) through ComfyUI's LoRA patches, "
                   "rebuilding DoRA weights exactly (W0 + k·(W' − W0)) on both decomposition axes.")

    def load_dora(self, model, clip, lora_name, strength_model, strength_clip, adapter_path=None):
        import folder_paths

        from .comfy_patches import load_dora_for_models

        if strength_model == 0 and strength_clip == 0:
            return (model, clip)
        path = adapter_path or folder_paths.get_full_path_or_raise("loras", lora_name)
        if self.loaded is None or self.loaded[0] != path:
            self.loaded = (path, *_read_adapter(path))
        _, lora, metadata = self.loaded
        new_model, new_clip, summary = load_dora_for_models(model, clip, lora, metadata, strength_model, strength_clip)
        print(f"[sdtrain] {os.path.basename(path)}: {summary}")
        return (new_model, new_clip)


class TrainDoRA:
    """Runs `sdtrain train` in a subprocess with ComfyUI's progress bar; returns the adapter (and loads it)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "base": ("STRING", {"default": "", "tooltip": "Base model: a file in models/checkpoints, a path, a hub "
                                                              "id or builtin:tiny-sdxl; empty: the config's model.path."}),
                "images": ("STRING", {"default": "", "tooltip": "Folder of images with .txt captions; empty: the "
                                                                "config's data.subsets."}),
                "output_name": ("STRING", {"default": "my_dora", "tooltip": "File name of the adapter."}),
                "rank": ("INT", {"default": 16, "min": 0, "max": 1024, "tooltip": "Adapter rank (0: the config's)."}),
                "steps": ("INT", {"default": 1000, "min": 0, "max": 1000000,
                                  "tooltip": "Optimizer steps (0: the config's)."}),
                "resume": ("BOOLEAN", {"default": True, "tooltip": "Continue from the newest training state of this "
                                                                   "output folder when there is one."}),
            },
            "optional": {
                "config": ("STRING", {"default": "", "tooltip": "An sdtrain TOML config; the fields above override it."}),
                "extra_settings": ("STRING", {"default": "", "multiline": True,
                                              "tooltip": "More config keys, one key=value per line "
                                                         "(e.g. train.batch_size=2)."}),
                "sdtrain_command": ("STRING", {"default": "", "tooltip": "How to run sdtrain, e.g. "
                                                                         "/path/venv/bin/sdtrain (default: recorded by "
                                                                         "sdtrain install-comfyui)."}),
                "model": ("MODEL", {"tooltip": "Connect to get it back with the trained adapter applied."}),
                "clip": ("CLIP",),
                "strength": ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01}),
            },
        }

    RETURN_TYPES = ("MODEL", "CLIP", "STRING")
    RETURN_NAMES = ("model", "clip", "adapter_path")
    FUNCTION = "train"
    CATEGORY = CATEGORY
    OUTPUT_NODE = True
    DESCRIPTION = "Trains a DoRA adapter with sdtrain in a separate process and returns its path."

    def train(self, base, images, output_name, rank, steps, resume, config="", extra_settings="", sdtrain_command="",
              model=None, clip=None, strength=1.0):
        import comfy.model_management as mm
        import comfy.utils

        from . import training

        args, output_dir = self._arguments(base, images, output_name, rank, steps, config, extra_settings)
        if resume and output_dir is not None and training.has_state(output_dir):
            args += ["--resume", "latest"]
        mm.unload_all_models()  # the child needs the GPU memory ComfyUI holds
        mm.soft_empty_cache()
        bars = {}

        def on_progress(step, total):
            bar = bars.setdefault(total, comfy.utils.ProgressBar(total))
            bar.update_absolute(step, total)

        command, env = training.sdtrain_command(sdtrain_command)
        outcome = training.run_training(command, args, on_progress=on_progress, should_stop=mm.processing_interrupted,
                                        env=env)
        if outcome.stopped:
            mm.throw_exception_if_processing_interrupted()
        if outcome.returncode != 0 or outcome.adapter is None:
            raise RuntimeError(f"sdtrain train failed (exit code {outcome.returncode}): {outcome.error()}")
        if model is not None or clip is not None:
            model, clip = LoadDoRAExact().load_dora(model, clip, "", strength, strength, adapter_path=outcome.adapter)
        return (model, clip, outcome.adapter)

    @staticmethod
    def _arguments(base, images, output_name, rank, steps, config, extra_settings):
        """(sdtrain train arguments, output folder or None when the config's own folder is unknown)."""
        from . import training

        base = _checkpoint_path(base.strip())
        overrides = [line.strip() for line in (extra_settings or "").splitlines() if line.strip()]
        if config.strip():
            sets = overrides[:]
            if base:
                sets.append(f"model.path={base}")
            if images.strip():
                sets.append(f"data.subsets=[{{path={_toml(os.path.abspath(images.strip()))}}}]")
            if rank:
                sets.append(f"network.rank={int(rank)}")
            if steps:
                sets.append(f"train.max_steps={int(steps)}")
            if output_name.strip():
                sets.append(f"train.output_name={output_name.strip()}")
            args = [config.strip()] + [item for s in sets for item in ("--set", s)]
            return args, _config_output_dir(config.strip(), overrides)
        if not base or not images.strip() or not rank or not steps:
            raise ValueError("Train DoRA (sdtrain): set base, images, rank and steps, or give a config file")
        output_dir = _loras_folder() / "sdtrain" / output_name.strip()
        output_dir.mkdir(parents=True, exist_ok=True)
        path = output_dir / "comfyui_train.toml"
        state_every = max(1, min(250, int(steps) // 10))
        path.write_text(training.config_text(base, os.path.abspath(images.strip()), rank, steps, str(output_dir),
                                             output_name.strip(), state_every), encoding="utf-8")
        return [str(path)] + [item for s in overrides for item in ("--set", s)], output_dir


def _toml(value: str) -> str:
    import json

    return json.dumps(value)


def _checkpoint_path(base: str) -> str:
    """A file name from models/checkpoints as its full path; anything else unchanged."""
    if not base or base.startswith("builtin:") or os.path.isabs(base):
        return base
    try:
        import folder_paths

        return folder_paths.get_full_path("checkpoints", base) or base
    except Exception:
        return base


def _loras_folder() -> Path:
    import folder_paths

    return Path(folder_paths.get_folder_paths("loras")[0])


def _config_output_dir(config: str, overrides: list[str]) -> Path | None:
    """train.output_dir of a config (relative to its folder), or None when it cannot be read here."""
    for item in overrides:
        if item.startswith("train.output_dir="):
            return Path(item.split("=", 1)[1].strip().strip('"'))
    try:
        import tomllib
    except ImportError:  # Python 3.10
        return None
    try:
        data = tomllib.loads(Path(config).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    folder = data.get("train", {}).get("output_dir", "output")
    return (Path(config).parent / folder).resolve()


NODE_CLASS_MAPPINGS = {"SdtrainLoadDoRA": LoadDoRAExact, "SdtrainTrainDoRA": TrainDoRA}
NODE_DISPLAY_NAME_MAPPINGS = {"SdtrainLoadDoRA": "Load DoRA (sdtrain, exact)", "SdtrainTrainDoRA": "Train DoRA (sdtrain)"}
