"""End to end: `sdtrain train` on the tiny SDXL and SD1.5 models, with DoRA on attention + conv + text encoders."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from sdtrain.cli import main
from sdtrain.config import load_config
from sdtrain.train.loop import Trainer


def make_dataset(folder, count=4, size=64):
    """A learnable dataset: flat-coloured images, one caption each."""
    folder.mkdir(parents=True)
    colours = [(220, 30, 30), (30, 30, 220), (30, 200, 30), (240, 240, 240)]
    names = ["red", "blue", "green", "white"]
    for i in range(count):
        Image.new("RGB", (size, size), colours[i % 4]).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"a {names[i % 4]} square, flat colour")
    return folder


def write_config(tmp_path, arch: str, steps: int = 30, extra: str = "") -> str:
    data = make_dataset(tmp_path / "data")
    text = f"""
[model]
path = "builtin:tiny-{arch}"
[data]
resolution = 64
min_bucket_side = 64
max_bucket_side = 128
num_workers = 0
[[data.subsets]]
path = "{data}"
[network]
type = "dora"
rank = 4
alpha = 4
preset = "full"
train_text_encoder = true
[optimizer]
type = "AdamW8bit"
lr = 3e-3
text_encoder_lr = 1e-3
[train]
max_steps = {steps}
batch_size = 2
mixed_precision = "no"
seed = 1
min_timestep = 500
max_timestep = 700
output_dir = "{tmp_path / 'out'}"
output_name = "e2e"
[sample]
every_n_steps = {steps}
steps = 2
prompts = ["a red square --w 64 --h 64 --d 3"]
[log]
tensorboard = true
log_every_n_steps = 5
{extra}
"""
    path = tmp_path / "config.toml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("arch", ["sdxl", "sd15"])
def test_train_end_to_end(tmp_path, arch):
    cfg = load_config(write_config(tmp_path, arch))
    trainer = Trainer(cfg, quiet=True)
    result = trainer.run()

    # DoRA on attention, conv and every text encoder
    groups = set(trainer.adapters.groups.values())
    assert groups == ({"unet", "te1", "te2"} if arch == "sdxl" else {"unet", "te1"})
    kinds = {type(m).__name__ for m in trainer.adapters.modules.values()}
    assert kinds == {"DoRALinear", "DoRAConv2d"}

    # the loss goes down on a learnable dataset
    losses = result.losses
    assert len(losses) == 30 and all(torch.isfinite(torch.tensor(losses)))
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.8 * first, (first, last)

    # the saved adapter is a real file with the kohya layout and metadata
    path = result.final_adapter
    assert path.exists()
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
        meta = f.metadata()
    assert any(k.endswith(".dora_scale") for k in keys)
    prefix = "lora_te1_" if arch == "sdxl" else "lora_te_"
    assert any(k.startswith(prefix) for k in keys) and any(k.startswith("lora_unet_") for k in keys)
    assert meta["ss_steps"] == "30" and json.loads(meta["ss_network_args"])
    assert result.verify_summary

    # sample PNGs are valid images of the requested size
    pngs = [p for p in result.samples if p.suffix == ".png"]
    assert pngs
    for png in pngs:
        with Image.open(png) as image:
            image.verify()
    with Image.open(pngs[0]) as image:
        assert image.size == (64, 64)

    # the resolved config sits next to the outputs, and TensorBoard got scalars
    assert list((tmp_path / "out").glob("*.resolved.toml"))
    assert list((tmp_path / "out" / "logs").rglob("events.out.tfevents.*"))


def test_saved_adapter_changes_the_model(tmp_path):
    """Loading the trained file into a fresh base changes the UNet output, and reproduces the trained one."""
    from sdtrain.adapters.inject import NetworkSpec, inject_adapters
    from sdtrain.export.adapter_file import apply_adapter_file, load_adapter
    from sdtrain.models.loading import load_base

    cfg = load_config(write_config(tmp_path, "sd15", steps=12, extra=""),
                      ["save.dtype=fp32", "sample.every_n_steps=0", "log.tensorboard=false"])
    trainer = Trainer(cfg, quiet=True)
    result = trainer.run()

    torch.manual_seed(0)
    x = torch.randn(1, 4, 8, 8)
    t = torch.tensor([500])
    cond = torch.randn(1, 77, 32)
    base = load_base("builtin:tiny-sd15")
    with torch.no_grad():
        before = base.unet(x, t, encoder_hidden_states=cond).sample
        adapters = inject_adapters(base.unet, base.text_encoders, "sd15", NetworkSpec.from_config(cfg.network))
        apply_adapter_file(load_adapter(result.final_adapter), adapters)
        after = base.unet(x, t, encoder_hidden_states=cond).sample
        trained = trainer.unet.eval()(x, t, encoder_hidden_states=cond).sample
    assert (after - before).abs().max() > 1e-4
    torch.testing.assert_close(after, trained, rtol=1e-5, atol=1e-5)


def test_config_error_exits_2(tmp_path, capsys):
    path = write_config(tmp_path, "sd15")
    assert main(["train", path, "--set", "network.rnak=4"]) == 2
    err = capsys.readouterr().err
    assert "network.rnak" in err and "network.rank" in err


def test_dry_run_loads_no_weights(tmp_path, capsys, monkeypatch):
    import sdtrain.models.loading as loading

    def fail(*args, **kwargs):
        raise AssertionError("dry run loaded the model")

    monkeypatch.setattr(loading, "load_base", fail)
    path = write_config(tmp_path, "sdxl")
    assert main(["train", path, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "64x64: 4" in out and "30 steps in total" in out
    assert "te2" in out and "trainable params" in out
