"""Dataset scanning (hostile files, kohya repeat folders), the epoch plan, resume and batch loading."""

import math
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from sdtrain.data.buckets import Bucketing
from sdtrain.data.captions import CaptionOptions
from sdtrain.data.dataset import (
    PlannedBatches, SampleKey, SubsetSpec, captions_to_cache, epoch_plan, locate_step, scan_dataset, scan_subset,
    steps_per_epoch,
)
from sdtrain.data.loader import BatchRequests, PlannedBatchDataset, load_sample, make_loader
from helpers_data import build_hostile, save, solid, to_unit
from sdtrain.errors import ConfigError, DataError

SMALL = Bucketing(128, min_side=64, max_side=256)  # buckets (64,192) (64,256) (128,128) (192,64) (256,64)


def load_all(dataset, seed=0, batch_size=2):
    """The batches of the first epoch, through the trainer's data loader."""
    batches = len(list(PlannedBatches(dataset.records, batch_size, seed, 0)))
    requests = BatchRequests(dataset, batch_size, seed, 0, batches)
    return list(make_loader(PlannedBatchDataset(dataset, seed), requests, num_workers=0, pin_memory=False))


def test_hostile_dataset_scans_loads_and_batches(tmp_path):
    good, bad = build_hostile(tmp_path / "data" / "3_hostile")
    dataset = scan_dataset([SubsetSpec(tmp_path / "data")], SMALL)

    assert {r.path.name for r in dataset.records} == good
    assert {s.path.name for s in dataset.skipped} == bad
    reasons = {s.path.name: s.reason for s in dataset.skipped}
    assert "empty file" in reasons["zero.png"]
    assert "truncated" in reasons["corrupt.png"] or "corrupt" in reasons["corrupt.png"]
    assert "UTF-8" in reasons["badcap.txt"] and "badcap.png was skipped" in reasons["badcap.txt"]
    summary = dataset.summary()
    for name in bad:
        assert name in summary

    by_name = {r.path.name: r for r in dataset.records}
    assert by_name["rotated.jpg"].original_size == (32, 64)  # EXIF applied: now portrait
    assert by_name["rotated.jpg"].bucket == (64, 192)
    assert by_name["tiny.png"].bucket == (128, 128)
    assert by_name["good.png"].caption == "a good red image"
    assert by_name["cmyk.jpg"].caption == "hostile" and by_name["cmyk.jpg"].caption_source == "folder"
    assert all(r.repeats == 3 for r in dataset.records)

    expected_colour = {
        "good.png": (200, 30, 30),
        "cmyk.jpg": tuple((255 - v) * (255 - 40) / 255 for v in (30, 150, 220)),
        "deep.png": (200, 200, 200),
        "tiny.png": (9, 99, 199),
    }
    seen = Counter()
    for batch in load_all(dataset):
        pixels = batch.pixels
        assert pixels.dtype == torch.float32 and pixels.shape[1] == 3
        for row, index in enumerate(key.record for key in batch.keys):
            record = dataset.records[index]
            seen[record.path.name] += 1
            image = pixels[row]
            assert tuple(image.shape[1:]) == (record.bucket[1], record.bucket[0])
            assert batch.captions[row] == record.caption
            name = record.path.name
            if name in expected_colour:
                assert (image - to_unit(expected_colour[name])).abs().max() < 0.07, name
            elif name == "rotated.jpg":  # resized 96 x 192, centre crop left 16: top half red, bottom blue
                assert (image[:, 8:88] - to_unit((255, 0, 0))).abs().mean() < 0.05
                assert (image[:, 104:184] - to_unit((0, 0, 255))).abs().mean() < 0.05
                assert batch.time_ids[row].tolist() == [64, 32, 0, 16, 192, 64]
            elif name == "rgba.png":  # 128 x 128: left green, right (was transparent) white
                assert (image[:, :, 4:56] - to_unit((0, 160, 0))).abs().max() < 0.05
                assert (image[:, :, 72:124] - 1.0).abs().max() < 0.01
    assert seen == {name: 3 for name in good}


def test_empty_dataset_error_names_folders_extensions_and_skips(tmp_path):
    folder = tmp_path / "10_broken"
    folder.mkdir()
    (folder / "zero.png").write_bytes(b"")
    (folder / "readme.txt").write_text("hi")
    with pytest.raises(DataError) as info:
        scan_dataset([SubsetSpec(folder)], SMALL)
    message = str(info.value)
    assert str(folder) in message and ".png" in message and ".webp" in message
    assert "zero.png: empty file" in message and "10_alice" in message

    with pytest.raises(ConfigError, match="does not exist"):
        scan_dataset([SubsetSpec(tmp_path / "nope")], SMALL)

    reg_only = tmp_path / "reg"
    solid(reg_only / "r.png", (64, 64))
    with pytest.raises(DataError, match="regularisation images but no training images"):
        scan_dataset([SubsetSpec(reg_only, is_reg=True)], SMALL)


def test_kohya_repeat_folders_and_captions(tmp_path):
    root = tmp_path / "train"
    solid(root / "plain.png", (64, 64))
    (root / "plain.txt").write_text("plain caption")
    solid(root / "5_alice" / "a1.png", (64, 64))
    solid(root / "5_alice" / "a2.png", (64, 64))
    (root / "5_alice" / "a2.txt").write_text("alice in a hat")
    (root / "5_alice" / "a2.caption").write_text("alice, hat")
    solid(root / "2_bob smith" / "b1.png", (64, 64))
    solid(root / "0_disabled" / "d.png", (64, 64))
    solid(root / "other" / "o.png", (64, 64))

    records, skipped = scan_subset(SubsetSpec(root), SMALL)
    assert not skipped
    got = {r.path.name: (r.repeats, r.caption, r.caption_source) for r in records}
    assert got == {
        "plain.png": (1, "plain caption", "file"),
        "a1.png": (5, "alice", "folder"),
        "a2.png": (5, "alice in a hat", "file"),
        "b1.png": (2, "bob smith", "folder"),
    }

    records, _ = scan_subset(SubsetSpec(root / "5_alice", caption_extension="caption"), SMALL)
    assert {r.path.name: (r.repeats, r.caption) for r in records} == {"a1.png": (5, "alice"),
                                                                     "a2.png": (5, "alice, hat")}
    override = SubsetSpec(root, repeats=3, captions=CaptionOptions(class_caption="person"))
    records, _ = scan_subset(override, SMALL)
    assert {r.path.name: (r.repeats, r.caption) for r in records} == {
        "plain.png": (3, "plain caption"), "a1.png": (3, "person"), "a2.png": (3, "alice in a hat"),
        "b1.png": (3, "person")}


def make_records(tmp_path, layout, is_reg=False, name="train"):
    """layout: list of (repeats, (w, h), count). Returns the scanned records."""
    root = tmp_path / name
    for group, (repeats, size, count) in enumerate(layout):
        for i in range(count):
            solid(root / f"{repeats}_g{group}" / f"img{i}.png", size, (i * 20 % 255, group * 40, 90))
    return SubsetSpec(root, is_reg=is_reg)


def plan_fixture(tmp_path):
    spec = make_records(tmp_path, [(3, (64, 64), 5), (2, (128, 64), 4), (1, (64, 160), 3)])
    return scan_dataset([spec], SMALL).records


def test_epoch_plan_counts_buckets_and_determinism(tmp_path):
    records = plan_fixture(tmp_path)
    plan = epoch_plan(records, batch_size=4, seed=7, epoch=0)
    counts = Counter(i for batch in plan for i in batch)
    assert counts == {i: r.repeats for i, r in enumerate(records)}
    for batch in plan:
        assert 1 <= len(batch) <= 4 and len({records[i].bucket for i in batch}) == 1
    samples_per_bucket = Counter()
    for r in records:
        samples_per_bucket[r.bucket] += r.repeats
    assert len(plan) == sum(math.ceil(n / 4) for n in samples_per_bucket.values())
    assert steps_per_epoch(records, 4) == len(plan)
    assert len(epoch_plan(records, 4, 7, 0, drop_last=True)) == sum(n // 4 for n in samples_per_bucket.values())

    assert plan == epoch_plan(records, 4, 7, 0)
    assert plan != epoch_plan(records, 4, 7, 1) and plan != epoch_plan(records, 4, 8, 0)


def test_resume_mid_epoch_sees_every_image_as_often_as_uninterrupted(tmp_path):
    records = plan_fixture(tmp_path)
    before = PlannedBatches(records, 3, seed=1, epoch=2)
    done = []
    for batch_index, keys in enumerate(before):
        if batch_index == 4:
            break  # "crash" after 4 batches
        done.extend(k.record for k in keys)
    # a new process rescans and resumes at (epoch 2, batch 4); the dataset fingerprint says nothing changed
    first_scan = scan_dataset([SubsetSpec(tmp_path / "train")], SMALL)
    rescan = scan_dataset([SubsetSpec(tmp_path / "train")], SMALL)
    assert rescan.fingerprint() == first_scan.fingerprint()
    rescanned = rescan.records
    after = PlannedBatches(rescanned, 3, seed=1, epoch=2, start_batch=4)
    assert len(after) == len(before) - 4
    resumed = [k.record for keys in after for k in keys]
    assert Counter(done + resumed) == {i: r.repeats for i, r in enumerate(records)}
    first_key = next(iter(after))[0]
    assert (first_key.epoch, first_key.batch, first_key.slot) == (2, 4, 0)

    solid(records[0].path, (64, 64), (1, 2, 3))
    assert scan_dataset([SubsetSpec(tmp_path / "train")], SMALL).fingerprint() != first_scan.fingerprint()

    per_epoch = steps_per_epoch(records, 3)
    assert locate_step(records, 3, 1, 2 * per_epoch + 4) == (2, 4)
    assert locate_step(records, 3, 1, 0) == (0, 0)


def test_regularisation_balanced_and_rotated_over_epochs(tmp_path):
    train = make_records(tmp_path, [(2, (64, 64), 3)])                       # T = 6 samples per epoch
    reg = make_records(tmp_path, [(1, (64, 64), 4)], is_reg=True, name="reg")  # 4 reg samples per pass
    dataset = scan_dataset([train, reg], SMALL)
    records = dataset.records
    reg_indices = [i for i, r in enumerate(records) if r.is_reg]
    totals = Counter()
    for epoch in range(2):
        plan = epoch_plan(records, 4, seed=3, epoch=epoch)
        counts = Counter(i for batch in plan for i in batch)
        assert sum(counts[i] for i in reg_indices) == 6  # as many reg as training samples
        assert all(counts[i] == 2 for i, r in enumerate(records) if not r.is_reg)
        totals.update({i: counts[i] for i in reg_indices})
    assert totals == {i: 3 for i in reg_indices}  # 12 reg samples over 2 epochs = 3 full passes

    big_reg = make_records(tmp_path, [(1, (64, 64), 10)], is_reg=True, name="bigreg")
    records = scan_dataset([train, big_reg], SMALL).records
    reg_indices = [i for i, r in enumerate(records) if r.is_reg]
    totals = Counter()
    for epoch in range(5):
        counts = Counter(i for batch in epoch_plan(records, 4, 3, epoch) for i in batch)
        assert all(counts[i] <= 1 for i in reg_indices)  # more reg than needed: no repeats within an epoch
        totals.update({i: counts[i] for i in reg_indices})
    assert totals == {i: 3 for i in reg_indices}  # 30 samples over 5 epochs = 3 passes of 10


def test_sample_randomness_is_keyed_by_plan_position(tmp_path):
    root = tmp_path / "flip"
    array = np.zeros((64, 64, 3), np.uint8)
    array[:, :32] = 255
    save(root / "half.png", Image.fromarray(array))
    (root / "half.txt").write_text("a, b, c, d")
    spec = SubsetSpec(root, repeats=40, flip=True, captions=CaptionOptions(shuffle_tags=True))
    dataset = scan_dataset([spec], SMALL)
    flips = []
    for batch_index in range(40):
        key = SampleKey(0, 0, batch_index, 0)
        sample = load_sample(dataset, key, seed=5)
        again = load_sample(dataset, key, seed=5)
        assert torch.equal(sample["pixels"], again["pixels"]) and sample["caption"] == again["caption"]
        left_is_white = sample["pixels"][:, :, :50].mean() > 0.9
        assert left_is_white != sample["flipped"]
        left = sample["time_ids"][3]
        assert left == 0  # square image, square bucket: nothing cropped either way
        flips.append(sample["flipped"])
    assert 8 < sum(flips) < 32
    with pytest.raises(ConfigError, match="cannot be cached"):
        captions_to_cache(dataset)


def test_captions_to_cache_includes_empty_for_caption_dropout(tmp_path):
    spec = make_records(tmp_path, [(1, (64, 64), 2)])
    spec = SubsetSpec(spec.path, captions=CaptionOptions(caption_dropout=0.1))
    dataset = scan_dataset([spec], SMALL)
    assert sorted(captions_to_cache(dataset)) == ["", "g0"]


def test_changed_file_after_scan_is_a_data_error(tmp_path):
    root = tmp_path / "c"
    solid(root / "x.png", (64, 64))
    dataset = scan_dataset([SubsetSpec(root)], SMALL)
    solid(root / "x.png", (64, 64), (1, 2, 3))
    with pytest.raises(DataError, match="changed after the dataset was scanned"):
        load_sample(dataset, SampleKey(0, 0, 0, 0), seed=0)
