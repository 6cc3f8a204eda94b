"""The trainer on awkward data and its data loader: a hostile dataset trains to the end; the latent cache is reused
across runs; loader workers and random crops keep resume bit-exact."""

from __future__ import annotations

from PIL import Image

from helpers_data import build_hostile
from helpers_training import write_config
from sdtrain.cli import main
from sdtrain.config import load_config
from sdtrain.train.loop import Trainer, TrainerCallback


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


def make_wide_dataset(folder, count=4):
    """`count` 96x64 images with a left-to-right gradient: the 64x64 bucket leaves 32 columns to crop from, and
    every crop offset gives other pixels."""
    import numpy as np

    folder.mkdir(parents=True)
    ramp = np.linspace(0, 255, 96, dtype=np.float32)
    for i in range(count):
        array = np.zeros((64, 96, 3), np.uint8)
        array[..., i % 3] = ramp.astype(np.uint8)
        array[..., (i + 1) % 3] = 255 - ramp.astype(np.uint8)
        Image.fromarray(array).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"a gradient, {i}")


class CropLefts(TrainerCallback):
    """The crop-left entry of the SDXL time ids the UNet receives, per micro-batch and sample."""

    def __init__(self):
        self.lefts = []

    def attach(self, trainer):
        def record(module, args, kwargs):
            self.lefts.append(kwargs["added_cond_kwargs"]["time_ids"][:, 3].tolist())

        trainer.base.unet.register_forward_pre_hook(record, with_kwargs=True)


def test_workers_and_random_crop_resume_bit_exact(tmp_path, monkeypatch):
    """Random crops and flips, latents encoded every step (no cache): a run with 2 loader workers stopped mid-epoch
    and resumed equals a straight run with 2 workers, and one loading in the main process, bit for bit. The
    batches load in the 2 worker processes; the crops are drawn anew each time an image is used."""
    import os

    import sdtrain.data.loader as loader
    from helpers_training import adapter_tensors, assert_bitwise_equal, loss_log, run

    make_wide_dataset(tmp_path / "data")
    options = ["data.cache_latents=false", "data.subsets.0.random_crop=true", "train.max_steps=8",
               "save.state_every_n_steps=0", "optimizer.type=AdamW"]
    pids = tmp_path / "pids"
    original = loader.load_batch

    def load_batch(*args, **kwargs):  # runs in the loader's worker processes (forked: they see this patch)
        with open(pids, "a") as handle:
            handle.write(f"{os.getpid()}\n")
        return original(*args, **kwargs)

    monkeypatch.setattr(loader, "load_batch", load_batch)

    def loaded_by():
        found = set(pids.read_text().split())
        pids.unlink()
        return found

    straight = run(write_config(tmp_path, "straight"), options + ["data.num_workers=2"])
    workers = loaded_by()
    assert len(workers) == 2 and str(os.getpid()) not in workers

    cfg = load_config(write_config(tmp_path, "inline"), options + ["data.num_workers=0"])
    lefts = CropLefts()
    inline = Trainer(cfg, quiet=True)
    inline.setup()
    lefts.attach(inline)
    inline.run()
    assert loaded_by() == {str(os.getpid())}
    seen = [left for batch in lefts.lefts for left in batch]
    assert len(set(seen)) >= 4 and all(0 <= left <= 32 for left in seen)  # centred crops: all 16

    config = write_config(tmp_path, "resumed")
    run(config, options + ["data.num_workers=2"], stop_at=3)
    resumed = run(config, options + ["data.num_workers=2"], resume="latest")
    for other in (inline, resumed):
        assert_bitwise_equal(adapter_tensors(straight), adapter_tensors(other))
        assert loss_log(other) == loss_log(straight)
