"""Dataset scanning, the epoch plan, and per-sample loading.

Folders (kohya layout): a subset folder named `N_name` (or each `N_name` folder directly inside a subset
folder) gives its images N repeats and the caption "name" when an image has no caption file. Images directly
in a subset folder not named that way get 1 repeat and no default caption. `SubsetSpec.repeats` and
`CaptionOptions.class_caption`, when set, override the folder's number and name. Folders with 0 repeats,
other sub-folders and hidden files (".name") are not searched.

The scan reports what it did not do silently: every folder holding images it did not search, and why
(`IgnoredFolder`); images smaller than the smallest bucket side, which are upscaled a lot (`SmallImage`); and an
explicit `repeats` that overrides an `N_name` folder's N (`ScannedDataset.notes`). `summary()` shows all of it.

Scanning decodes every image once (so a file that would fail mid-training is found up front) and hashes its
bytes. Unreadable images and unusable caption files are skipped and listed (`SkippedFile`), never fatal;
no trainable image at all raises `DataError` before any model is loaded.

Epoch plan (`epoch_plan`), a pure function of (records, batch_size, seed, epoch):
- every training record appears `repeats` times;
- regularisation records (is_reg) are balanced kohya-style: the epoch gets as many reg samples as training
  samples (T). The reg pool (each reg record `repeats` times) is shuffled once by the seed and read as a
  ring: epoch e takes ring positions e*T .. e*T+T-1. So within an epoch no reg image repeats unless the pool is
  smaller than T (then counts differ by at most 1), and over any number of epochs all reg images are used
  equally to within 1 (kohya instead always uses the same first ones);
- samples are grouped by bucket, shuffled within each bucket, cut into batches of `batch_size` (the last
  batch of a bucket may be smaller unless drop_last), and the batch order is shuffled.
Resuming at (epoch, batch index) replays the same plan and skips the done batches, so a resumed epoch shows
every image exactly as often as an uninterrupted one. Per-sample randomness (flip, random crop, caption
augmentation) is drawn from an rng seeded by (seed, epoch, batch, slot), so it is identical on resume and
independent of the number of loader workers.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import stat
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from sdtrain.data.buckets import Bucketing, Size, apply_crop, plan_crop, sdxl_time_ids
from sdtrain.data.cache import LatentItem
from sdtrain.data.captions import (
    MAX_CAPTION_CHARS, CaptionOptions, UnreadableCaption, augment_caption, cacheable_captions, needs_live_encoding,
    read_caption_checked,
)
from sdtrain.data.images import (
    IMAGE_EXTENSIONS, UnreadableImage, content_hash, decode_image, is_image_file, read_image_bytes,
)
from sdtrain.errors import ConfigError, DataError

REPEAT_FOLDER = re.compile(r"^(\d+)_(.*)$")
_LISTED = 20  # files listed by name in a report; the rest are counted


@dataclass(frozen=True)
class SubsetSpec:
    """One dataset folder and its settings. repeats=None: from the `N_name` folder name (else 1)."""

    path: str | Path
    repeats: int | None = None
    is_reg: bool = False
    caption_extension: str = ".txt"
    captions: CaptionOptions = field(default_factory=CaptionOptions)
    flip: bool = False
    random_crop: bool = False

    def __post_init__(self):
        if self.repeats is not None and self.repeats < 1:
            raise ConfigError(f"subset {self.path}: repeats={self.repeats}; use a whole number >= 1")
        if not self.caption_extension.strip("."):
            raise ConfigError(f"subset {self.path}: caption_extension is empty; use e.g. \".txt\"")

    @property
    def caption_suffix(self) -> str:
        return "." + self.caption_extension.lstrip(".")


@dataclass(frozen=True)
class SkippedFile:
    path: Path
    reason: str


@dataclass(frozen=True)
class IgnoredFolder:
    """A folder with images that the scan does not search; `images` counts them (sub-folders included)."""

    path: Path
    reason: str
    images: int


@dataclass(frozen=True)
class SmallImage:
    """An image whose shorter side is below the smallest bucket side: trained upscaled `scale` times."""

    path: Path
    size: Size
    bucket: Size
    scale: float


@dataclass(frozen=True)
class ImageRecord:
    """One usable image. original_size is (w, h) after EXIF orientation; caption_source: file|folder|none."""

    path: Path
    caption: str
    repeats: int
    is_reg: bool
    original_size: Size
    bucket: Size
    content_hash: str
    subset_index: int = 0
    caption_source: str = "file"
    caption_cut: bool = False  # the caption file's first line was longer than MAX_CAPTION_CHARS


@dataclass(frozen=True)
class ImageFolder:
    """A folder whose images share repeats and default caption."""

    path: Path
    repeats: int
    class_caption: str | None


def subset_folders(spec: SubsetSpec) -> list[ImageFolder]:
    """The folders a subset's images are read from (see module docstring)."""
    root = Path(spec.path)
    if not root.is_dir():
        raise ConfigError(f"dataset folder {root} does not exist or is not a folder; fix the subset path")
    override_caption = spec.captions.class_caption

    def folder(path: Path, repeats: int, name: str | None) -> ImageFolder:
        caption = override_caption if override_caption is not None else name
        return ImageFolder(path, spec.repeats if spec.repeats is not None else repeats, caption)

    match = REPEAT_FOLDER.match(root.name)
    if match:
        return [folder(root, int(match.group(1)), match.group(2))] if int(match.group(1)) > 0 else []
    folders = [folder(root, 1, None)]
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        match = REPEAT_FOLDER.match(sub.name)
        if match and int(match.group(1)) > 0 and not _searched_elsewhere(sub, [f.path for f in folders]):
            folders.append(folder(sub, int(match.group(1)), match.group(2)))
    return folders


def _searched_elsewhere(folder: Path, searched: list[Path]) -> Path | None:
    """The searched folder that `folder` is (through links), if any: its images must not count twice."""
    real = folder.resolve()
    return next((other for other in searched if other != folder and other.resolve() == real), None)


def _count_images(folder: Path) -> int:
    return sum(1 for p in folder.rglob("*") if p.is_file() and is_image_file(p))


def ignored_folders(spec: SubsetSpec) -> list[IgnoredFolder]:
    """Folders inside (or at) a subset's path that hold images the scan does not read, with the reason."""
    root = Path(spec.path)
    searched = [f.path for f in subset_folders(spec)]
    if not searched:  # the subset folder itself is "0_name"
        count = _count_images(root)
        return [IgnoredFolder(root, f'repeat count 0 in its name "{root.name}": not trained on', count)] if count else []
    root_is_repeat = bool(REPEAT_FOLDER.match(root.name))
    ignored = []
    for parent in searched:
        for sub in sorted(p for p in parent.iterdir() if p.is_dir() and p not in searched):
            count = _count_images(sub)
            if not count:
                continue
            match = REPEAT_FOLDER.match(sub.name)
            same = _searched_elsewhere(sub, searched)
            if same is not None:
                reason = f"a link to {same}, which is already searched: its images would count twice"
            elif sub.name.startswith("."):
                reason = "hidden folder: not searched"
            elif parent != root or root_is_repeat:
                reason = (f'nested inside the repeat folder "{parent.name}": only the images directly in a repeat '
                          "folder are trained on; move them up or into a repeat folder of their own")
            elif match:  # "0_name"
                reason = f'repeat count 0 in its name "{sub.name}": not trained on'
            else:
                reason = (f'not a kohya "N_name" repeat folder: only images directly in the subset folder and in '
                          f'"N_name" folders inside it are trained on; rename it (e.g. "1_{sub.name}") or move the '
                          "images up")
            ignored.append(IgnoredFolder(sub, reason, count))
    return ignored


def repeat_overrides(spec: SubsetSpec) -> list[str]:
    """One line per `N_name` folder whose N an explicit `repeats` replaces."""
    if spec.repeats is None:
        return []
    root = Path(spec.path)
    candidates = [root] if REPEAT_FOLDER.match(root.name) else [p for p in root.iterdir() if p.is_dir()]
    lines = []
    for folder in sorted(candidates):
        match = REPEAT_FOLDER.match(folder.name)
        if match and int(match.group(1)) > 0 and int(match.group(1)) != spec.repeats:
            lines.append(f'repeats = {spec.repeats} overrides the {int(match.group(1))} repeats of folder '
                         f'"{folder.name}" ({folder})')
    return lines


def small_images(records: list[ImageRecord], bucketing: Bucketing) -> list[SmallImage]:
    """Images whose shorter side is below the smallest bucket side (they are upscaled to fill their bucket)."""
    smallest = min(min(b) for b in bucketing.buckets)
    found = []
    for r in records:
        width, height = r.original_size
        if min(width, height) < smallest:
            scale = max(r.bucket[0] / width, r.bucket[1] / height)
            found.append(SmallImage(r.path, r.original_size, r.bucket, scale))
    return found


def _scan_image(path: Path, folder: ImageFolder, spec: SubsetSpec, bucketing: Bucketing,
                subset_index: int) -> ImageRecord | SkippedFile:
    caption_path = path.with_suffix(spec.caption_suffix)
    caption_cut = False
    if caption_path.exists() and not caption_path.is_file():
        return SkippedFile(caption_path, f"not a regular file (its image {path.name} was skipped)")
    if caption_path.is_file():
        try:
            (caption, caption_cut), source = read_caption_checked(caption_path), "file"
        except UnreadableCaption as exc:
            return SkippedFile(caption_path, f"{exc.reason} (its image {path.name} was skipped)")
    elif folder.class_caption is not None:
        caption, source = folder.class_caption, "folder"
    else:
        caption, source = "", "none"
    try:
        data = read_image_bytes(path)
        image = decode_image(data, path)
    except UnreadableImage as exc:
        return SkippedFile(path, exc.reason)
    return ImageRecord(
        path=path, caption=caption, repeats=folder.repeats, is_reg=spec.is_reg, original_size=image.size,
        bucket=bucketing.assign(*image.size), content_hash=content_hash(data), subset_index=subset_index,
        caption_source=source, caption_cut=caption_cut,
    )


def scan_subset(spec: SubsetSpec, bucketing: Bucketing | None = None, subset_index: int = 0,
                workers: int | None = None) -> tuple[list[ImageRecord], list[SkippedFile]]:
    """Records of a subset's usable images (sorted by folder, then file name) and its skipped files."""
    bucketing = bucketing or Bucketing()
    jobs, skipped, seen = [], [], {}
    for folder in subset_folders(spec):
        for path in sorted(p for p in folder.path.iterdir() if is_image_file(p)):
            problem = _not_a_regular_file(path)
            if problem:
                skipped.append(SkippedFile(path, problem))
                continue
            real = path.resolve()
            if real in seen:
                skipped.append(SkippedFile(path, f"the same file as {seen[real]} (through a link): used once"))
                continue
            seen[real] = path
            jobs.append((path, folder))
    workers = workers or min(4, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(lambda job: _scan_image(job[0], job[1], spec, bucketing, subset_index), jobs))
    records = [r for r in results if isinstance(r, ImageRecord)]
    skipped.extend(r for r in results if isinstance(r, SkippedFile))
    return records, skipped


def _not_a_regular_file(path: Path) -> str:
    """Why an entry named like an image cannot be read as one (a pipe would block the scan), or ""."""
    try:
        mode = path.stat().st_mode  # follows links
    except OSError as exc:
        if path.is_symlink():
            return f"a link that leads nowhere ({exc.strerror}: broken, or a loop of links)"
        return f"cannot read it ({exc.strerror})"
    if stat.S_ISREG(mode):
        return ""
    if stat.S_ISDIR(mode):
        return "a folder named like an image"
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO), not an image file"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device, not an image file"
    return "not a regular file"


@dataclass
class ScannedDataset:
    """Everything the trainer needs to know about the data, before any model is loaded."""

    specs: list[SubsetSpec]
    bucketing: Bucketing
    records: list[ImageRecord]
    skipped: list[SkippedFile]
    ignored: list[IgnoredFolder] = field(default_factory=list)
    small: list[SmallImage] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def bucket_counts(self, samples: bool = False) -> dict[Size, int]:
        """Images per bucket (or, with samples=True, training samples per epoch: images x repeats)."""
        counts: Counter = Counter()
        for record in self.records:
            counts[record.bucket] += record.repeats if samples else 1
        return dict(sorted(counts.items()))

    def fingerprint(self) -> str:
        """Digest of what the epoch plan depends on (order, content, repeats, buckets, reg flags): store it
        in a checkpoint and compare on resume to detect a dataset that changed in between."""
        digest = hashlib.sha256()
        for r in self.records:
            digest.update(f"{r.content_hash}|{r.repeats}|{r.bucket}|{r.is_reg}|{r.subset_index}\n".encode())
        return digest.hexdigest()[:32]

    def summary(self) -> str:
        """Human-readable table: subsets, buckets, skipped files with reasons."""
        lines = []
        train = [r for r in self.records if not r.is_reg]
        reg = [r for r in self.records if r.is_reg]
        train_samples = sum(r.repeats for r in train)
        lines.append(f"{len(self.records)} images ({len(train)} training, {len(reg)} regularisation); "
                     f"{train_samples} training samples per epoch"
                     + (f" + {train_samples} regularisation samples" if reg else ""))
        for index, spec in enumerate(self.specs):
            records = [r for r in self.records if r.subset_index == index]
            repeats = sorted({r.repeats for r in records})
            uncaptioned = sum(r.caption_source == "none" for r in records)
            lines.append(f"  subset {index}: {spec.path}: {len(records)} images, repeats {repeats or '-'}"
                         + (", regularisation" if spec.is_reg else "")
                         + (f", {uncaptioned} without caption" if uncaptioned else ""))
        lines.append("buckets (width x height: images, samples per epoch):")
        samples = self.bucket_counts(samples=True)
        for bucket, images in self.bucket_counts().items():
            lines.append(f"  {bucket[0]}x{bucket[1]}: {images}, {samples[bucket]}")
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)} files:")
            lines.extend(f"  {s.path}: {s.reason}" for s in self.skipped)
        for folder in self.ignored:
            lines.append(f"warning: ignored folder {folder.path} ({folder.images} image"
                         f"{'s' if folder.images != 1 else ''}): {folder.reason}")
        if self.small:
            smallest = min(min(b) for b in self.bucketing.buckets)
            lines.append(f"warning: {len(self.small)} image{'s are' if len(self.small) != 1 else ' is'} smaller than "
                         f"the smallest bucket side ({smallest} px) and upscaled a lot; use larger images or remove "
                         "them:")
            shown = self.small[:_LISTED]
            lines.extend(f"  {i.path}: {i.size[0]}x{i.size[1]} -> bucket {i.bucket[0]}x{i.bucket[1]} "
                         f"({i.scale:.3g}x)" for i in shown)
            if len(self.small) > len(shown):
                lines.append(f"  ... and {len(self.small) - len(shown)} more")
        cut = [r for r in self.records if r.caption_cut]
        if cut:
            lines.append(f"warning: {len(cut)} caption{'s are' if len(cut) != 1 else ' is'} longer than "
                         f"{MAX_CAPTION_CHARS} characters and cut there (the text encoders read a few hundred at "
                         "most):")
            lines.extend(f"  {r.path.with_suffix(self.specs[r.subset_index].caption_suffix)}" for r in cut[:_LISTED])
            if len(cut) > _LISTED:
                lines.append(f"  ... and {len(cut) - _LISTED} more")
        lines.extend(f"note: {text}" for text in self.notes)
        return "\n".join(lines)


def scan_dataset(specs: list[SubsetSpec], bucketing: Bucketing | None = None,
                 workers: int | None = None) -> ScannedDataset:
    """Scan all subsets; DataError when there is no usable training image."""
    bucketing = bucketing or Bucketing()
    if not specs:
        raise DataError("no dataset subsets are configured; add at least one subset folder with images")
    records, skipped, ignored, notes = [], [], [], []
    for index, spec in enumerate(specs):
        found, bad = scan_subset(spec, bucketing, index, workers)
        records.extend(found)
        skipped.extend(bad)
        ignored.extend(ignored_folders(spec))
        notes.extend(f"subset {index}: {line}" for line in repeat_overrides(spec))
    if not any(not r.is_reg for r in records):
        raise DataError(_empty_dataset_message(specs, records, skipped, ignored))
    return ScannedDataset(list(specs), bucketing, records, skipped, ignored, small_images(records, bucketing), notes)


def _empty_dataset_message(specs, records, skipped, ignored=()) -> str:
    searched = []
    for spec in specs:
        if not spec.is_reg:
            searched.extend(str(f.path) for f in subset_folders(spec))
    lines = ["no usable training images found."]
    lines.append("searched (training subsets): " + (", ".join(searched) or "none (all subsets are is_reg)"))
    lines.append(f"accepted image extensions: {' '.join(IMAGE_EXTENSIONS)} (any case); caption files share "
                 f"the image's name with the subset's caption extension")
    if records:
        lines.append(f"found {len(records)} regularisation images but no training images")
    if skipped:
        lines.append(f"skipped {len(skipped)} files:")
        lines.extend(f"  {s.path}: {s.reason}" for s in skipped[:_LISTED])
        if len(skipped) > _LISTED:
            lines.append(f"  ... and {len(skipped) - _LISTED} more")
    lines.extend(f"ignored folder {f.path} ({f.images} images): {f.reason}" for f in ignored)
    lines.append("fix: put images directly in a subset folder or in kohya repeat folders inside it "
                 "(e.g. 10_alice/), and fix or remove the skipped files")
    return "\n".join(lines)


# ---------------------------------------------------------------- epoch plan


def _reg_pool(records: list[ImageRecord], seed: int) -> list[int]:
    """Reg record indices, each `repeats` times, shuffled once by the seed (the ring epochs read from)."""
    pool = [i for i, r in enumerate(records) if r.is_reg for _ in range(r.repeats)]
    random.Random(f"sdtrain-reg:{seed}").shuffle(pool)
    return pool


def _reg_window(pool: list[int], count: int, epoch: int) -> list[int]:
    return [pool[(epoch * count + j) % len(pool)] for j in range(count)] if pool else []


def epoch_plan(records: list[ImageRecord], batch_size: int, seed: int, epoch: int,
               drop_last: bool = False) -> list[list[int]]:
    """Batches of record indices for one epoch (see module docstring); deterministic in (seed, epoch)."""
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size}; use a whole number >= 1")
    samples = [i for i, r in enumerate(records) if not r.is_reg for _ in range(r.repeats)]
    samples += _reg_window(_reg_pool(records, seed), len(samples), epoch)
    by_bucket: dict[Size, list[int]] = defaultdict(list)
    for index in samples:
        by_bucket[records[index].bucket].append(index)
    rng = random.Random(f"sdtrain-epoch:{seed}:{epoch}")
    batches = []
    for bucket in sorted(by_bucket):
        members = by_bucket[bucket]
        rng.shuffle(members)
        for start in range(0, len(members), batch_size):
            batch = members[start:start + batch_size]
            if len(batch) == batch_size or not drop_last:
                batches.append(batch)
    rng.shuffle(batches)
    return batches


def steps_per_epoch(records: list[ImageRecord], batch_size: int, seed: int = 0, epoch: int = 0,
                    drop_last: bool = False) -> int:
    """Number of batches in an epoch (the same for every epoch unless reg images span several buckets)."""
    return len(epoch_plan(records, batch_size, seed, epoch, drop_last))


def locate_step(records: list[ImageRecord], batch_size: int, seed: int, step: int,
                drop_last: bool = False) -> tuple[int, int]:
    """(epoch, batch index) of the `step`-th batch counted from the start of training (0-based)."""
    epoch = 0
    while True:
        count = steps_per_epoch(records, batch_size, seed, epoch, drop_last)
        if count == 0:
            raise DataError("the epoch plan is empty (drop_last with batch_size larger than every bucket); "
                            "lower batch_size or turn drop_last off")
        if step < count:
            return epoch, step
        step -= count
        epoch += 1


# ---------------------------------------------------------------- per-sample loading


@dataclass(frozen=True)
class SampleKey:
    """Which record to load, and where in the plan it sits (seeds its randomness)."""

    record: int
    epoch: int
    batch: int
    slot: int


def sample_rng(seed: int, key: SampleKey) -> random.Random:
    return random.Random(f"sdtrain-sample:{seed}:{key.epoch}:{key.batch}:{key.slot}")


class PlannedBatches:
    """Batch sampler for torch DataLoader: one epoch of the plan, optionally from a batch index (resume)."""

    def __init__(self, records: list[ImageRecord], batch_size: int, seed: int, epoch: int,
                 start_batch: int = 0, drop_last: bool = False):
        self.epoch = epoch
        self.start_batch = start_batch
        self.plan = epoch_plan(records, batch_size, seed, epoch, drop_last)

    def __iter__(self):
        for batch_index in range(self.start_batch, len(self.plan)):
            yield [SampleKey(record, self.epoch, batch_index, slot)
                   for slot, record in enumerate(self.plan[batch_index])]

    def __len__(self) -> int:
        return max(0, len(self.plan) - self.start_batch)


def image_to_tensor(image) -> torch.Tensor:
    """8-bit RGB PIL image -> float32 (3, H, W) in [-1, 1]."""
    array = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())
    return array.permute(2, 0, 1).float() / 127.5 - 1.0


def load_checked(path: Path, expected_hash: str):
    """Decode an image and check it is still the file that was scanned; DataError otherwise."""
    try:
        data = read_image_bytes(path)
        if content_hash(data) != expected_hash:
            raise DataError(f"{path} changed after the dataset was scanned; restart training to rescan it")
        return decode_image(data, path)
    except UnreadableImage as exc:
        raise DataError(f"{path} became unreadable after the dataset was scanned ({exc.reason}); "
                        f"restore or remove it and restart") from exc


def latent_item(record: ImageRecord, flip: bool) -> LatentItem:
    plan = plan_crop(record.original_size, record.bucket, flip=flip)
    return LatentItem(record.path, record.content_hash, record.original_size, record.bucket, flip,
                      (plan.top, plan.left))


def latent_items(dataset: ScannedDataset) -> list[LatentItem]:
    """Every latent the cache must hold (both flips for subsets with flip); refuses random crops."""
    items = []
    for spec in dataset.specs:
        if spec.random_crop:
            raise ConfigError(f"subset {spec.path}: random_crop cannot be used with the latent cache (cached "
                              f"latents have a fixed crop); turn off random_crop or the latent cache")
    for record in dataset.records:
        items.append(latent_item(record, False))
        if dataset.specs[record.subset_index].flip:
            items.append(latent_item(record, True))
    return items


def latent_pixels(item: LatentItem) -> torch.Tensor:
    """The (3, H, W) [-1, 1] pixels a latent item encodes."""
    image = load_checked(item.path, item.content_hash)
    plan = plan_crop(image.size, item.bucket, flip=item.flip)
    return image_to_tensor(apply_crop(image, plan, item.bucket))


def captions_to_cache(dataset: ScannedDataset) -> list[str]:
    """Unique caption texts a text-encoder cache must hold; ConfigError if a subset needs live encoding."""
    for spec in dataset.specs:
        if needs_live_encoding(spec.captions):
            raise ConfigError(f"subset {spec.path}: shuffle_tags / tag_dropout change captions every step, so "
                              f"text-encoder outputs cannot be cached; turn those off or turn off the "
                              f"text-encoder cache (train or run the text encoders live)")
    texts = {}
    for record in dataset.records:
        for text in cacheable_captions(record.caption, dataset.specs[record.subset_index].captions):
            texts.setdefault(text, None)
    return list(texts)


class ImageDataset(torch.utils.data.Dataset):
    """Map-style dataset indexed by SampleKey (use with PlannedBatches as batch_sampler, collate_samples).

    Each sample is a dict: pixel_values (3, H, W) in [-1, 1] -- or latents from `latent_cache` --, caption
    (augmented), time_ids (SDXL add_time_ids, 6 floats), is_reg, record, flipped.
    """

    def __init__(self, dataset: ScannedDataset, seed: int, latent_cache=None):
        self.dataset = dataset
        self.seed = seed
        self.latent_cache = latent_cache
        if latent_cache is not None:
            latent_items(dataset)  # refuses random crops

    def __len__(self) -> int:
        return len(self.dataset.records)

    def __getitem__(self, key: SampleKey) -> dict:
        record = self.dataset.records[key.record]
        spec = self.dataset.specs[record.subset_index]
        rng = sample_rng(self.seed, key)
        flip = spec.flip and rng.random() < 0.5
        sample = {"is_reg": record.is_reg, "record": key.record, "flipped": flip}
        if self.latent_cache is not None:
            item = latent_item(record, flip)
            sample["latents"] = self.latent_cache.load(item)
            crop, original_size = item.crop_top_left, record.original_size
        else:
            image = load_checked(record.path, record.content_hash)
            plan = plan_crop(image.size, record.bucket, spec.random_crop, rng, flip)
            sample["pixel_values"] = image_to_tensor(apply_crop(image, plan, record.bucket))
            crop, original_size = (plan.top, plan.left), image.size
        sample["caption"] = augment_caption(record.caption, spec.captions, rng)
        sample["time_ids"] = torch.tensor(sdxl_time_ids(original_size, crop, record.bucket), dtype=torch.float32)
        return sample


def collate_samples(samples: list[dict]) -> dict:
    """Stack a bucket-homogeneous list of samples into a batch dict (tensors stacked, captions a list)."""
    batch = {
        "captions": [s["caption"] for s in samples],
        "time_ids": torch.stack([s["time_ids"] for s in samples]),
        "is_reg": torch.tensor([s["is_reg"] for s in samples]),
        "records": [s["record"] for s in samples],
        "flipped": [s["flipped"] for s in samples],
    }
    for name in ("pixel_values", "latents"):
        if name in samples[0]:
            batch[name] = torch.stack([s[name] for s in samples])
    return batch
