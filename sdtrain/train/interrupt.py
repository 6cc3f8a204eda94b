"""Stopping a run cleanly.

While training steps run, SIGINT (Ctrl+C) and SIGTERM (`docker stop`, a cluster taking the node back) only
ask the run to stop: the current optimizer step finishes, then the trainer saves a training state and the
adapter so far and exits with 128 + the signal number (130, 143), saying how to continue. A second Ctrl+C
stops at once without saving; the newest state on disk stays loadable (states are written atomically).
A script or test can ask for the same clean stop with `Trainer.request_stop`.
"""

from __future__ import annotations

import signal
import threading

from sdtrain.errors import UserError

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(UserError):
    """The run stopped before its last step; the message says what was saved and how to continue."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class StopRequest:
    """Whether the run was asked to stop, by whom, and the exit code that says so.

    Used as a context manager around the training steps: SIGINT/SIGTERM handlers are installed on entry (main
    thread only; signals cannot be caught elsewhere) and the previous handlers restored on exit.
    """

    def __init__(self):
        self.reason: str | None = None
        self.exit_code = 0
        self._previous: dict = {}

    def request(self, reason: str, exit_code: int) -> None:
        if self.reason is None:
            self.reason, self.exit_code = reason, exit_code

    def _on_signal(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.reason is not None:
            raise KeyboardInterrupt  # a second Ctrl+C: stop now
        self.request(signal.Signals(signum).name, 128 + signum)

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._on_signal) for sig in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
