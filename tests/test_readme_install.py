"""README's install and main command are what CI runs in a fresh venv with the base install only."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
CI = (ROOT / ".ci" / "run").read_text(encoding="utf-8")


def readme_main_block() -> list[str]:
    block = re.search(r"## Install and run the main job.*?```bash\n(.+?)\n```", README, re.S).group(1)
    return [line.strip() for line in block.splitlines() if line.strip()]


def test_readme_main_command_installs_torch_then_the_base_install_then_trains():
    torch_line, base_install, main_command = readme_main_block()
    assert torch_line == "python3 -m pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
    assert base_install == "python3 -m pip install -c .ci/constraints.txt -e ."  # no [test] extras
    assert main_command == "sdtrain train configs/demo.toml"


def test_ci_runs_the_base_install_and_main_command_in_a_fresh_venv():
    _, base_install, main_command = readme_main_block()
    venv_part = CI.split("python3 -m venv", 1)[1]
    assert "source" in venv_part and "/bin/activate" in venv_part
    assert re.search(rf"^\s*{re.escape(base_install.replace('pip install', 'pip install -q'))}\s*$", venv_part, re.M)
    assert re.search(rf"^\s*{re.escape(main_command)} --set train\.max_steps=\d+", venv_part, re.M)
    assert "[test]" not in venv_part
    # torch comes first in the venv as in CI's own install (the machines' local CPU wheel)
    assert venv_part.index("pip install -q torch==2.13.0") < venv_part.index(base_install.split(" -m ")[1].replace(
        "pip install", "pip install -q"))


def test_tensorboard_is_optional_and_the_readme_says_why():
    pyproject = (ROOT / "pyproject.toml").read_text()
    dependencies = pyproject.split("dependencies = [", 1)[1].split("]", 1)[0]
    assert "tensorboard" not in dependencies
    assert "TensorBoard is optional" in README and "It is not a dependency because" in README


def test_ci_shortened_main_command_is_a_valid_config():
    """The `--set` overrides that shorten the main command in CI give a config that loads (a warm-up longer than
    the shortened run, say, is refused by the resolver, and CI would fail after the whole test suite)."""
    import shlex

    from sdtrain.config import load_config

    line = next(line for line in CI.splitlines() if line.strip().startswith("sdtrain train configs/demo.toml"))
    words = shlex.split(line)
    overrides = [words[i + 1] for i, word in enumerate(words) if word == "--set"]
    cfg = load_config(ROOT / "configs" / "demo.toml", overrides)
    assert cfg.train.max_steps < 20 and cfg.scheduler.warmup_steps < cfg.train.max_steps
