"""Caption files and kohya-style caption augmentation."""

import random
from collections import Counter

import pytest

from sdtrain.data.captions import (
    CaptionOptions, UnreadableCaption, augment_caption, cacheable_captions, needs_live_encoding, read_caption,
)
from sdtrain.errors import ConfigError

CAPTION = "alice, red dress, smiling, outdoors, sunny"


def test_read_caption_utf8_bom_and_first_line(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes(b"\xef\xbb\xbf  caf\xc3\xa9, tag \n second line\n")
    assert read_caption(path) == "café, tag"
    path.write_bytes(b"\n  \nfirst real line\nnext\n")
    assert read_caption(path) == "first real line"
    path.write_bytes(b"")
    assert read_caption(path) == ""


def test_invalid_utf8_is_refused_with_reason(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"\xff\xfe bad")
    with pytest.raises(UnreadableCaption) as info:
        read_caption(path)
    assert info.value.path == path
    assert "not valid UTF-8 at byte 0" in info.value.reason and "UTF-16" in info.value.reason
    assert "re-save it as UTF-8" in info.value.reason
    path.write_bytes(b"caf\xe9 latin-1")
    with pytest.raises(UnreadableCaption, match="byte 3"):
        read_caption(path)


def test_no_augmentation_returns_caption_verbatim():
    text = "  odd ,spacing,,kept  "
    assert augment_caption(text, CaptionOptions(keep_tokens=1), random.Random(0)) == text


def test_keep_tokens_fixed_rest_shuffled_and_joined_kohya_style():
    options = CaptionOptions(shuffle_tags=True, keep_tokens=2)
    rng = random.Random(0)
    orders = Counter()
    for _ in range(400):
        tags = augment_caption(CAPTION, options, rng).split(", ")
        assert tags[:2] == ["alice", "red dress"]
        assert sorted(tags[2:]) == sorted(["smiling", "outdoors", "sunny"])
        orders[tuple(tags[2:])] += 1
    assert len(orders) == 6  # all 3! orders of the free tags occur
    assert min(orders.values()) > 30


def test_keep_tokens_separator_fixes_prefix_and_suffix():
    options = CaptionOptions(shuffle_tags=True, keep_tokens=5, keep_tokens_separator="|||")
    caption = "alice, solo ||| red dress, smiling, outdoors ||| masterpiece"
    rng = random.Random(1)
    seen = set()
    for _ in range(100):
        tags = augment_caption(caption, options, rng).split(", ")
        assert tags[:2] == ["alice", "solo"] and tags[-1] == "masterpiece"
        assert sorted(tags[2:-1]) == ["outdoors", "red dress", "smiling"]
        seen.add(tuple(tags[2:-1]))
    assert len(seen) == 6
    # separator absent -> keep_tokens applies
    assert augment_caption("a, b, c", CaptionOptions(shuffle_tags=True, keep_tokens=3,
                                                      keep_tokens_separator="|||"), rng) == "a, b, c"


def test_custom_tag_separator_joined_with_comma_space():
    options = CaptionOptions(shuffle_tags=True, tag_separator=";")
    result = augment_caption("a;b ; c", options, random.Random(0))
    assert sorted(result.split(", ")) == ["a", "b", "c"]


def test_tag_dropout_drops_only_free_tags_at_the_rate():
    options = CaptionOptions(keep_tokens=1, tag_dropout=0.25)
    rng = random.Random(2)
    kept = Counter()
    trials = 2000
    for _ in range(trials):
        tags = augment_caption(CAPTION, options, rng).split(", ")
        assert tags[0] == "alice"
        assert tags[1:] == [t for t in CAPTION.split(", ")[1:] if t in tags[1:]]  # order kept without shuffle
        kept.update(tags[1:])
    for tag in CAPTION.split(", ")[1:]:
        assert abs(kept[tag] / trials - 0.75) < 0.04
    assert augment_caption(CAPTION, CaptionOptions(keep_tokens=1, tag_dropout=1.0), rng) == "alice"


def test_caption_dropout_rate_and_empty_caption():
    options = CaptionOptions(caption_dropout=0.3, shuffle_tags=True)
    rng = random.Random(3)
    results = [augment_caption(CAPTION, options, rng) for _ in range(3000)]
    assert abs(results.count("") / 3000 - 0.3) < 0.03
    assert all(sorted(r.split(", ")) == sorted(CAPTION.split(", ")) for r in results if r)
    assert augment_caption(CAPTION, CaptionOptions(caption_dropout=1.0), rng) == ""


def test_same_rng_seed_same_caption():
    options = CaptionOptions(shuffle_tags=True, tag_dropout=0.3, caption_dropout=0.1)
    first = [augment_caption(CAPTION, options, random.Random(s)) for s in range(20)]
    again = [augment_caption(CAPTION, options, random.Random(s)) for s in range(20)]
    assert first == again and len(set(first)) > 5


def test_live_encoding_rule_and_cacheable_variants():
    assert not needs_live_encoding(CaptionOptions())
    assert not needs_live_encoding(CaptionOptions(caption_dropout=0.5, keep_tokens=2))
    assert needs_live_encoding(CaptionOptions(shuffle_tags=True))
    assert needs_live_encoding(CaptionOptions(tag_dropout=0.1))
    assert cacheable_captions("a, b", CaptionOptions()) == ["a, b"]
    assert cacheable_captions("a, b", CaptionOptions(caption_dropout=0.2)) == ["a, b", ""]
    with pytest.raises(ValueError):
        cacheable_captions("a", CaptionOptions(shuffle_tags=True))


@pytest.mark.parametrize("kwargs", [{"keep_tokens": -1}, {"caption_dropout": 1.5}, {"tag_dropout": -0.1},
                                    {"tag_separator": ""}])
def test_invalid_options_are_config_errors(kwargs):
    with pytest.raises(ConfigError):
        CaptionOptions(**kwargs)
