"""The shapes world (scripts/shapes_dataset.py), the demo dataset and config, and what the pretrained tiny base
and a short demo run do on held-out captions."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo.toml"


def load_script(name: str):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


shapes = load_script("shapes_dataset")


# ---------------------------------------------------------------------------------------------------- generator

def test_generator_is_deterministic_from_its_seed():
    first = [shapes.pretraining_scene(0, i) for i in range(40)]
    again = [shapes.pretraining_scene(0, i) for i in range(40)]
    other = [shapes.pretraining_scene(1, i) for i in range(40)]
    assert first == again
    assert [s.caption for s in first] != [s.caption for s in other]
    for a, b in zip(first[:5], again[:5]):
        assert np.array_equal(np.asarray(shapes.render(a)), np.asarray(shapes.render(b)))


def test_pretraining_stream_covers_the_world_and_holds_out_what_it_should():
    scenes = [shapes.pretraining_scene(0, i) for i in range(600)]
    objects = [o for s in scenes for o in s.objects]
    assert {o.kind for o in objects} == set(shapes.SHAPES)  # never a star
    assert {o.colour for o in objects} == set(shapes.COLOURS)
    assert {(s.width, s.height) for s in scenes} == set(shapes.BUCKETS)
    assert not any((o.colour, o.kind, s.background) in shapes.HELD_OUT for s in scenes for o in s.objects)
    captions = [s.caption for s in scenes]
    assert any(c.startswith("two ") for c in captions) and any(" above " in c for c in captions)


def test_captions_say_what_is_drawn():
    scene = shapes.held_out_scenes()[1]  # a red square on a white background, centred
    assert scene.caption == "a red square on a white background"
    pixels = np.asarray(shapes.render(scene)).astype(int)
    assert (pixels[32, 32] == shapes.COLOURS["red"]).all() and (pixels[2, 2] == shapes.COLOURS["white"]).all()


def test_demo_dataset_is_the_committed_output_of_the_generator(tmp_path):
    from sdtrain.data.buckets import Bucketing
    from sdtrain.data.dataset import SubsetSpec, scan_dataset

    shapes.write_demo_dataset(tmp_path / "demo")
    committed = REPO / "datasets" / "demo"
    names = sorted(p.relative_to(committed) for p in committed.rglob("*") if p.is_file())
    assert names == sorted(p.relative_to(tmp_path / "demo") for p in (tmp_path / "demo").rglob("*") if p.is_file())
    for name in names:  # PNG bytes depend on the zlib build, so images are compared by pixels
        ours, fresh = committed / name, tmp_path / "demo" / name
        if name.suffix == ".png":
            assert np.array_equal(np.asarray(Image.open(ours)), np.asarray(Image.open(fresh))), name
        else:
            assert ours.read_bytes() == fresh.read_bytes(), name
    assert sum((committed / n).stat().st_size for n in names) < 100_000

    dataset = scan_dataset([SubsetSpec(committed)], Bucketing((64, 128), min_side=64, max_side=128))
    assert len(dataset.records) == 16 and not dataset.skipped
    assert all(r.repeats == 4 and " star " in r.caption for r in dataset.records)
    assert len(dataset.bucket_counts()) == 3  # the three aspect ratios the base model knows


# ---------------------------------------------------------------------------------------------------- models

@pytest.fixture(scope="module")
def sdxl_base():
    from sdtrain.models.loading import load_base

    return load_base("builtin:tiny-sdxl")


def base_loss(base, scenes) -> float:
    return shapes.denoising_loss(base.arch, base.unet, base.vae, base.text_encoders, base.tokenizers,
                                 base.noise_scheduler, scenes)


def test_pretrained_base_denoises_held_out_captions_better_than_random(sdxl_base):
    from sdtrain.models.loading import load_base

    scenes = shapes.held_out_scenes()
    random_base = load_base("builtin:tiny-sdxl-random")
    assert base_loss(sdxl_base, scenes) < 0.5 * base_loss(random_base, scenes)


def test_pretrained_base_draws_held_out_colours(sdxl_base):
    """A held-out combination (black triangles never appear on orange in pretraining) comes out as a black object
    on an orange-to-yellow background. (Not every held-out combination does yet: the red square on white comes
    out orange-red on white, see docs/tiny-models.md.)"""
    import tempfile

    from sdtrain.train.sampling import sample_images

    with tempfile.TemporaryDirectory() as tmp:
        paths = sample_images("sdxl", unet=sdxl_base.unet, vae=sdxl_base.vae, text_encoders=sdxl_base.text_encoders,
                              tokenizers=sdxl_base.tokenizers, scheduler_config=sdxl_base.noise_scheduler.config,
                              prompts=[{"prompt": "a black triangle on an orange background", "width": 64,
                                        "height": 64, "seed": 0, "cfg": 5.0, "steps": 12}],
                              sampler="euler", out_dir=tmp, step=0)
        pixels = np.asarray(Image.open(paths[0]).convert("RGB")).astype(float)
    centre, corner = pixels[26:38, 26:38].mean(axis=(0, 1)), pixels[:6, :6].mean(axis=(0, 1))
    assert centre.max() < 60, centre  # black (measured: 29, 11, 3)
    assert corner[0] > 200 and corner[2] < 80, corner  # orange to yellow (measured: 247, 202, 30)


# ---------------------------------------------------------------------------------------------------- demo run

def test_demo_config_teaches_the_pretrained_base():
    from sdtrain.config import load_config

    cfg = load_config(DEMO)
    assert cfg.model.path == "builtin:tiny-sdxl"
    assert Path(cfg.data.subsets[0].path).resolve() == (REPO / "datasets" / "demo").resolve()


def test_short_demo_run_lowers_the_held_out_loss_on_the_new_concept(tmp_path, sdxl_base):
    from sdtrain.config import load_config
    from sdtrain.export.adapter_file import load_adapter
    from sdtrain.export.merge import merge_into_base
    from sdtrain.models.loading import load_base
    from sdtrain.train.loop import train

    held_out = shapes.demo_held_out_scenes()
    before = base_loss(sdxl_base, held_out)
    cfg = load_config(DEMO, [f"train.output_dir={tmp_path.as_posix()}", "train.max_steps=20", "sample.every_n_steps=0",
                             "save.targets=[]", "log.tensorboard=false", "optimizer.lr=5e-3"])
    result = train(cfg, quiet=True)
    trained = load_base("builtin:tiny-sdxl")
    merge_into_base(load_adapter(result.final_adapter), trained)
    after = base_loss(trained, held_out)
    assert after < 0.995 * before, (before, after)  # measured: 0.0949 -> 0.0940 (-1.0 %)
