"""`sdtrain install-comfyui COMFYUI_DIR [--copy] [--force]`: install sdtrain's ComfyUI nodes.

Links (or copies) `integrations/comfyui` to `COMFYUI_DIR/custom_nodes/sdtrain` and records how to run this sdtrain
(`sdtrain_command.json` in the node folder) for the "Train DoRA (sdtrain)" node. Idempotent; prints what it did.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

NAME = "install-comfyui"
HELP = 'Install the ComfyUI nodes "Load DoRA (sdtrain, exact)" and "Train DoRA (sdtrain)" into a ComfyUI folder.'
FOLDER_NAME = "sdtrain"


def add_arguments(parser):
    from sdtrain.commands.ui_install import add_install_arguments

    add_install_arguments(parser, "COMFYUI_DIR", "ComfyUI", "main.py", "custom_nodes")


def record_command(node_folder: Path) -> str:
    """Write how to run this sdtrain for the training node; returns what was done."""
    import sdtrain

    record = {"command": [sys.executable, "-m", "sdtrain"],
              "pythonpath": str(Path(sdtrain.__file__).resolve().parent.parent)}
    path = node_folder.resolve() / "sdtrain_command.json"
    text = json.dumps(record, indent=2) + "\n"
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return f"sdtrain command already recorded in {path}"
    path.write_text(text, encoding="utf-8")
    return f"recorded the sdtrain command for Train DoRA in {path}: {' '.join(record['command'])}"


def run(args) -> int:
    from sdtrain.commands.ui_install import install_folder, integration_source, ui_folder

    custom_nodes = ui_folder(args.comfyui_dir, "custom_nodes", ("main.py", "comfy"), "ComfyUI")
    destination = custom_nodes / FOLDER_NAME
    for line in install_folder(integration_source("comfyui"), destination, copy=args.copy, force=args.force):
        print(line)
    print(record_command(destination))
    print('restart ComfyUI; the nodes are in the "sdtrain" category: "Load DoRA (sdtrain, exact)" (use it instead of '
          'Load LoRA for DoRA files) and "Train DoRA (sdtrain)"')
    return 0
