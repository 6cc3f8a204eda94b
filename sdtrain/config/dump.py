"""Config out: plain dicts, the resolved TOML written next to the outputs, and the reference doc."""

from __future__ import annotations

import dataclasses
import os
import re

from sdtrain import __version__
from sdtrain.config.kinds import (
    Bool, BoolOrAuto, Choice, Float, FloatPair, Int, Path, Resolution, Section, SectionList, Str, StrList, Table,
)
from sdtrain.config.schema import Config, field_default

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def config_to_dict(config: Config) -> dict:
    """The config as nested plain dicts and lists; unset optional keys (None) are left out."""

    def clean(value):
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items() if v is not None}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    return clean(dataclasses.asdict(config))


def config_to_flat_dict(config: Config) -> dict:
    """{dotted key: value} of every set key, subsets numbered (`data.subsets.0.path`); tables stay whole."""
    flat: dict = {}

    def walk(cls, data: dict, prefix: str):
        for f in dataclasses.fields(cls):
            if f.name not in data:
                continue
            kind, value, key = f.metadata["kind"], data[f.name], prefix + f.name
            if isinstance(kind, Section):
                walk(kind.cls, value, key + ".")
            elif isinstance(kind, SectionList):
                for index, item in enumerate(value):
                    walk(kind.cls, item, f"{key}.{index}.")
            else:
                flat[key] = value

    walk(Config, config_to_dict(config), "")
    return flat


# ---------------------------------------------------------------- TOML writing


def _toml_string(text: str) -> str:
    out = []
    for char in text:
        if char in '"\\':
            out.append("\\" + char)
        elif char == "\n":
            out.append("\\n")
        elif char == "\t":
            out.append("\\t")
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else _toml_string(key)


def toml_value(value) -> str:
    """One value as a TOML literal (inline arrays and tables)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        if not value:
            return "{}"
        return "{ " + ", ".join(f"{_toml_key(k)} = {toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def _is_table_array(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def dict_to_toml(data: dict) -> str:
    """Sections of scalars, inline arrays/tables, and [[arrays of tables]] one level down."""
    lines: list[str] = []
    for section, table in data.items():
        lines.append(f"[{_toml_key(section)}]")
        arrays = []
        for key, value in table.items():
            if _is_table_array(value):
                arrays.append((key, value))
            else:
                lines.append(f"{_toml_key(key)} = {toml_value(value)}")
        for key, items in arrays:
            for item in items:
                lines.append("")
                lines.append(f"[[{_toml_key(section)}.{_toml_key(key)}]]")
                lines.extend(f"{_toml_key(k)} = {toml_value(v)}" for k, v in item.items())
        lines.append("")
    return "\n".join(lines)


def resolved_config_path(config: Config) -> str:
    """Where the training run writes its resolved config: `<output_dir>/<output_name>.resolved.toml`."""
    return os.path.join(config.train.output_dir, f"{config.train.output_name}.resolved.toml")


def write_resolved_config(config: Config, path) -> None:
    """Write the fully resolved config as TOML (atomically: a temp file renamed into place)."""
    from sdtrain.files import atomic_write_bytes

    text = (f"# Resolved config written by sdtrain {__version__}: every default filled in, paths absolute.\n"
            "# Use it as a config to repeat the run with exactly these settings.\n\n"
            + dict_to_toml(config_to_dict(config)))
    atomic_write_bytes(path, text.encode("utf-8"))


# ---------------------------------------------------------------- reference doc

_TYPE_NAMES = {
    Bool: "boolean", BoolOrAuto: "boolean or string", Int: "integer", Float: "float", Choice: "string", Str: "string", Path: "path",
    StrList: "array of strings", FloatPair: "array of 2 floats", Resolution: "string, integer or array",
    Table: "table", SectionList: "array of tables",
}

_INTRO = """\
# Config reference

<!-- Generated by `python -m sdtrain.config > docs/config.md`; do not edit by hand. -->

A training run is described by one TOML file with the sections below. Every key is
checked before any model loads: an unknown key fails with its dotted path and a
"did you mean", a wrong type or range names the key and what it accepts.

- Relative paths are read from the config file's folder.
- `--set key.path=value` on the command line overrides a key; the value is read
  as a TOML literal when it is one (`--set network.rank=32`, `--set sample.prompts='["a cat"]'`),
  else as a string. Subsets are indexed: `--set data.subsets.0.repeats=3`.
- kohya option names (`network_dim`, `learning_rate`, `max_train_steps`, `resolution = "512,512"`, ...)
  are accepted as top-level keys and in `--set`; each is read as its key below, with a note.
  `sdtrain train CONFIG --dataset-config FILE.toml` reads a kohya dataset config
  (`[[datasets]]` / `[[datasets.subsets]]`) as `data.subsets`.
- The resolved config (every default filled in, absolute paths) is written next to the
  outputs as `<train.output_dir>/<train.output_name>.resolved.toml`.
- Example configs: `configs/character.toml`, `configs/style.toml`, `configs/sd15.toml`,
  `configs/demo.toml`.
"""


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _default_text(f) -> str:
    if f.metadata["required"]:
        return "required"
    if f.metadata["default_doc"]:
        return f.metadata["default_doc"]
    default = field_default(f)
    if default is None:
        return "not set"
    return f"`{toml_value(default)}`"


def _section_markdown(cls, dotted: str, header: str, help_text: str) -> list[str]:
    lines = [f"## `{header}`", "", help_text, "", "| Key | Type | Default | Accepts | Description |",
             "|---|---|---|---|---|"]
    nested = []
    for f in dataclasses.fields(cls):
        kind = f.metadata["kind"]
        key = f"{dotted}.{f.name}"
        if isinstance(kind, SectionList):
            nested.append((kind.cls, f"{key}.N", f"[[{key}]]", f.metadata["help"]))
            accepts = f"`[[{key}]]` tables, see below"
        else:
            accepts = kind.describe()
        lines.append(f"| `{key}` | {_TYPE_NAMES[type(kind)]} | {_cell(_default_text(f))} | {_cell(accepts)} "
                     f"| {_cell(f.metadata['help'])} |")
    lines.append("")
    for args in nested:
        lines.extend(_section_markdown(*args))
    return lines


def config_reference_markdown() -> str:
    """docs/config.md: every key with its dotted path, type, default, accepted values and help."""
    lines = [_INTRO]
    for f in dataclasses.fields(Config):
        kind = f.metadata["kind"]
        assert isinstance(kind, Section)
        lines.extend(_section_markdown(kind.cls, f.name, f"[{f.name}]", f.metadata["help"]))
    return "\n".join(lines)


README_START, README_END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"


def readme_config_section() -> str:
    """The config reference as README.md embeds it: sections one heading level down, without the title."""
    body = config_reference_markdown().split("\n", 1)[1].lstrip("\n")
    return "\n".join("#" + line if line.startswith("## ") else line for line in body.splitlines())


def update_readme(path) -> None:
    """Rewrite the generated config section of README.md (between the config-reference markers)."""
    from pathlib import Path

    path = Path(path)
    text = path.read_text(encoding="utf-8")
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    path.write_text(f"{head}{README_START}\n{readme_config_section()}\n{README_END}{tail}", encoding="utf-8")
