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


# ---------------------------------------------------------------- prefix, suffix and wildcards


def test_prefix_and_suffix_frame_the_caption_and_survive_keep_tokens():
    options = CaptionOptions(prefix="sks,", suffix=", masterpiece", shuffle_tags=True, keep_tokens=1)
    rng = random.Random(0)
    for _ in range(20):
        tags = augment_caption("a, b, c", options, rng).split(", ")
        assert tags[0] == "sks" and sorted(tags[1:]) == ["a", "b", "c", "masterpiece"]
    assert augment_caption("photo", CaptionOptions(prefix="sks", suffix="end"), rng) == "sks photo end"
    assert augment_caption("photo", CaptionOptions(prefix="sks", caption_dropout=1.0), rng) == ""  # dropped whole


def test_wildcards_pick_a_line_and_an_alternative_per_use():
    options = CaptionOptions(wildcards=True, prefix="sks")
    caption = "a {red|blue|green} car\na {big|small} house, {{literal}}"
    rng = random.Random(1)
    seen = Counter(augment_caption(caption, options, rng) for _ in range(3000))
    expected = {f"sks a {c} car" for c in ("red", "blue", "green")} | {f"sks a {s} house, {{literal}}"
                                                                       for s in ("big", "small")}
    assert set(seen) == expected
    # each line half the time, each alternative evenly within it
    assert sum(n for text, n in seen.items() if text.endswith("car")) == pytest.approx(1500, rel=0.08)
    for colour in ("red", "blue", "green"):
        assert seen[f"sks a {colour} car"] == pytest.approx(500, rel=0.15)
    # the same rng seed replays the same choices; without wildcards the braces stay
    assert [augment_caption(caption, options, random.Random(5)) for _ in range(3)] == \
        [augment_caption(caption, options, random.Random(5))] * 3
    assert augment_caption("a {x|y}", CaptionOptions(), rng) == "a {x|y}"


def test_wildcard_variants_are_what_the_text_encoder_cache_holds():
    options = CaptionOptions(wildcards=True, suffix="end", caption_dropout=0.5)
    caption = "a {red|blue} car\nplain"
    variants = cacheable_captions(caption, options)
    assert variants == ["a red car end", "a blue car end", "plain end", ""]
    rng = random.Random(0)
    assert {augment_caption(caption, options, rng) for _ in range(500)} == set(variants)
    with pytest.raises(ConfigError, match="wildcard variants"):
        cacheable_captions(" ".join(["{a|b}"] * 9), CaptionOptions(wildcards=True))  # 512 variants


def test_wildcard_caption_files_keep_every_line(tmp_path):
    from sdtrain.data.captions import MAX_CAPTION_LINES, read_caption_checked

    path = tmp_path / "a.txt"
    path.write_text("first {a|b}\n\n  second  \nthird\n")
    assert read_caption(path) == "first {a|b}"
    assert read_caption(path, all_lines=True) == "first {a|b}\nsecond\nthird"
    path.write_text("\n".join(f"line {i}" for i in range(MAX_CAPTION_LINES + 5)))
    text, cut = read_caption_checked(path, all_lines=True)
    assert len(text.split("\n")) == MAX_CAPTION_LINES and cut
