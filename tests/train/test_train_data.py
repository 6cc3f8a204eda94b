"""The trainer on awkward data: a hostile dataset trains to the end; the latent cache is reused across runs."""

from __future__ import annotations

from PIL import Image

from helpers_data import build_hostile
from helpers_training import write_config
from sdtrain.cli import main
from sdtrain.config import load_config
from sdtrain.train.loop import Trainer


def test_hostile_dataset_trains_to_the_end(tmp_path, capsys):
    good, bad = build_hostile(tmp_path / "data")
    config = write_config(tmp_path, "hostile", steps=4)
    assert main(["train", config, "--set", "data.subsets.0.class_caption=hostile"]) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "hostile" / "run.safetensors").is_file()
    # listed at the end, with reasons
    tail = out.rsplit("skipped 3 unreadable files", 1)[1]
    for name in bad:
        assert name in tail
    for name in good:
        assert name not in tail


def test_second_run_encodes_nothing_and_changed_image_is_reencoded(tmp_path, monkeypatch):
    import sdtrain.train.batches as batches

    config = write_config(tmp_path, "cache", steps=1)
    encoded = []
    original = batches.encode_pixels
    monkeypatch.setattr(batches, "encode_pixels", lambda vae, pixels: encoded.append(len(pixels)) or original(vae, pixels))

    def encodes(name):
        encoded.clear()
        Trainer(load_config(config, [f"train.output_dir={tmp_path / name}"]), quiet=True).run()
        return sum(encoded)

    assert encodes("first") == 8  # 4 images, each plain and flipped
    assert encodes("second") == 0
    Image.new("RGB", (64, 64), (1, 2, 3)).save(tmp_path / "data" / "img0.png")
    assert encodes("third") == 2
