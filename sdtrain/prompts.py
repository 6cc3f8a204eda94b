"""kohya-style sample prompt lines: `a photo --n blurry --w 768 --h 1024 --d 7 --l 6.5 --s 25`."""

from __future__ import annotations

import re

from sdtrain.limits import MAX_CFG_SCALE, MAX_SAMPLE_STEPS, MAX_SEED, MAX_SIDE

# option letter -> (result key, value parser, what it accepts)
_OPTIONS = {
    "n": ("negative", str, "text"),
    "w": ("width", int, f"a width in pixels, a multiple of 8 up to {MAX_SIDE}"),
    "h": ("height", int, f"a height in pixels, a multiple of 8 up to {MAX_SIDE}"),
    "d": ("seed", int, f"an integer seed in [0, {MAX_SEED}]"),
    "l": ("cfg", float, f"a CFG scale in [0, {MAX_CFG_SCALE:g}]"),
    "s": ("steps", int, f"a step count in [1, {MAX_SAMPLE_STEPS}]"),
}
_OPTION_RE = re.compile(r"(?:^|\s)--([A-Za-z]+)(?=\s|$)")


def parse_prompt_line(line: str) -> dict:
    """Parse one kohya prompt line into {prompt, negative, width, height, seed, cfg, steps}.

    Options not given are None (the caller fills in config defaults). Raises ValueError
    naming the bad option and what it accepts.
    """
    pieces = _OPTION_RE.split(line)
    result = {"prompt": pieces[0].strip(), "negative": None, "width": None, "height": None,
              "seed": None, "cfg": None, "steps": None}
    if not result["prompt"]:
        raise ValueError("the prompt text before the first --option is empty")
    for letter, raw in zip(pieces[1::2], pieces[2::2]):
        if letter not in _OPTIONS:
            raise ValueError(f"unknown option --{letter}; accepted: " + ", ".join(f"--{k}" for k in _OPTIONS))
        key, parse, accepts = _OPTIONS[letter]
        raw = raw.strip()
        if key == "negative":
            result[key] = raw
            continue
        try:
            value = parse(raw)
        except ValueError:
            raise ValueError(f"--{letter} '{raw}' is not valid; it accepts {accepts}") from None
        valid = {
            "width": 0 < value <= MAX_SIDE and value % 8 == 0,
            "height": 0 < value <= MAX_SIDE and value % 8 == 0,
            "seed": 0 <= value <= MAX_SEED,
            "cfg": 0 <= value <= MAX_CFG_SCALE,
            "steps": 1 <= value <= MAX_SAMPLE_STEPS,
        }[key]
        if not valid:
            raise ValueError(f"--{letter} {raw} is out of range; it accepts {accepts}")
        result[key] = value
    return result
