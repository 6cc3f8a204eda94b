"""Hostile configs never end in a traceback: each one trains (dry run) or fails with an exit-2 message that names
the key, before any model weights load.

The mutations are generated from the schema (every leaf key gets values that do not fit its kind, non-finite
numbers and integers beyond 64 bits) plus structural damage to the TOML file itself.
"""

from __future__ import annotations

import contextlib
import io
import math

import pytest
from PIL import Image

from sdtrain.cli import main
from sdtrain.config.kinds import Bool, Choice, Float, FloatPair, Int, Path, Resolution, Str, StrList, Table
from sdtrain.config.schema import iter_keys
from sdtrain.limits import MAX_SEED
from sdtrain.prompts import parse_prompt_line

BASE = """\
[model]
path = "builtin:tiny-sd15"
[data]
resolution = 64
min_bucket_side = 64
max_bucket_side = 128
[[data.subsets]]
path = "img"
[train]
max_steps = 5
[log]
tensorboard = false
"""

# Values by kind that the kind must refuse (or, for paths and strings, that later checks must refuse).
HOSTILE = {
    Float: ["nan", "inf", "-inf", "1e400", str(2**64), '"0.1"'],
    Int: [str(2**63), str(-(2**63) - 1), "1e9", "nan", '"3"'],
    Bool: ['"yes"', "1"],
    Choice: ['"x"', "3"],
    Path: ['""', '"/proc/sdtrain-nowhere/x"'],
    StrList: ['"a"', "[1]"],
    FloatPair: ["[nan, 0.9]", "[0.9]", "[inf, inf]"],
    Resolution: ["100", "[64]", '"big"', str(2**63)],
    Table: ["nan", '"x"'],
}

# Values inside every kind's accepted type that are large enough to hang or exhaust memory if not bounded.
HUGE = {"network.rank": "1000000000", "train.seed": str(2**63), "data.max_bucket_side": str(2**40),
        "data.subsets.0.repeats": "1000000000", "sample.steps": "1000000", "model.clip_skip": "1000000000",
"network.alpha": "1e400", "sample.prompts": '["a --w 1000000 --s 100000"]',
        "sample.cfg_scale": "1e300"}

STRUCTURAL = {
    "section as value": "model = 5\n" + BASE.split("\n", 2)[2],
    "subsets as table": BASE.replace("[[data.subsets]]", "[data.subsets]"),
    "subset without path": BASE.replace('path = "img"\n', ""),
    "date value": BASE + "[save]\nevery_n_steps = 1979-05-27\n",
    "unknown section": BASE + "[bogus]\nx = 1\n",
    "not toml": BASE + "[train\n",
    "nested unknown": BASE + "[network.rank]\nx = 1\n",
    "empty": "",
}


def _mutations():
    cases = []
    for dotted, field in iter_keys():
        kind = type(field.metadata["kind"])
        key = dotted.replace(".N.", ".0.")
        values = HOSTILE.get(kind, [])
        if kind is Str and field.metadata["kind"].nonempty:
            values = ['""']  # `--set` reads any other value of a string key as its text
        cases.extend((key, value) for value in values)
    cases.extend(HUGE.items())
    return cases


MUTATIONS = _mutations()


def test_there_are_enough_mutations():
    assert len(MUTATIONS) + len(STRUCTURAL) >= 50


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    (root / "img").mkdir()
    for i in range(2):
        Image.new("RGB", (64, 64), (40 * i, 90, 200)).save(root / "img" / f"{i}.png")
        (root / "img" / f"{i}.txt").write_text("a shape, blue")
    return root


def _run(argv) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse
            code = exc.code
    return code, err.getvalue()


def test_base_config_plans(project):
    (project / "base.toml").write_text(BASE)
    code, err = _run(["train", str(project / "base.toml"), "--dry-run"])
    assert code == 0, err


@pytest.mark.parametrize("key, value", MUTATIONS, ids=[f"{k}={v}" for k, v in MUTATIONS])
def test_hostile_value_is_a_clear_error(project, key, value):
    (project / "base.toml").write_text(BASE)
    code, err = _run(["train", str(project / "base.toml"), "--dry-run", "--set", f"{key}={value}"])
    assert code == 2, f"accepted {key}={value}"
    assert err.startswith("error: ") and "Traceback" not in err
    leaf = key.rsplit(".", 1)[-1]
    assert leaf in err, err


@pytest.mark.parametrize("name", list(STRUCTURAL))
def test_damaged_file_is_a_clear_error(project, name):
    path = project / f"{name.replace(' ', '_')}.toml"
    path.write_text(STRUCTURAL[name])
    code, err = _run(["train", str(path), "--dry-run"])
    assert code == 2, name
    assert err.startswith("error: ") and "Traceback" not in err
    assert path.name in err, err


def test_non_finite_floats_are_refused_with_the_accepted_range():
    kind = Float(min=0, min_open=True)
    for value in (math.nan, math.inf, -math.inf, 2**70):
        with pytest.raises(Exception) as info:
            kind.check(value)
        assert type(info.value).__name__ == "Mismatch"
    assert "finite" in kind.describe()
    assert kind.check(0.5) == 0.5


def test_integers_must_fit_64_bits():
    kind = Int(min=0)
    with pytest.raises(Exception):
        kind.check(2**63)
    assert kind.check(2**63 - 1) == 2**63 - 1


@pytest.mark.parametrize("line, problem", [
    ("a --l inf", "--l"), ("a --l nan", "--l"), ("a --w 100000", "--w"), ("a --h 8200", "--h"),
    (f"a --d {MAX_SEED + 1}", "--d"), ("a --s 1001", "--s"),
])
def test_sample_prompt_options_are_bounded(line, problem):
    with pytest.raises(ValueError, match=problem):
        parse_prompt_line(line)
