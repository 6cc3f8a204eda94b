"""The data loader: the planned batches of a run, loaded ahead of the steps by `torch.utils.data.DataLoader`.

What a process trains is fixed by the plan (`sdtrain.train.plan`): global batch g is batch g of the continuous
stream of epoch plans, and process r trains its slice of it (`process_slice`). `BatchRequests` is the
DataLoader's sampler over exactly those batches, from a global batch index on; the DataLoader never shuffles
or batches by itself (`batch_size=None`: one request in, one `Batch` out).

A `Batch` is a pure function of (dataset, seed, request): flips, random crops and caption augmentation come
from the sample's own rng (`sdtrain.data.dataset.sample_rng`), latents and text-encoder outputs from their
caches, pixels from the image files. So batches are bitwise the same with 0 or N worker processes, and a
resumed run (a new loader from its global batch on) loads what an uninterrupted one would have.

Workers (`data.num_workers`) read files, decode and augment while the device trains; the main process only
encodes pixels with the VAE when the latent cache is off. On CUDA the DataLoader pins each batch
(`pin_memory`), and `Batch.to` copies it with `non_blocking=True`, so the copy neither waits for the device
nor makes the device wait. One loader iterator serves the whole run (the sampler spans the epochs), so worker
processes start once and `persistent_workers` would buy nothing; `BatchStream` starts a new iterator only
when asked for a batch out of order.

A user error in a worker (an image changed since the scan, a cache entry gone) reaches the main process as
the same `UserError` with its message, not wrapped in the DataLoader's traceback text.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Iterator

import torch
from PIL import Image

from sdtrain.data.buckets import apply_crop, plan_crop, sdxl_time_ids
from sdtrain.data.captions import augment_caption
from sdtrain.data.dataset import (
    PlannedBatches, SampleKey, ScannedDataset, image_to_tensor, latent_item, load_checked, locate_step, sample_rng,
)
from sdtrain.data.masks import load_mask_image, mask_to_tensor
from sdtrain.errors import UserError


@dataclass(frozen=True)
class BatchRequest:
    """One process's slice of global batch `global_index`: its sample keys, and the slot of the first one in
    the global batch (noise and timesteps are seeded by the slot)."""

    global_index: int
    keys: tuple[SampleKey, ...]
    slot_offset: int


@dataclass
class Batch:
    """The tensors of one planned batch (a process's slice of a global batch).

    `latents` (from the latent cache, already scaled) or `pixels` ([-1, 1], encoded by the trainer's VAE);
    `prompt_embeds` / `pooled_embeds` when the text-encoder cache holds the captions' outputs; `time_ids`:
    SDXL's (orig_h, orig_w, crop_top, crop_left, target_h, target_w) per sample; `masks` [b, 1, h, w] in
    [0, 1] when a sample has a loss mask (ones for the others): latent-size from the latent cache, pixel-size
    with `pixels` (the trainer averages them down to the latents' size, `sdtrain.data.masks.to_latent_size`).
    """

    global_index: int
    keys: list[SampleKey]
    slot_offset: int
    captions: list[str]
    time_ids: torch.Tensor
    latents: torch.Tensor | None = None
    pixels: torch.Tensor | None = None
    prompt_embeds: torch.Tensor | None = None
    pooled_embeds: torch.Tensor | None = None
    masks: torch.Tensor | None = None

    @property
    def epoch(self) -> int:
        return self.keys[0].epoch

    def _map_tensors(self, function) -> Batch:
        return replace(self, **{f.name: function(getattr(self, f.name)) for f in fields(self)
                                if isinstance(getattr(self, f.name), torch.Tensor)})

    def pin_memory(self) -> Batch:
        """The batch in page-locked memory (the DataLoader calls this with `pin_memory=True`)."""
        return self._map_tensors(lambda tensor: tensor.pin_memory())

    def to(self, device: torch.device) -> Batch:
        """The batch on `device`; asynchronous from pinned memory (the host does not wait for the copy)."""
        return self._map_tensors(lambda tensor: tensor.to(device, non_blocking=True))


def process_slice(keys: list, processes: int, rank: int) -> tuple[list, int]:
    """Process `rank`'s share of a global batch and the slot of its first sample: contiguous slices of near-equal
    size (a bucket's short last batch with fewer samples than processes repeats its samples so that no process
    idles)."""
    if processes == 1:
        return list(keys), 0
    if len(keys) < processes:
        keys = (list(keys) * processes)[:processes]
    base, extra = divmod(len(keys), processes)
    start = rank * base + min(rank, extra)
    return list(keys[start:start + base + (1 if rank < extra else 0)]), start


class BatchRequests(torch.utils.data.Sampler):
    """The DataLoader's sampler: process `rank`'s `BatchRequest` for global batches [start, stop) of the plan,
    in the plan's order (continuous over epochs)."""

    def __init__(self, dataset: ScannedDataset, global_batch_size: int, seed: int, start: int, stop: int,
                 processes: int = 1, rank: int = 0):
        self.records, self.global_batch_size, self.seed = dataset.records, global_batch_size, seed
        self.start, self.stop, self.processes, self.rank = start, stop, processes, rank

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __iter__(self) -> Iterator[BatchRequest]:
        if self.start >= self.stop:
            return
        global_index = self.start
        epoch, index = locate_step(self.records, self.global_batch_size, self.seed, global_index)
        while True:
            for keys in PlannedBatches(self.records, self.global_batch_size, self.seed, epoch, start_batch=index):
                mine, slot_offset = process_slice(keys, self.processes, self.rank)
                yield BatchRequest(global_index, tuple(mine), slot_offset)
                global_index += 1
                if global_index >= self.stop:
                    return
            epoch, index = epoch + 1, 0


def load_sample(dataset: ScannedDataset, key: SampleKey, seed: int, latent_cache=None, text_cache=None) -> dict:
    """One planned sample as a dict: its flip (`flipped`), crop and caption drawn from `sample_rng(seed, key)` (in
    that order), then `latents` from `latent_cache` or `pixels` from the image file, the loss `mask` (from the
    cache, or cut like the pixels) or None, SDXL's `time_ids`, and text-encoder outputs (`text`) from
    `text_cache`."""
    record = dataset.records[key.record]
    spec = dataset.specs[record.subset_index]
    rng = sample_rng(seed, key)
    flip = spec.flip and rng.random() < 0.5
    if latent_cache is not None:  # the cache holds centred crops only (latent_items refuses random_crop)
        item = latent_item(record, flip)
        latents, mask = latent_cache.load_with_mask(item)
        sample = {"flipped": flip, "latents": latents, "mask": mask}
        crop = item.crop_top_left
    else:
        image = load_checked(record.path, record.content_hash)
        plan = plan_crop(image.size, record.bucket, spec.random_crop, rng, flip)
        sample = {"flipped": flip, "pixels": image_to_tensor(apply_crop(image, plan, record.bucket)), "mask": None}
        if record.mask is not None:  # the image's crop plan, bilinear so that a 0/1 edge does not ring
            mask = load_mask_image(record.mask, record.original_size)
            sample["mask"] = mask_to_tensor(apply_crop(mask, plan, record.bucket, resample=Image.Resampling.BILINEAR))
        crop = (plan.top, plan.left)
    sample["caption"] = augment_caption(record.caption, spec.captions, rng)
    sample["time_ids"] = sdxl_time_ids(record.original_size, crop, record.bucket)
    if text_cache is not None:
        sample["text"] = text_cache.load(sample["caption"])
    return sample


def load_batch(dataset: ScannedDataset, request: BatchRequest, seed: int, latent_cache=None,
               text_cache=None) -> Batch:
    """The tensors of one batch request (see `load_sample`), stacked."""
    samples = [load_sample(dataset, key, seed, latent_cache, text_cache) for key in request.keys]

    def stacked(name, field=None):
        if name not in samples[0]:
            return None
        values = [s[name] if field is None else s[name].get(field) for s in samples]
        return None if values[0] is None else torch.stack(values).float()

    masks = None
    if any(s["mask"] is not None for s in samples):
        shape = next(s["mask"].shape for s in samples if s["mask"] is not None)
        masks = torch.stack([torch.ones(shape) if s["mask"] is None else s["mask"].float() for s in samples])
    return Batch(global_index=request.global_index, keys=list(request.keys), slot_offset=request.slot_offset,
                 captions=[s["caption"] for s in samples],
                 time_ids=torch.tensor([s["time_ids"] for s in samples], dtype=torch.float32),
                 latents=stacked("latents"), pixels=stacked("pixels"),
                 prompt_embeds=stacked("text", "prompt_embeds"), pooled_embeds=stacked("text", "pooled_embeds"),
                 masks=masks)


@dataclass(frozen=True)
class LoadFailure:
    """A user error raised while loading in a worker, carried to the main process to be raised there."""

    error: UserError


class PlannedBatchDataset(torch.utils.data.Dataset):
    """Map-style dataset indexed by `BatchRequest` (from `BatchRequests`): `load_batch` of each."""

    def __init__(self, dataset: ScannedDataset, seed: int, latent_cache=None, text_cache=None):
        self.dataset, self.seed, self.latent_cache, self.text_cache = dataset, seed, latent_cache, text_cache

    def __getitem__(self, request: BatchRequest) -> Batch | LoadFailure:
        try:
            return load_batch(self.dataset, request, self.seed, self.latent_cache, self.text_cache)
        except UserError as error:
            return LoadFailure(error)


def _as_is(item):
    return item


def make_loader(batches: PlannedBatchDataset, requests: BatchRequests, num_workers: int,
                pin_memory: bool) -> torch.utils.data.DataLoader:
    """The DataLoader over `requests`: `num_workers` worker processes (0: in the main process), each batch
    pinned when `pin_memory` (on CUDA). Its own generator seeds the workers: starting an iterator draws from it,
    not from torch's global generator, which a step may use (a resumed run starts its iterator at another step)."""
    return torch.utils.data.DataLoader(batches, batch_size=None, sampler=requests, num_workers=num_workers,
                                       collate_fn=_as_is, pin_memory=pin_memory,
                                       generator=torch.Generator().manual_seed(batches.seed))


class BatchStream:
    """The batches of a run by global batch index, served by one DataLoader iterator while the indices come in
    order (`make_requests(start)`: the sampler from global batch `start` on); asking for another index starts
    a new iterator there."""

    def __init__(self, batches: PlannedBatchDataset, make_requests, num_workers: int, pin_memory: bool):
        self.batches, self.make_requests = batches, make_requests
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.iterator, self.next_index = None, None

    def batch(self, global_index: int) -> Batch:
        if self.iterator is None or global_index != self.next_index:
            self.close()
            loader = make_loader(self.batches, self.make_requests(global_index), self.num_workers, self.pin_memory)
            self.iterator = iter(loader)
        try:
            item = next(self.iterator)
        except StopIteration:
            self.close()
            raise IndexError(f"global batch {global_index} is past the run's last planned batch") from None
        if isinstance(item, LoadFailure):
            self.close()
            raise item.error
        self.next_index = global_index + 1
        return item

    def close(self) -> None:
        """Stop the worker processes (a later `batch` starts new ones): the iterator shuts them down when it
        goes."""
        self.iterator = None
