"""The scan says what it does not train on: ignored folders (and why), tiny images, overridden repeats;
the dry run shows all of it."""

from sdtrain.cli import main
from sdtrain.data.buckets import Bucketing
from sdtrain.data.dataset import SubsetSpec, scan_dataset
from helpers_data import solid

SMALL = Bucketing(128, min_side=64, max_side=256)


def build_layout(root):
    solid(root / "top.png", (128, 128))
    solid(root / "5_alice" / "a.png", (128, 128))
    solid(root / "5_alice" / "old" / "a_old.png", (128, 128))  # nested in a repeat folder
    solid(root / "extra" / "e1.png", (128, 128))  # not an N_name folder
    solid(root / "extra" / "deeper" / "e2.png", (128, 128))
    solid(root / "0_off" / "z.png", (128, 128))  # repeat count 0
    solid(root / ".thumbs" / "t.png", (128, 128))  # hidden
    (root / "empty").mkdir()  # no images: not worth a word
    solid(root / "5_alice" / "tiny.png", (1, 1))
    solid(root / "5_alice" / "thin.png", (200, 40))


def test_scan_names_every_ignored_folder_and_why(tmp_path):
    root = tmp_path / "train"
    build_layout(root)
    dataset = scan_dataset([SubsetSpec(root)], SMALL)
    assert {r.path.name for r in dataset.records} == {"top.png", "a.png", "tiny.png", "thin.png"}
    ignored = {f.path.relative_to(root).as_posix(): f for f in dataset.ignored}
    assert set(ignored) == {"5_alice/old", "extra", "0_off", ".thumbs"}
    assert ignored["extra"].images == 2 and ignored["5_alice/old"].images == 1
    assert 'not a kohya "N_name" repeat folder' in ignored["extra"].reason and "1_extra" in ignored["extra"].reason
    assert 'nested inside the repeat folder "5_alice"' in ignored["5_alice/old"].reason
    assert "repeat count 0" in ignored["0_off"].reason
    assert "hidden" in ignored[".thumbs"].reason
    summary = dataset.summary()
    for folder in ignored.values():
        assert f"warning: ignored folder {folder.path} ({folder.images} image" in summary

    # a subset folder that is itself a repeat folder: everything below it is nested
    dataset = scan_dataset([SubsetSpec(root / "5_alice")], SMALL)
    assert [f.path.name for f in dataset.ignored] == ["old"]


def test_scan_warns_for_images_below_the_smallest_bucket_side(tmp_path):
    root = tmp_path / "train"
    build_layout(root)
    dataset = scan_dataset([SubsetSpec(root)], SMALL)
    small = {i.path.name: i for i in dataset.small}
    assert set(small) == {"tiny.png", "thin.png"}  # shorter side 1 and 40 px < 64 px; 128x128 images are fine
    assert small["tiny.png"].size == (1, 1) and small["tiny.png"].bucket == (128, 128)
    assert small["tiny.png"].scale == 128
    assert small["thin.png"].scale == small["thin.png"].bucket[1] / 40
    summary = dataset.summary()
    assert "warning: 2 images are smaller than the smallest bucket side (64 px)" in summary
    assert "tiny.png: 1x1 -> bucket 128x128 (128x)" in summary


def test_explicit_repeats_overriding_a_repeat_folder_is_said(tmp_path):
    root = tmp_path / "train"
    build_layout(root)
    dataset = scan_dataset([SubsetSpec(root, repeats=1)], SMALL)
    assert all(r.repeats == 1 for r in dataset.records)
    assert dataset.notes == [f'subset 0: repeats = 1 overrides the 5 repeats of folder "5_alice" ({root / "5_alice"})']
    assert "note: subset 0: repeats = 1 overrides the 5 repeats" in dataset.summary()
    assert scan_dataset([SubsetSpec(root / "5_alice", repeats=3)], SMALL).notes == [
        f'subset 0: repeats = 3 overrides the 5 repeats of folder "5_alice" ({root / "5_alice"})']
    assert scan_dataset([SubsetSpec(root / "5_alice", repeats=5)], SMALL).notes == []  # the same number: no news
    assert scan_dataset([SubsetSpec(root)], SMALL).notes == []


def test_dry_run_shows_the_reports(tmp_path, capsys):
    root = tmp_path / "train"
    build_layout(root)
    config = tmp_path / "c.toml"
    config.write_text(f"""
[model]
path = "builtin:tiny-sdxl"
[data]
resolution = 128
min_bucket_side = 64
max_bucket_side = 256
[[data.subsets]]
path = "{root}"
repeats = 2
[train]
max_steps = 3
mixed_precision = "no"
output_dir = "{tmp_path / 'out'}"
[log]
tensorboard = false
""")
    assert main(["train", str(config), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.count("warning: ignored folder") == 4
    assert out.count("warning: 2 images are smaller than the smallest bucket side") == 1
    assert out.count('note: subset 0: repeats = 2 overrides the 5 repeats of folder "5_alice"') == 1
