"""`sdtrain install-comfyui` / `sdtrain install-webui` on temporary UI folder layouts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from sdtrain.cli import main
from sdtrain.commands import ui_install

INTEGRATIONS = Path(__file__).resolve().parents[2] / "integrations"


@pytest.fixture
def sources(tmp_path, monkeypatch):
    """Copies of integrations/comfyui and integrations/webui as the installation's source (the command records the
    sdtrain command next to the linked nodes; the repository's own folder stays untouched)."""
    copies = {}
    for name in ("comfyui", "webui"):
        copies[name] = tmp_path / "sdtrain-src" / name
        shutil.copytree(INTEGRATIONS / name, copies[name], ignore=shutil.ignore_patterns("__pycache__", "*.json"))
    monkeypatch.setattr(ui_install, "integration_source", lambda name: copies[name])
    return copies


def comfyui_dir(tmp_path) -> Path:
    root = tmp_path / "ComfyUI"
    (root / "custom_nodes").mkdir(parents=True)
    (root / "main.py").write_text("")
    return root


def run(capsys, *args) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_the_repository_holds_both_integrations():
    assert ui_install.integration_source("comfyui") == INTEGRATIONS / "comfyui"
    assert (ui_install.integration_source("webui") / "scripts" / "sdtrain_dora.py").is_file()


def test_install_comfyui_links_and_is_idempotent(tmp_path, sources, capsys):
    root = comfyui_dir(tmp_path)
    code, out, _ = run(capsys, "install-comfyui", str(root))
    installed = root / "custom_nodes" / "sdtrain"
    assert code == 0 and f"linked {installed} -> {sources['comfyui']}" in out
    assert installed.is_symlink() and (installed / "__init__.py").is_file()
    record = json.loads((sources["comfyui"] / "sdtrain_command.json").read_text())
    assert record["command"][1:] == ["-m", "sdtrain"] and Path(record["pythonpath"], "sdtrain").is_dir()
    assert "recorded the sdtrain command" in out and "restart ComfyUI" in out
    code, out, _ = run(capsys, "install-comfyui", str(root))
    assert code == 0 and "already installed" in out and "already recorded" in out and "linked" not in out


def test_install_comfyui_copy_updates_and_refuses_foreign_folders(tmp_path, sources, capsys):
    root = comfyui_dir(tmp_path)
    installed = root / "custom_nodes" / "sdtrain"
    code, out, _ = run(capsys, "install-comfyui", str(root), "--copy")
    assert code == 0 and "copied" in out and installed.is_dir() and not installed.is_symlink()
    assert (installed / "nodes.py").read_bytes() == (sources["comfyui"] / "nodes.py").read_bytes()
    assert (installed / "sdtrain_command.json").is_file()
    code, out, _ = run(capsys, "install-comfyui", str(root), "--copy")
    assert "already installed" in out and "up to date" in out
    (sources["comfyui"] / "nodes.py").write_text((sources["comfyui"] / "nodes.py").read_text() + "\n# newer\n")
    code, out, _ = run(capsys, "install-comfyui", str(root), "--copy")
    assert code == 0 and "removed the previous" in out and "copied" in out
    assert (installed / "nodes.py").read_text().endswith("# newer\n")
    # switching to a link replaces sdtrain's own copy
    code, out, _ = run(capsys, "install-comfyui", str(root))
    assert code == 0 and installed.is_symlink()
    # someone else's folder is left alone without --force
    installed.unlink()
    installed.mkdir()
    (installed / "theirs.py").write_text("x")
    code, _, err = run(capsys, "install-comfyui", str(root))
    assert code == 2 and "not an sdtrain integration" in err and (installed / "theirs.py").is_file()
    code, out, _ = run(capsys, "install-comfyui", str(root), "--force")
    assert code == 0 and installed.is_symlink()


def test_install_refuses_a_folder_that_is_not_the_ui(tmp_path, sources, capsys):
    code, _, err = run(capsys, "install-comfyui", str(tmp_path))
    assert code == 2 and "does not look like a ComfyUI folder" in err and "main.py" in err
    code, _, err = run(capsys, "install-webui", str(tmp_path / "nope"))
    assert code == 2 and "is not a folder" in err


@pytest.mark.parametrize("flavour,marker", [("Forge", "backend/patcher/lora.py"),
                                            ("AUTOMATIC1111", "extensions-builtin/Lora/networks.py")])
def test_install_webui(tmp_path, sources, capsys, flavour, marker):
    root = tmp_path / "webui"
    (root / marker).parent.mkdir(parents=True)
    (root / marker).write_text("")
    (root / "webui.py").write_text("")
    code, out, _ = run(capsys, "install-webui", str(root))
    installed = root / "extensions" / "sdtrain"
    assert code == 0 and f"found {flavour}" in out and f"linked {installed}" in out
    assert (installed / "scripts" / "sdtrain_dora.py").is_file() and (installed / "metadata.ini").is_file()
    code, out, _ = run(capsys, "install-webui", str(root))
    assert code == 0 and "already installed" in out
