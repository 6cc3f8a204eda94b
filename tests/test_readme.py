"""README.md stays true: its commands exist, its config reference is the schema's."""

import re
from pathlib import Path

from sdtrain.cli import build_parser
from sdtrain.config.dump import README_END, README_START, readme_config_section
from sdtrain.config.schema import iter_keys

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_config_reference_is_generated_from_the_schema():
    section = README.split(README_START, 1)[1].split(README_END, 1)[0].strip("\n")
    assert section == readme_config_section(), "README is stale: run `python -m sdtrain.config --readme README.md`"
    for key, _ in iter_keys():
        assert f"`{key}`" in section, key


def test_readme_commands_exist():
    subcommands = set(build_parser()._subparsers._group_actions[0].choices)
    mentioned = set(re.findall(r"`sdtrain ([\w-]+)", README))
    assert mentioned <= subcommands, mentioned - subcommands
    assert {"train", "verify", "inspect", "merge", "analyze", "doctor"} <= subcommands


def test_ci_runs_the_readme_test_command():
    test_command = re.search(r"## Run the tests\s+```bash\n(.+?)\n```", README, re.S).group(1).strip()
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_command.split("&& ")[-1] in ci
    for example in ("configs/demo.toml", "configs/character.toml", "configs/style.toml", "configs/sd15.toml"):
        assert (ROOT / example).is_file()
