"""Value kinds of config keys: each checks a raw TOML value and says what it accepts.

`check(value)` returns the normalised value or raises `Mismatch`; `describe()` is the
"accepts ..." text used in error messages and in docs/config.md.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass

INT64_MAX = 2**63 - 1


class Mismatch(Exception):
    """A value does not fit its kind; `reason` is "type" (wrong type) or "value" (range/choice)."""

    def __init__(self, reason: str, hint: str = ""):
        super().__init__(reason)
        self.reason = reason
        self.hint = hint


def type_name(value) -> str:
    """The TOML name of a Python value's type, for messages."""
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (list, tuple)):
        return "array"
    if isinstance(value, dict):
        return "table"
    return type(value).__name__


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return _is_int(value) or isinstance(value, float)


def _bounds_text(lo, hi, lo_open: bool) -> str:
    if lo is not None and hi is not None:
        return f" in {'(' if lo_open else '['}{lo}, {hi}]"
    if lo is not None:
        return f" {'>' if lo_open else '>='} {lo}"
    if hi is not None:
        return f" <= {hi}"
    return ""


def _in_bounds(value, lo, hi, lo_open: bool) -> bool:
    if lo is not None and (value <= lo if lo_open else value < lo):
        return False
    return hi is None or value <= hi


class Kind:
    def check(self, value):
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError


@dataclass(frozen=True)
class Bool(Kind):
    def check(self, value):
        if not isinstance(value, bool):
            raise Mismatch("type")
        return value

    def describe(self) -> str:
        return "true or false"


@dataclass(frozen=True)
class BoolOrAuto(Kind):
    """true, false, or "auto" (decided when the config is resolved)."""

    def check(self, value):
        if isinstance(value, bool) or value == "auto":
            return value
        if isinstance(value, str):
            raise Mismatch("value", "auto" if value.strip().lower() == "auto" else "")
        raise Mismatch("type")

    def describe(self) -> str:
        return 'true, false or "auto"'


@dataclass(frozen=True)
class Int(Kind):
    """An integer; every integer key also fits a signed 64-bit integer (what TOML, JSON metadata and torch hold)."""

    min: int | None = None
    max: int | None = None
    multiple_of: int | None = None

    def check(self, value):
        if not _is_int(value):
            raise Mismatch("type")
        if abs(value) > INT64_MAX or not _in_bounds(value, self.min, self.max, False):
            raise Mismatch("value")
        if self.multiple_of and value % self.multiple_of:
            raise Mismatch("value")
        return value

    def describe(self) -> str:
        text = "an integer" + _bounds_text(self.min, self.max, False)
        if self.multiple_of:
            text += f", a multiple of {self.multiple_of}"
        return text


@dataclass(frozen=True)
class Float(Kind):
    """A finite number (NaN and inf are refused: TOML reads `nan`, `inf` and overflowing literals like 1e400 as
    such, and none of them is a usable setting)."""

    min: float | None = None
    max: float | None = None
    min_open: bool = False

    def check(self, value):
        if not _is_number(value):
            raise Mismatch("type")
        if _is_int(value) and abs(value) > INT64_MAX:
            raise Mismatch("value")
        if not math.isfinite(value) or not _in_bounds(value, self.min, self.max, self.min_open):
            raise Mismatch("value")
        return float(value)

    def describe(self) -> str:
        bounded = self.min is not None and self.max is not None  # a closed range says "finite" by itself
        return ("a number" if bounded else "a finite number") + _bounds_text(self.min, self.max, self.min_open)


@dataclass(frozen=True)
class Choice(Kind):
    values: tuple[str, ...]

    def check(self, value):
        if not isinstance(value, str):
            raise Mismatch("type")
        if value not in self.values:
            raise Mismatch("value", _closest(value, self.values))
        return value

    def describe(self) -> str:
        return "one of " + ", ".join(f'"{v}"' for v in self.values)


@dataclass(frozen=True)
class Str(Kind):
    nonempty: bool = False
    what: str = "a string"

    def check(self, value):
        if not isinstance(value, str):
            raise Mismatch("type")
        if self.nonempty and not value.strip():
            raise Mismatch("value")
        return value

    def describe(self) -> str:
        return self.what + (" (not empty)" if self.nonempty else "")


@dataclass(frozen=True)
class Path(Kind):
    """A path string; `role` tells the resolver how to check it (see `resolve.py`).

    roles: "model" (local file/folder, hub id or builtin:NAME), "vae" (local or hub id),
    "input_dir" (existing folder), "output_dir" (created when needed).
    """

    role: str

    def check(self, value):
        if not isinstance(value, str):
            raise Mismatch("type")
        if not value.strip():
            raise Mismatch("value")
        return value

    def describe(self) -> str:
        return {
            "model": 'a hub id "org/name", a diffusers folder, a .safetensors file, or "builtin:tiny-sd15" / "builtin:tiny-sdxl"',
            "vae": 'a hub id "org/name", a diffusers VAE folder, or a .safetensors file',
            "input_dir": "a path to an existing folder (relative to the config file)",
            "output_dir": "a folder path (relative to the config file; created when needed)",
        }[self.role]


@dataclass(frozen=True)
class StrList(Kind):
    choices: tuple[str, ...] | None = None

    def check(self, value):
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise Mismatch("type")
        if self.choices is not None:
            for item in value:
                if item not in self.choices:
                    raise Mismatch("value", _closest(item, self.choices))
        return list(value)

    def describe(self) -> str:
        if self.choices is not None:
            return "a list of " + ", ".join(f'"{v}"' for v in self.choices)
        return "a list of strings"


@dataclass(frozen=True)
class FloatPair(Kind):
    min: float = 0.0
    max: float = 1.0

    def check(self, value):
        if not isinstance(value, (list, tuple)) or len(value) != 2 or not all(_is_number(v) for v in value):
            raise Mismatch("type")
        if not all(self.min <= v < self.max for v in value):
            raise Mismatch("value")
        return [float(v) for v in value]

    def describe(self) -> str:
        return f"a list of two numbers in [{self.min}, {self.max}), e.g. [0.9, 0.999]"


@dataclass(frozen=True)
class Resolution(Kind):
    """`"auto"`, a side length, or [width, height]; normalised to "auto" or [width, height]."""

    multiple_of: int = 64

    def check(self, value):
        if value == "auto":
            return value
        if _is_int(value):
            value = [value, value]
        if not isinstance(value, (list, tuple)) or len(value) != 2 or not all(_is_int(v) for v in value):
            raise Mismatch("type")
        if not all(v >= self.multiple_of and v % self.multiple_of == 0 for v in value):
            raise Mismatch("value")
        return [int(v) for v in value]

    def describe(self) -> str:
        return (
            f'"auto", an integer side, or [width, height]; sides are multiples of {self.multiple_of}'
        )


@dataclass(frozen=True)
class Table(Kind):
    def check(self, value):
        if not isinstance(value, dict):
            raise Mismatch("type")
        return dict(value)

    def describe(self) -> str:
        return "a table of name = value pairs"


@dataclass(frozen=True)
class Section(Kind):
    """A nested table described by a schema dataclass, e.g. `[model]`."""

    cls: type

    def describe(self) -> str:
        return "a table"


@dataclass(frozen=True)
class SectionList(Kind):
    """An array of tables described by a schema dataclass, e.g. `[[data.subsets]]`."""

    cls: type

    def describe(self) -> str:
        return "an array of tables"


def _closest(value: str, choices) -> str:
    lowered = {c.lower(): c for c in choices}
    if value.lower() in lowered:
        return lowered[value.lower()]
    match = difflib.get_close_matches(value, list(choices), n=1, cutoff=0.6)
    return match[0] if match else ""
