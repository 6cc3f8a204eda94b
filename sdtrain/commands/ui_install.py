"""Installing sdtrain's UI integrations (`integrations/<name>/`) into a UI folder: shared by install-comfyui and
install-webui.

The integration folder is linked (default: updates of sdtrain reach the UI) or copied (`--copy`). Running it again
changes nothing and says so; a copy that differs from the source is replaced; a folder at the destination that is
not sdtrain's is left alone unless `--force`. Each integration folder holds a `.sdtrain-integration` marker naming it.
"""

from __future__ import annotations

import filecmp
import os
import shutil
import sysconfig
from pathlib import Path

from sdtrain.errors import ConfigError

MARKER = ".sdtrain-integration"
IGNORED = ("__pycache__", "sdtrain_command.json")


def integration_source(name: str) -> Path:
    """The integration folder in this sdtrain installation (the repository checkout, or the wheel's data files)."""
    import sdtrain

    candidates = [Path(sdtrain.__file__).resolve().parent.parent / "integrations" / name,
                  Path(sysconfig.get_path("data")) / "share" / "sdtrain" / "integrations" / name]
    for candidate in candidates:
        if (candidate / MARKER).is_file():
            return candidate
    raise ConfigError(f"this sdtrain installation has no integrations/{name} folder (looked in "
                      f"{', '.join(str(c) for c in candidates)}); install sdtrain from its repository "
                      f"(pip install -e .) or copy integrations/{name} from it by hand")


def _is_ours(path: Path) -> bool:
    return (path / MARKER).is_file()


def _same_tree(a: Path, b: Path) -> bool:
    compare = filecmp.dircmp(a, b, ignore=list(IGNORED))
    if compare.left_only or compare.right_only or compare.funny_files:
        return False
    _, mismatch, errors = filecmp.cmpfiles(a, b, compare.common_files, shallow=False)
    if mismatch or errors:
        return False
    return all(_same_tree(a / sub, b / sub) for sub in compare.common_dirs)


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    else:
        shutil.rmtree(path)


def install_folder(source: Path, destination: Path, *, copy: bool, force: bool) -> list[str]:
    """Link or copy `source` to `destination`; returns what was done, one line per action."""
    done = []
    if destination.is_symlink() or destination.exists():
        linked = destination.is_symlink() and destination.resolve() == source.resolve()
        if linked and not copy:
            return [f"already installed: {destination} -> {source}"]
        if destination.is_dir() and not destination.is_symlink() and copy and _is_ours(destination) \
                and _same_tree(source, destination):
            return [f"already installed: {destination} (a copy, up to date)"]
        if not (_is_ours(destination) or force):
            raise ConfigError(f"{destination} exists and is not an sdtrain integration; move it away, or pass --force "
                              f"to replace it")
        _remove(destination)
        done.append(f"removed the previous {destination}")
    destination.parent.mkdir(parents=True, exist_ok=True)
    if not copy:
        try:
            os.symlink(source, destination, target_is_directory=True)
            return done + [f"linked {destination} -> {source}"]
        except OSError as err:  # e.g. Windows without the symlink privilege
            done.append(f"could not link ({err}); copying instead")
    shutil.copytree(source, destination, ignore=shutil.ignore_patterns(*IGNORED))
    return done + [f"copied {source} to {destination}"]


def add_install_arguments(parser, ui_dir: str, ui: str, holds: str, subfolder: str) -> None:
    """The arguments install-comfyui and install-webui share."""
    parser.add_argument(ui_dir.lower(), metavar=ui_dir, help=f"the {ui} folder (the one holding {holds})")
    parser.add_argument("--copy", action="store_true", help="copy the integration instead of linking it")
    parser.add_argument("--force", action="store_true", help=f"replace a {subfolder}/sdtrain folder that is not sdtrain's")


def ui_folder(path: str, subfolder: str, signs: tuple[str, ...], ui: str) -> Path:
    """The UI's `subfolder` (custom_nodes, extensions); ConfigError when `path` does not look like that UI."""
    root = Path(path).expanduser().resolve()
    if not root.is_dir():
        raise ConfigError(f"{root} is not a folder; pass the {ui} folder (the one holding {signs[0]})")
    if not (root / subfolder).is_dir() and not any((root / sign).exists() for sign in signs):
        raise ConfigError(f"{root} does not look like a {ui} folder (no {subfolder}/ and no {', '.join(signs)}); pass "
                          f"the folder that holds {signs[0]}")
    return root / subfolder
