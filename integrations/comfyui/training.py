"""`sdtrain train` in a subprocess for the "Train DoRA (sdtrain)" node (standard library only).

ComfyUI's process only waits on the child and reads its output: the model, the optimizer and every tensor live in
the child. Progress comes from the child's progress bar on stderr (`training:  45%|...| 18/40 [...]`), the adapter
path from its `saved PATH` line. Stopping sends the child SIGINT (CTRL_BREAK on Windows), which makes sdtrain save a
training state and the adapter so far, so the run can be resumed.

Which sdtrain runs: the node's `sdtrain_command` field, else $SDTRAIN_COMMAND, else the command recorded by
`sdtrain install-comfyui` in `sdtrain_command.json` next to this file, else `python -m sdtrain` with ComfyUI's Python.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

COMMAND_FILE = Path(__file__).resolve().parent / "sdtrain_command.json"
_PROGRESS = re.compile(r"training:\s*\d+%\|[^|]*\|\s*(\d+)/(\d+)")
_SAVED = re.compile(r"^(?:saved|adapter so far saved to) (.+\.safetensors)\s*$")


def sdtrain_command(override: str = "") -> tuple[list[str], dict[str, str]]:
    """(the command that runs sdtrain, environment variables it needs)."""
    if override.strip():
        return shlex.split(override), {}
    if os.environ.get("SDTRAIN_COMMAND", "").strip():
        return shlex.split(os.environ["SDTRAIN_COMMAND"]), {}
    if COMMAND_FILE.is_file():
        recorded = json.loads(COMMAND_FILE.read_text(encoding="utf-8"))
        if recorded.get("command"):
            env = {}
            if recorded.get("pythonpath"):
                env["PYTHONPATH"] = os.pathsep.join(p for p in (recorded["pythonpath"], os.environ.get("PYTHONPATH")) if p)
            return list(recorded["command"]), env
    return [sys.executable, "-m", "sdtrain"], {}


def config_text(base: str, images: str, rank: int, steps: int, output_dir: str, output_name: str,
                state_every: int) -> str:
    """A minimal sdtrain TOML config for the node's fields (every other key keeps sdtrain's default)."""
    def quoted(value: str) -> str:
        return json.dumps(str(value))

    return "\n".join([
        "# written by the ComfyUI node \"Train DoRA (sdtrain)\"",
        "[model]", f"path = {quoted(base)}",
        "[[data.subsets]]", f"path = {quoted(images)}",
        "[network]", f"rank = {int(rank)}", f"alpha = {int(rank)}",
        "[train]", f"max_steps = {int(steps)}", f"output_dir = {quoted(output_dir)}", f"output_name = {quoted(output_name)}",
        "[save]", f"state_every_n_steps = {int(state_every)}",
        "",
    ])


def has_state(output_dir: str | os.PathLike) -> bool:
    """Whether the output folder holds a complete training state to resume from (`states/step-N/COMPLETE`)."""
    states = Path(output_dir) / "states"
    return states.is_dir() and any((p / "COMPLETE").is_file() for p in states.glob("step-*"))


@dataclass
class TrainOutcome:
    returncode: int
    adapter: str | None
    step: int = 0
    total: int = 0
    log: list[str] = field(default_factory=list)  # the last lines of the child's output
    stopped: bool = False

    def error(self) -> str:
        for line in reversed(self.log):
            if line.startswith("error:"):
                return line
        return "\n".join(self.log[-8:])


def _pump(stream, lines: deque, on_line) -> None:
    buffer = ""
    while True:
        chunk = stream.read(256)
        if not chunk:
            break
        buffer += chunk
        parts = re.split(r"[\r\n]", buffer)
        buffer = parts.pop()
        for part in parts:
            if part.strip():
                lines.append(part)
                on_line(part)
    if buffer.strip():
        lines.append(buffer)
        on_line(buffer)


def run_training(command: list[str], args: list[str], *, on_progress=None, should_stop=None, env=None,
                 poll_seconds: float = 0.2, stop_grace_seconds: float = 120.0) -> TrainOutcome:
    """Run `command + ["train"] + args`, reporting (step, total) to `on_progress` and stopping when `should_stop()`."""
    lines: deque = deque(maxlen=200)
    outcome = TrainOutcome(returncode=-1, adapter=None)

    def on_line(line: str) -> None:
        progress = _PROGRESS.search(line)
        if progress:
            outcome.step, outcome.total = int(progress.group(1)), int(progress.group(2))
            if on_progress is not None:
                on_progress(outcome.step, outcome.total)
        saved = _SAVED.match(line.strip())
        if saved:
            outcome.adapter = saved.group(1)

    windows = os.name == "nt"
    child = subprocess.Popen(
        [*command, "train", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        text=True, encoding="utf-8", errors="replace", env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        creationflags=subprocess.CREATE_NEW_PROCESS_GROUP if windows else 0)
    reader = threading.Thread(target=_pump, args=(child.stdout, lines, on_line), daemon=True)
    reader.start()
    stop_sent = None
    while child.poll() is None:
        if stop_sent is None and should_stop is not None and should_stop():
            child.send_signal(signal.CTRL_BREAK_EVENT if windows else signal.SIGINT)
            stop_sent = time.monotonic()
            outcome.stopped = True
        if stop_sent is not None and time.monotonic() - stop_sent > stop_grace_seconds:
            child.kill()
        time.sleep(poll_seconds)
    reader.join(timeout=10)
    outcome.returncode = child.returncode
    outcome.log = list(lines)
    return outcome
