"""End to end: `sdtrain train` on the tiny SDXL and SD1.5 models, with DoRA on attention + conv + text encoders."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from PIL import Image
from safetensors import safe_open

from helpers_training import write_config
from sdtrain.cli import main
from sdtrain.config import load_config
from sdtrain.train.loop import Trainer


# DoRA on attention, feed-forward and ResNet convolutions and on the text encoders; samples, TensorBoard, verify.
E2E = ["network.preset=full", "network.alpha=4", "network.train_text_encoder=true", "optimizer.lr=3e-3",
       "optimizer.text_encoder_lr=1e-3", "train.batch_size=2", "train.seed=1", "train.min_timestep=500",
       "train.max_timestep=700", "sample.every_n_steps=30", "sample.steps=2",
       'sample.prompts=["a red square --w 64 --h 64 --d 3"]', "log.tensorboard=true", "log.log_every_n_steps=5",
       "data.subsets.0.shuffle_tags=false", "data.subsets.0.caption_dropout=0.0", "data.subsets.0.flip=false",
       'save.targets=["comfyui", "forge"]', "save.dtype=fp16", "save.state_every_n_steps=0"]


def e2e_config(tmp_path, arch: str, steps: int = 30) -> str:
    return write_config(tmp_path, "out", steps=steps, arch=arch)


@pytest.mark.parametrize("arch", ["sdxl", "sd15"])
def test_train_end_to_end(tmp_path, arch):
    cfg = load_config(e2e_config(tmp_path, arch), E2E)
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

    # the resolved config sits next to the outputs; TensorBoard got scalars and the config as hyperparameters
    assert list((tmp_path / "out").glob("*.resolved.toml"))
    assert list((tmp_path / "out" / "logs").rglob("events.out.tfevents.*"))
    (hparams,) = (tmp_path / "out" / "logs").rglob("hparams.yml")
    logged = yaml.safe_load(hparams.read_text())
    assert logged["network.preset"] == "full" and logged["optimizer.text_encoder_lr"] == 1e-3
    assert logged["data.subsets.0.path"] == str(tmp_path / "data") and logged["train.max_steps"] == 30


def test_saved_adapter_changes_the_model(tmp_path):
    """Loading the trained file into a fresh base changes the UNet output, and reproduces the trained one."""
    from sdtrain.adapters.inject import NetworkSpec, inject_adapters
    from sdtrain.export.adapter_file import apply_adapter_file, load_adapter
    from sdtrain.models.loading import load_base

    cfg = load_config(e2e_config(tmp_path, "sd15", steps=12),
                      E2E + ["save.dtype=fp32", "sample.every_n_steps=0", "log.tensorboard=false"])
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
    path = e2e_config(tmp_path, "sd15")
    assert main(["train", path, "--set", "network.rnak=4"]) == 2
    err = capsys.readouterr().err
    assert "network.rnak" in err and "network.rank" in err


def test_dry_run_loads_no_weights(tmp_path, capsys, monkeypatch):
    import sdtrain.models.loading as loading

    def fail(*args, **kwargs):
        raise AssertionError("dry run loaded the model")

    monkeypatch.setattr(loading, "load_base", fail)
    path = e2e_config(tmp_path, "sdxl")
    assert main(["train", path, "--dry-run", *(x for item in E2E for x in ("--set", item))]) == 0
    out = capsys.readouterr().out
    assert "64x64: 4" in out and "30 steps in total" in out
    assert "te2" in out and "trainable params" in out
