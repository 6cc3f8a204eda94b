"""Caption files and caption augmentation (kohya sd-scripts semantics).

Caption files are UTF-8 (a UTF-8 byte-order mark is stripped); the first non-empty line is the caption,
stripped of surrounding whitespace. A file that is not valid UTF-8 is NOT decoded with replacement
characters: `read_caption` raises `UnreadableCaption` and the image is skipped and listed with the reason
(garbled text in a caption would silently teach the model wrong words). An empty file is an empty caption.

Augmentation (`augment_caption`) follows kohya's order: caption dropout first (the whole caption becomes
""); otherwise, when tag shuffling or tag dropout is on, the caption is split on `tag_separator` into
stripped, non-empty tags, the fixed tags are kept in place, the others are shuffled and then each is
dropped with probability `tag_dropout`; the result is joined with ", " (kohya always joins with ", ").
Fixed tags: with `keep_tokens_separator` present in the caption, the part before it (and the part after a
second separator, as a fixed suffix); otherwise the first `keep_tokens` tags.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

# Captions longer than this are cut (with a note in the scan): the text encoders read at most 225 tokens
# (kohya's max_token_length), a few hundred characters; a longer first line is a mistake, and keeping it would
# tokenise it on every use and copy it into the adapter's metadata.
MAX_CAPTION_CHARS = 2048
_READ_LIMIT = 4 * MAX_CAPTION_CHARS + 16  # UTF-8: at most 4 bytes a character, plus a byte-order mark and blank lines
_UTF8_BOM = b"\xef\xbb\xbf"
_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")


class UnreadableCaption(Exception):
    """A caption file that cannot be used; `reason` says why and how to fix it."""

    def __init__(self, path, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


@dataclass(frozen=True)
class CaptionOptions:
    """Per-subset caption settings (kohya names in brackets).

    shuffle_tags [shuffle_caption], keep_tokens [keep_tokens], keep_tokens_separator
    [keep_tokens_separator, "" = off], tag_separator [caption_separator], caption_dropout
    [caption_dropout_rate], tag_dropout [caption_tag_dropout_rate], class_caption [class_tokens]: the caption
    of an image without a caption file (default: the name part of a kohya `N_name` folder).
    """

    shuffle_tags: bool = False
    keep_tokens: int = 0
    keep_tokens_separator: str = ""
    tag_separator: str = ","
    caption_dropout: float = 0.0
    tag_dropout: float = 0.0
    class_caption: str | None = None

    def __post_init__(self):
        from sdtrain.errors import ConfigError

        if self.keep_tokens < 0:
            raise ConfigError(f"keep_tokens={self.keep_tokens} is negative; use 0 (keep none) or a positive count")
        for name in ("caption_dropout", "tag_dropout"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"{name}={value} is not a probability; use a value from 0.0 to 1.0")
        if not self.tag_separator:
            raise ConfigError('tag_separator is empty; use the character that separates tags, e.g. ","')


def read_caption(path) -> str:
    """First non-empty line of a UTF-8 caption file, stripped, cut to `MAX_CAPTION_CHARS`; raises
    UnreadableCaption."""
    return read_caption_checked(path)[0]


def read_caption_checked(path) -> tuple[str, bool]:
    """`read_caption`, and whether the caption was cut. Only the file's first `_READ_LIMIT` bytes are read."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            data = handle.read(_READ_LIMIT + 1)
    except OSError as exc:
        raise UnreadableCaption(path, f"cannot read caption file ({exc.strerror or exc})") from exc
    more = len(data) > _READ_LIMIT
    data = data[:_READ_LIMIT]
    if data.startswith(_UTF8_BOM):
        data = data[len(_UTF8_BOM):]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        if more and exc.start >= len(data) - 3:  # the read limit split the last character
            text = data[:exc.start].decode("utf-8")
        else:
            hint = " (it starts with a UTF-16 byte-order mark)" if data.startswith(_UTF16_BOMS) else ""
            raise UnreadableCaption(
                path,
                f"caption file is not valid UTF-8 at byte {exc.start}{hint}; re-save it as UTF-8",
            ) from exc
    for line in text.splitlines():
        if line.strip():
            line = line.strip()
            return line[:MAX_CAPTION_CHARS], len(line) > MAX_CAPTION_CHARS
    return "", False


def split_tags(text: str, separator: str) -> list[str]:
    """Tags of `text` split on `separator`, stripped, empty ones removed."""
    return [tag.strip() for tag in text.split(separator) if tag.strip()]


def fixed_and_free_tags(caption: str, options: CaptionOptions) -> tuple[list[str], list[str], list[str]]:
    """(fixed prefix tags, free tags, fixed suffix tags) of a caption under the keep rules."""
    sep = options.keep_tokens_separator
    if sep and sep in caption:
        fixed_part, free_part = caption.split(sep, 1)
        suffix_part = ""
        if sep in free_part:
            free_part, suffix_part = free_part.split(sep, 1)
        return (
            split_tags(fixed_part, options.tag_separator),
            split_tags(free_part, options.tag_separator),
            split_tags(suffix_part, options.tag_separator),
        )
    tags = split_tags(caption, options.tag_separator)
    return tags[: options.keep_tokens], tags[options.keep_tokens:], []


def augment_caption(caption: str, options: CaptionOptions, rng: random.Random) -> str:
    """One training-time version of `caption` (see module docstring for the rules)."""
    if options.caption_dropout > 0 and rng.random() < options.caption_dropout:
        return ""
    if not (options.shuffle_tags or options.tag_dropout > 0):
        return caption
    prefix, free, suffix = fixed_and_free_tags(caption, options)
    if options.shuffle_tags:
        rng.shuffle(free)
    if options.tag_dropout > 0:
        free = [tag for tag in free if rng.random() >= options.tag_dropout]
    return ", ".join(prefix + free + suffix)


def needs_live_encoding(options: CaptionOptions) -> bool:
    """True when captions change per step in ways a text-encoder cache cannot hold.

    Tag shuffling and tag dropout produce too many variants; caption dropout alone does not (the only
    extra variant is "", which `cacheable_captions` adds).
    """
    return options.shuffle_tags or options.tag_dropout > 0


def cacheable_captions(caption: str, options: CaptionOptions) -> list[str]:
    """Every caption text `augment_caption` can produce when `needs_live_encoding` is False."""
    if needs_live_encoding(options):
        raise ValueError("captions with tag shuffling or tag dropout have no finite variant list")
    return [caption, ""] if options.caption_dropout > 0 else [caption]
