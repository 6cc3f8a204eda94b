"""Read a TOML config, apply `--set key.path=value` overrides and check every key against the schema.

kohya option names (top-level keys, `--set network_dim=8`) and kohya dataset configs are read through
`sdtrain.config.kohya`; what they were read as is reported as notes.
"""

from __future__ import annotations

import copy
import difflib
import os
from dataclasses import fields

from sdtrain.config import kohya
from sdtrain.config.kinds import Choice, Mismatch, Path, Section, SectionList, Str, StrList, type_name
from sdtrain.config.resolve import resolve_config
from sdtrain.config.schema import Config, iter_keys
from sdtrain.errors import ConfigError

try:
    import tomllib

    _TOML_ERRORS = (tomllib.TOMLDecodeError,)

    def _parse_toml(text: str) -> dict:
        return tomllib.loads(text)

except ModuleNotFoundError:  # Python 3.10
    import toml

    _TOML_ERRORS = (toml.TomlDecodeError,)

    def _parse_toml(text: str) -> dict:
        return toml.loads(text)


def read_toml(path: str) -> dict:
    """The parsed TOML file at `path`; a missing or malformed file is a `ConfigError`."""
    try:
        with open(path, "rb") as handle:
            text = handle.read().decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}; check the path passed to --config") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    try:
        return _parse_toml(text)
    except _TOML_ERRORS as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}; fix the syntax at that line") from None


# ---------------------------------------------------------------- overrides


def parse_override(text: str) -> tuple[list[str], object, str]:
    """Split `a.b.0.c=value` into (["a", "b", "0", "c"], parsed value, raw value text).

    The value is read as a TOML literal (numbers, booleans, arrays, inline tables, quoted
    strings); anything that is not valid TOML is taken as a plain string.
    """
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set expects key.path=value (e.g. --set train.max_steps=500), got '{text}'")
    parts = key.split(".")
    if any(not p.strip() for p in parts):
        raise ConfigError(f"--set key '{key}' has an empty part; write it like network.rank=32")
    raw = raw.strip()
    try:
        value = _parse_toml(f"v = {raw}")["v"]
    except _TOML_ERRORS:
        value = raw
    return [p.strip() for p in parts], value, raw


def _kind_at(parts: list[str]):
    """The schema kind at a dotted override path (list indices skipped), or None."""
    key = ".".join("N" if p.isdigit() else p for p in parts)
    for dotted, f in iter_keys():
        if dotted == key:
            return f.metadata["kind"]
    return None


def apply_overrides(data: dict, overrides, notes: list[str] | None = None) -> dict[str, str]:
    """Apply `--set` overrides to the raw config dict in place.

    Returns {dotted key: override text} so messages can point at the --set that caused them.
    A list index equal to the list's length appends a new table (e.g. a new subset). A kohya option name
    (`--set network_dim=8`) sets its sdtrain key; a note for each goes to `notes`.
    """
    origins: dict[str, str] = {}
    for text in overrides:
        parts, value, raw = parse_override(text)
        if len(parts) == 1 and parts[0] in kohya.OPTIONS:
            option, converted = kohya.read_option(parts[0], value)
            if notes is not None:
                notes.append(kohya.option_note(parts[0], option, value, converted, f"--set {text}", override=True))
            for path in kohya.override_paths(option, data):
                _set_path(data, path, converted, raw, text, origins)
            continue
        _set_path(data, parts, value, raw, text, origins)
    return origins


def _set_path(data: dict, parts: list[str], value, raw: str, text: str, origins: dict[str, str]) -> None:
    """Set one `--set` value at its key path (see `apply_overrides`)."""
    if isinstance(_kind_at(parts), (Str, Path)) and not isinstance(value, str):
        value = raw  # `--set train.output_name=2024` means the string "2024"
    node = data
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        where = ".".join(parts[: depth + 1])
        if isinstance(node, list):
            if not part.isdigit():
                raise ConfigError(f"--set {text}: '{'.'.join(parts[:depth])}' is a list; index it with a number, "
                                  f"e.g. {'.'.join(parts[:depth])}.0")
            index = int(part)
            if index > len(node):
                raise ConfigError(f"--set {text}: '{'.'.join(parts[:depth])}' has {len(node)} entries; "
                                  f"use an index from 0 to {len(node)} ({len(node)} appends a new one)")
            if last:
                if index == len(node):
                    node.append(value)
                else:
                    node[index] = value
            else:
                if index == len(node):
                    node.append({})
                node = node[index]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, [] if parts[depth + 1].isdigit() else {})
        else:
            raise ConfigError(f"--set {text}: '{'.'.join(parts[:depth])}' is a single value, not a table; "
                              f"it has no key '{part}'")
        if last:
            origins[where] = text


# ---------------------------------------------------------------- schema walk


class _Problems:
    """Collects validation problems so the user sees all of them at once."""

    def __init__(self, source: str, origins: dict[str, str]):
        self.source = source
        self.origins = origins
        self.lines: list[str] = []
        self.notes: list[str] = []

    def where(self, dotted: str) -> str:
        for key, where in self.origins.items():
            if dotted == key or dotted.startswith(key + "."):
                return where
        return self.source

    def add(self, message: str):
        self.lines.append(message)

    def raise_if_any(self):
        if len(self.lines) == 1:
            raise ConfigError(self.lines[0])
        if self.lines:
            items = "".join("\n  - " + line.replace("\n", "\n      ") for line in self.lines)
            raise ConfigError(f"{len(self.lines)} problems in {self.source}:{items}")


def _generic(dotted: str) -> str:
    return ".".join("N" if p.isdigit() else p for p in dotted.split("."))


def _specific(generic: str, dotted: str) -> str:
    """Put the subset index of `dotted` back into a generic 'data.subsets.N.x' key."""
    parts = dotted.split(".")
    if "N" in generic.split(".") and len(parts) > 2 and parts[2].isdigit():
        return generic.replace(".N.", f".{parts[2]}.", 1)
    return generic


def suggest_key(dotted: str, siblings: list[str]) -> str:
    """The most likely intended key for an unknown dotted key, or ""."""
    name = dotted.rsplit(".", 1)[-1]
    prefix = dotted[: len(dotted) - len(name)]
    match = difflib.get_close_matches(name, siblings, n=1, cutoff=0.6)
    if match:
        return prefix + match[0]
    if name in kohya.SUGGESTIONS:
        return _specific(kohya.SUGGESTIONS[name], dotted)
    everywhere = {key.rsplit(".", 1)[-1]: key for key, _ in iter_keys()}
    match = difflib.get_close_matches(name, list(everywhere), n=1, cutoff=0.75)
    if match:
        return _specific(everywhere[match[0]], dotted)
    return ""


def _example_block(prefix: str, example: str) -> str:
    """`example` under its TOML table header ([model], [[data.subsets]])."""
    if "\n" in example:
        return example
    parts = prefix.rstrip(".").split(".")
    if parts[-1].isdigit():
        return f"[[{'.'.join(parts[:-1])}]]\n{example}"
    return f"[{'.'.join(parts)}]\n{example}" if parts[0] else example


def _describe_value(value) -> str:
    text = repr(value) if not isinstance(value, str) else f'"{value}"'
    if isinstance(value, bool):
        text = "true" if value else "false"
    return f"{text} ({type_name(value)})"


def build_section(cls, raw, prefix: str, problems: _Problems):
    """Check one table against its schema dataclass and build it; problems are collected."""
    known = [f.name for f in fields(cls)]
    for key in raw:
        if key not in known:
            dotted = prefix + str(key)
            hint = suggest_key(dotted, known)
            message = f"unknown key '{dotted}' in {problems.where(dotted)}"
            if hint:
                message += f"; did you mean '{hint}'?"
            else:
                section = prefix.rstrip(".") or "the top level"
                message += f"; keys accepted in {section}: {', '.join(known)}"
            problems.add(message)
    values = {}
    for f in fields(cls):
        kind = f.metadata["kind"]
        dotted = prefix + f.name
        value = raw.get(f.name)
        if isinstance(kind, Section):
            if value is None:
                value = {}
            if not isinstance(value, dict):
                problems.add(f"'{dotted}' in {problems.where(dotted)} must be a table ([{dotted}]), "
                             f"got {_describe_value(value)}")
                continue
            values[f.name] = build_section(kind.cls, value, dotted + ".", problems)
            continue
        if value is None or (f.metadata["required"] and value == []):
            if f.metadata["required"]:
                problems.add(f"missing required key '{dotted}' in {problems.where(dotted)}; add it, e.g.\n"
                             + _example_block(prefix, f.metadata["example"]))
            continue
        if isinstance(kind, SectionList):
            if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
                problems.add(f"'{dotted}' in {problems.where(dotted)} must be an array of tables "
                             f"([[{dotted}]] blocks), got {_describe_value(value)}")
                continue
            values[f.name] = [build_section(kind.cls, v, f"{dotted}.{i}.", problems) for i, v in enumerate(value)]
            continue
        try:
            values[f.name] = kind.check(value)
        except Mismatch as exc:
            where = problems.where(dotted)
            if exc.reason == "type":
                message = f"'{dotted}' in {where} has the wrong type: got {_describe_value(value)}; it accepts {kind.describe()}"
            elif isinstance(kind, (Choice, StrList)):
                message = f"'{dotted}' in {where} is not an accepted value: got {_describe_value(value)}; it accepts {kind.describe()}"
            else:
                message = f"'{dotted}' in {where} is out of range: got {_describe_value(value)}; it accepts {kind.describe()}"
            if exc.hint:
                message += f"; did you mean \"{exc.hint}\"?"
            problems.add(message)
    return cls(**values)


def config_from_dict(data: dict, base_dir, *, source: str = "<config>", origins: dict[str, str] | None = None,
                     stem: str | None = None, notes: list[str] | None = None) -> Config:
    """Check a raw config dict against the schema, then resolve paths and derived defaults.

    `base_dir` is where relative paths start; `source` names the config in messages; `origins` maps dotted
    keys to where their values came from when not from `source` (e.g. "--set network.rank=8"); `stem` (the
    config file's name) is the default `train.output_name`. Notes about the resolved config (e.g. TensorBoard
    off because it is not installed) are appended to `notes`. Raises `ConfigError`.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the config must be a table of sections, got {type_name(data)}")
    problems = _Problems(source, origins or {})
    config = build_section(Config, copy.deepcopy(data), "", problems)
    problems.raise_if_any()
    resolve_config(config, os.fspath(base_dir), problems, stem)
    problems.raise_if_any()
    if notes is not None:
        notes.extend(problems.notes)
    return config


def load_config(path, overrides=(), *, dataset_config=None, notes: list[str] | None = None) -> Config:
    """Read the TOML config at `path`, apply `--set key.path=value` overrides, validate and resolve it.

    Top-level kohya option names are read as their sdtrain keys; `dataset_config` is a kohya dataset TOML
    whose subsets replace the config's (`sdtrain.config.kohya`). One line per thing the user should know
    (what a kohya name was read as, TensorBoard off, ...) is appended to `notes`.
    """
    path = os.fspath(path)
    data = read_toml(path)
    source = display_path(path)
    notes = [] if notes is None else notes
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the config must be a table of sections, got {type_name(data)}")
    origins: dict[str, str] = {}
    subset_defaults = kohya.take_options(data, source, notes, origins)
    if dataset_config is not None:
        kohya.merge_dataset_config(data, os.fspath(dataset_config), source, notes, origins)
    kohya.apply_subset_defaults(data, subset_defaults, origins)
    for key, text in apply_overrides(data, list(overrides), notes).items():
        origins[key] = f"--set {text}"
    kohya.match_kohya_mask_weighting(data, source, notes, origins)
    stem = os.path.splitext(os.path.basename(path))[0]
    return config_from_dict(data, os.path.dirname(os.path.abspath(path)), source=source, origins=origins,
                            stem=stem, notes=notes)


def display_path(path) -> str:
    """A config path as the user would recognise it (relative to the working folder when inside it)."""
    path = os.fspath(path)
    try:
        rel = os.path.relpath(path)
    except ValueError:
        return path
    return rel if not rel.startswith("..") else path
