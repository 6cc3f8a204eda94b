"""Latent and text-encoder caches: reuse across runs, re-encode on change, per-rank splits."""

import shutil

import pytest
import torch
from PIL import Image

from sdtrain.data.buckets import Bucketing
from sdtrain.data.cache import LatentCache, TextEncoderCache, model_fingerprint, vae_fingerprint
from sdtrain.data.dataset import SampleKey, SubsetSpec, latent_items, latent_pixels, scan_dataset
from sdtrain.data.loader import load_sample
from sdtrain.errors import ConfigError

SMALL = Bucketing((128, 64), min_side=64, max_side=128)  # buckets (64, 64), (64, 128), (128, 64)
COLOURS = {"a": (200, 30, 30), "b": (30, 200, 30), "c": (30, 30, 200), "d": (240, 240, 20)}
SIZES = {"a": (48, 48), "b": (48, 48), "c": (97, 40), "d": (97, 40)}  # buckets (64, 64) and (128, 64)


def tiny_vae(seed=0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(block_out_channels=(16, 16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, latent_channels=4,
                         norm_num_groups=8, sample_size=64).eval()


@pytest.fixture(scope="module")
def vae():
    return tiny_vae()


class CountingEncoder:
    """encode_fn for LatentCache: loads pixels, calls the VAE, counts calls and items."""

    def __init__(self, vae):
        self.vae, self.calls, self.items = vae, 0, 0

    def __call__(self, items):
        self.calls += 1
        self.items += len(items)
        pixels = torch.stack([latent_pixels(item) for item in items])
        with torch.no_grad():
            return self.vae.encode(pixels).latent_dist.mean


def write_images(folder, colours=COLOURS):
    folder.mkdir(parents=True, exist_ok=True)
    for name, colour in colours.items():
        Image.new("RGB", SIZES[name], colour).save(folder / f"{name}.png")


_REFERENCE = {}


def reference_latent(vae, colour, bucket):
    """Latent of a uniform image computed without the data pipeline: a constant tensor."""
    key = (id(vae), colour, bucket)
    if key not in _REFERENCE:
        _REFERENCE[key] = _encode_constant(vae, colour, bucket)
    return _REFERENCE[key]


def _encode_constant(vae, colour, bucket):
    pixels = torch.tensor(colour, dtype=torch.float32).view(1, 3, 1, 1) / 127.5 - 1
    with torch.no_grad():
        return vae.encode(pixels.expand(1, 3, bucket[1], bucket[0]).contiguous()).latent_dist.mean[0]


def scan(folder, flip=False):
    return scan_dataset([SubsetSpec(folder, flip=flip)], SMALL)


def test_second_run_encodes_nothing_and_changed_image_is_reencoded(tmp_path, vae):
    data, cache_dir = tmp_path / "data", tmp_path / "cache"
    write_images(data)
    fingerprint = vae_fingerprint(vae)
    items = latent_items(scan(data, flip=True))
    assert len(items) == 8  # 4 images x (plain, flipped)

    first = CountingEncoder(vae)
    latents = LatentCache(cache_dir, fingerprint).get_or_encode(items, first, batch_size=8)
    assert (first.items, first.calls) == (8, 2)  # one call per bucket
    for item, latent in zip(items, latents):
        name = item.path.stem
        assert latent.shape == (4, item.bucket[1] // 8, item.bucket[0] // 8)
        assert torch.allclose(latent, reference_latent(vae, COLOURS[name], item.bucket), atol=2e-3)

    # "second run": fresh scan, fresh cache object, same folder -> no VAE call, same latents
    second = CountingEncoder(vae)
    again = LatentCache(cache_dir, vae_fingerprint(vae)).get_or_encode(latent_items(scan(data, flip=True)), second)
    assert second.calls == 0
    assert all(torch.equal(x, y) for x, y in zip(latents, again))

    # change one image's pixels: only its two entries are encoded again
    Image.new("RGB", SIZES["c"], (10, 10, 10)).save(data / "c.png")
    third = CountingEncoder(vae)
    items = latent_items(scan(data, flip=True))
    fresh = LatentCache(cache_dir, fingerprint).get_or_encode(items, third)
    assert third.items == 2 and third.calls == 1
    for item, latent in zip(items, fresh):
        colour = (10, 10, 10) if item.path.stem == "c" else COLOURS[item.path.stem]
        assert torch.allclose(latent, reference_latent(vae, colour, item.bucket), atol=2e-3)
    assert not list(cache_dir.rglob("*.tmp"))


def test_key_is_content_bucket_flip_and_vae(tmp_path, vae):
    write_images(tmp_path / "one")
    shutil.copytree(tmp_path / "one", tmp_path / "copy")
    cache = LatentCache(tmp_path / "cache", vae_fingerprint(vae))
    counter = CountingEncoder(vae)
    cache.ensure(latent_items(scan(tmp_path / "one")), counter)
    cache.ensure(latent_items(scan(tmp_path / "copy")), counter)  # same bytes elsewhere: reused
    assert counter.items == 4

    other_vae = LatentCache(tmp_path / "cache", vae_fingerprint(tiny_vae(seed=1)))
    assert len(other_vae.missing(latent_items(scan(tmp_path / "one")))) == 4

    item = latent_items(scan(tmp_path / "one"))[0]
    keys = {cache.key(item), cache.key(type(item)(**{**item.__dict__, "flip": True})),
            cache.key(type(item)(**{**item.__dict__, "bucket": (64, 192)})),
            cache.key(type(item)(**{**item.__dict__, "crop_top_left": (0, 1)})),
            cache.key(type(item)(**{**item.__dict__, "content_hash": "0" * 64}))}
    assert len(keys) == 5


def test_rank_split_and_corrupt_entry(tmp_path, vae):
    write_images(tmp_path / "data")
    items = latent_items(scan(tmp_path / "data", flip=True))
    fingerprint = vae_fingerprint(vae)
    world = 3
    counters = [CountingEncoder(vae) for _ in range(world)]
    for rank in range(world):
        LatentCache(tmp_path / "cache", fingerprint).ensure(items[rank::world], counters[rank])
    assert [c.items for c in counters] == [3, 3, 2]
    cache = LatentCache(tmp_path / "cache", fingerprint)
    assert cache.missing(items) == []

    path = cache.store.path(cache.key(items[0]))
    path.write_bytes(path.read_bytes()[:40])  # torn file (e.g. disk full outside our atomic write)
    assert cache.missing(items) == [items[0]]
    counter = CountingEncoder(vae)
    cache.get_or_encode(items, counter)
    assert counter.items == 1


def test_dataset_serves_cached_latents_with_crop_conditioning(tmp_path, vae):
    write_images(tmp_path / "data")
    dataset = scan(tmp_path / "data", flip=True)
    cache = LatentCache(tmp_path / "cache", vae_fingerprint(vae))
    cache.ensure(latent_items(dataset), CountingEncoder(vae))
    flips = set()
    for batch in range(12):
        sample = load_sample(dataset, SampleKey(2, 0, batch, 0), seed=0, latent_cache=cache)  # "c": 97x40 in bucket 128x64 -> resized 155x64, left 13
        flips.add(sample["flipped"])
        left = 13 if not sample["flipped"] else 155 - 128 - 13  # in the flipped image: 14
        assert list(sample["time_ids"]) == [40, 97, 0, left, 64, 128]
        expected = reference_latent(vae, COLOURS["c"], (128, 64))
        assert torch.allclose(sample["latents"], expected, atol=2e-3)
    assert flips == {False, True}

    with pytest.raises(ConfigError, match="random_crop"):
        latent_items(scan_dataset([SubsetSpec(tmp_path / "data", random_crop=True)], SMALL))


def test_fingerprint_tracks_weights_and_config():
    base = vae_fingerprint(tiny_vae(0))
    assert vae_fingerprint(tiny_vae(0)) == base
    changed = tiny_vae(0)
    with torch.no_grad():
        changed.decoder.up_blocks[1].resnets[0].conv1.weight[0, 0, 0, 0] += 0.5
    assert vae_fingerprint(changed) != base
    rescaled = tiny_vae(0)
    rescaled.register_to_config(scaling_factor=0.13025)
    assert vae_fingerprint(rescaled) != base
    assert vae_fingerprint(tiny_vae(0), extra="fp16") != base


def fake_text_encoder(counter):
    """SDXL-shaped outputs that depend on the caption text (stands in for the two CLIP encoders)."""

    def encode(captions):
        counter.append(list(captions))
        codes = torch.tensor([[float(len(c)), float(sum(map(ord, c)) % 97)] for c in captions])
        return {
            "hidden_states_1": codes[:, None, :1].expand(-1, 77, 8).clone(),
            "hidden_states_2": codes[:, None, 1:].expand(-1, 77, 12).clone(),
            "pooled": codes.repeat(1, 6),
        }

    return encode


def test_text_encoder_cache_reuse_dedup_and_fingerprint(tmp_path):
    captions = ["a red circle", "", "a blue square", "a red circle"]
    calls = []
    encode = fake_text_encoder(calls)
    outputs = TextEncoderCache(tmp_path, "te-v1").get_or_encode(captions, encode, batch_size=2)
    assert sum(len(c) for c in calls) == 3  # duplicate caption encoded once
    direct = encode(captions)
    for row, output in enumerate(outputs):
        assert set(output) == {"hidden_states_1", "hidden_states_2", "pooled"}
        for name, tensor in output.items():
            assert torch.equal(tensor, direct[name][row])
    calls.clear()
    TextEncoderCache(tmp_path, "te-v1").get_or_encode(captions, encode)
    assert calls == []
    assert TextEncoderCache(tmp_path, "te-v2").missing(captions) == ["a red circle", "", "a blue square"]


def test_model_fingerprint_of_text_encoders_differs_by_weights():
    torch.manual_seed(0)
    first = torch.nn.Linear(4, 4)
    torch.manual_seed(1)
    second = torch.nn.Linear(4, 4)
    assert model_fingerprint(first) != model_fingerprint(second)
    assert model_fingerprint(first, second) != model_fingerprint(second, first)
