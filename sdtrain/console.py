"""What sdtrain prints besides its results: its own notes and warnings in one format, and the filters that
keep known third-party messages which tell the user nothing off the screen.

Each filter names one message of one library's logger and why it says nothing to an sdtrain user; every
other message of that logger still shows. `sdtrain --verbose` (any command) removes the filters.
"""

from __future__ import annotations

import contextlib
import logging
import re
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class KnownNoise:
    """One third-party log message (a regular expression over its text) that is dropped, and why."""

    logger: str
    pattern: str
    why: str


KNOWN_NOISE = (
    KnownNoise("transformers.utils.import_utils",
               r"^`\w+ImageProcessor` requires torchvision \(not installed\); falling back to `\w+ImageProcessorPil`",
               "diffusers' pipeline modules import CLIP/SigLIP image processors (safety checker, IP-adapter "
               "feature extractors) that sdtrain never runs; transformers logs this on every import without torchvision"),
    KnownNoise("diffusers.models.modeling_utils",
               r"^There are modules in \w+ that should be kept in float32: \[\]\.",
               "diffusers warns on every `model.to(dtype)` even when the list of float32 modules is empty"),
)

# bitsandbytes logs about its 4-bit CPU kernels on import; sdtrain uses only its 8-bit optimizers.
QUIET_LOGGERS = {"bitsandbytes.backends.cpu.ops": logging.ERROR}


class _DropKnown(logging.Filter):
    def __init__(self, patterns: list[re.Pattern]):
        super().__init__()
        self.patterns = patterns

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            text = record.getMessage()
        except Exception:  # a malformed record is not ours to judge
            return True
        return not any(p.search(text) for p in self.patterns)


_installed: dict[str, _DropKnown] = {}
_verbose = False


def install_filters() -> None:
    """Attach the known-noise filters to their loggers (idempotent); called when sdtrain is imported."""
    if _verbose:
        return
    by_logger: dict[str, list[re.Pattern]] = {}
    for noise in KNOWN_NOISE:
        by_logger.setdefault(noise.logger, []).append(re.compile(noise.pattern))
    for name, patterns in by_logger.items():
        if name not in _installed:
            _installed[name] = _DropKnown(patterns)
            logging.getLogger(name).addFilter(_installed[name])
    for name, level in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)


def show_everything() -> None:
    """--verbose: remove the filters, let quieted loggers and library progress bars through."""
    global _verbose
    _verbose = True
    for name, flt in _installed.items():
        logging.getLogger(name).removeFilter(flt)
    _installed.clear()
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET)


def is_verbose() -> bool:
    return _verbose


class _SdtrainFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        prefix = "note" if record.levelno < logging.WARNING else record.levelname.lower()
        return f"{prefix}: {record.getMessage()}"


def setup_logging(verbose: bool = False) -> None:
    """sdtrain's own log records ("sdtrain.*" loggers) print as `warning: ...` / `note: ...` on stderr."""
    logger = logging.getLogger("sdtrain")
    if not any(getattr(h, "_sdtrain", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_SdtrainFormatter())
        handler._sdtrain = True
        logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    logger.propagate = False
    if verbose:
        show_everything()


def note(text: str) -> None:
    """Print one note in sdtrain's format (`note: ...` on stderr)."""
    print(f"note: {text}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def no_library_progress_bars():
    """Hide transformers' progress bars (e.g. "Writing model shards" of each text encoder a diffusers folder
    save writes) for the duration; shown with --verbose."""
    if _verbose:
        yield
        return
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
