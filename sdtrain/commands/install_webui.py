"""`sdtrain install-webui WEBUI_DIR [--copy] [--force]`: install sdtrain's A1111 / Forge extension.

Links (or copies) `integrations/webui` to `WEBUI_DIR/extensions/sdtrain`. The extension makes the built-in Lora
loader apply output-axis DoRA exactly (A1111: instead of broadcasting it; Forge: with the norm of W0 + ΔW) and
leaves everything else to the UI. Idempotent; prints what it did.
"""

from __future__ import annotations

from pathlib import Path

NAME = "install-webui"
HELP = "Install sdtrain's extension (exact output-axis DoRA in the built-in Lora) into an A1111 or Forge folder."
FOLDER_NAME = "sdtrain"


def add_arguments(parser):
    from sdtrain.commands.ui_install import add_install_arguments

    add_install_arguments(parser, "WEBUI_DIR", "A1111 or Forge", "webui.py", "extensions")


def flavour(root: Path) -> str:
    if (root / "backend" / "patcher" / "lora.py").is_file():
        return "Forge"
    if (root / "extensions-builtin" / "Lora").is_dir():
        return "AUTOMATIC1111"
    return "an unrecognised WebUI (no backend/patcher/lora.py, no extensions-builtin/Lora)"


def run(args) -> int:
    from sdtrain.commands.ui_install import install_folder, integration_source, ui_folder

    extensions = ui_folder(args.webui_dir, "extensions", ("webui.py", "launch.py"), "WebUI")
    print(f"found {flavour(extensions.parent)} in {extensions.parent}")
    for line in install_folder(integration_source("webui"), extensions / FOLDER_NAME, copy=args.copy, force=args.force):
        print(line)
    print("restart the WebUI; DoRA files in models/Lora then load exactly with <lora:name:weight> "
          "(the console prints \"[sdtrain] exact output-axis DoRA ...\" at start)")
    return 0
