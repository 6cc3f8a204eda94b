"""Entries that are named like images or captions but are not plain files, links that lead back into the dataset,
and oversized captions: the scan lists each one with the reason, never blocks on it and never counts an image
twice."""

import os
import threading

import pytest

from helpers_data import solid
from sdtrain.data.buckets import Bucketing
from sdtrain.data.captions import MAX_CAPTION_CHARS, read_caption, read_caption_checked
from sdtrain.data.dataset import SubsetSpec, scan_dataset

BUCKETING = Bucketing(resolution=(64, 64), min_side=64, max_side=128)


def scan(root, **kwargs):
    return scan_dataset([SubsetSpec(root, **kwargs)], BUCKETING)


def reasons(dataset):
    return {s.path.name: s.reason for s in dataset.skipped}


def test_fifo_device_and_looping_links_are_listed_without_blocking(tmp_path):
    root = tmp_path / "set"
    solid(root / "good.png", (64, 64))
    os.mkfifo(root / "pipe.png")
    os.symlink("/dev/zero", root / "zero.png")
    os.symlink(root / "loop_b.png", root / "loop_a.png")
    os.symlink(root / "loop_a.png", root / "loop_b.png")
    os.symlink(root / "missing.png", root / "broken.png")
    (root / "folder.png").mkdir()

    result = {}
    worker = threading.Thread(target=lambda: result.setdefault("dataset", scan(root)), daemon=True)
    worker.start()
    worker.join(60)
    assert "dataset" in result, "the scan blocked (reading a pipe?)"
    dataset = result["dataset"]

    assert [r.path.name for r in dataset.records] == ["good.png"]
    found = reasons(dataset)
    assert "named pipe" in found["pipe.png"]
    assert "device" in found["zero.png"]
    assert "leads nowhere" in found["loop_a.png"] and "leads nowhere" in found["loop_b.png"]
    assert "leads nowhere" in found["broken.png"]
    assert "folder" in found["folder.png"]
    summary = dataset.summary()
    for name in found:
        assert name in summary


def test_caption_that_is_a_pipe_skips_its_image_without_blocking(tmp_path):
    root = tmp_path / "set"
    solid(root / "a.png", (64, 64))
    solid(root / "b.png", (64, 64))
    os.mkfifo(root / "a.txt")
    dataset = scan(root)
    assert [r.path.name for r in dataset.records] == ["b.png"]
    assert "a.png" in reasons(dataset)["a.txt"]


def test_repeat_folder_linking_to_the_subset_counts_images_once(tmp_path):
    root = tmp_path / "set"
    solid(root / "a.png", (64, 64))
    solid(root / "1_inner" / "b.png", (64, 64))
    os.symlink(root, root / "2_loop")
    os.symlink(root / "1_inner", root / "3_again")
    dataset = scan(root)
    assert sorted(r.path.name for r in dataset.records) == ["a.png", "b.png"]
    assert {r.repeats for r in dataset.records} == {1}
    ignored = {f.path.name: f.reason for f in dataset.ignored}
    assert "already searched" in ignored["2_loop"] and "already searched" in ignored["3_again"]


def test_two_links_to_one_image_train_it_once(tmp_path):
    root = tmp_path / "set"
    root.mkdir()
    solid(tmp_path / "elsewhere" / "x.png", (64, 64))
    os.symlink(tmp_path / "elsewhere" / "x.png", root / "one.png")
    os.symlink(tmp_path / "elsewhere" / "x.png", root / "two.png")
    dataset = scan(root)
    assert [r.path.name for r in dataset.records] == ["one.png"]
    assert "one.png" in reasons(dataset)["two.png"]


def test_huge_caption_is_cut_read_in_bounded_bytes_and_reported(tmp_path):
    root = tmp_path / "set"
    solid(root / "big.png", (64, 64))
    (root / "big.txt").write_text("tag, " * 2_000_000)  # 10 MB on one line
    solid(root / "ok.png", (64, 64))
    (root / "ok.txt").write_text("short caption")
    dataset = scan(root)
    big = next(r for r in dataset.records if r.path.name == "big.png")
    assert len(big.caption) == MAX_CAPTION_CHARS and big.caption_cut
    assert not next(r for r in dataset.records if r.path.name == "ok.png").caption_cut
    summary = dataset.summary()
    assert "1 caption is longer than" in summary and "big.txt" in summary


def test_cut_caption_never_splits_a_character(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("é" * (3 * MAX_CAPTION_CHARS) + "\n", encoding="utf-8")
    text, cut = read_caption_checked(path)
    assert cut and text == "é" * MAX_CAPTION_CHARS
    path.write_text("é" * MAX_CAPTION_CHARS, encoding="utf-8")
    assert read_caption_checked(path) == ("é" * MAX_CAPTION_CHARS, False)


def test_invalid_utf8_is_still_refused_within_the_read_limit(tmp_path):
    from sdtrain.data.captions import UnreadableCaption

    path = tmp_path / "bad.txt"
    path.write_bytes(b"ok \xff\xfe broken" + b"x" * 100_000)
    with pytest.raises(UnreadableCaption, match="not valid UTF-8 at byte 3"):
        read_caption(path)
