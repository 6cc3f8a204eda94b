"""kohya sd-scripts names read as sdtrain's config keys.

Options: kohya's option names (`network_dim = 8`) are accepted as top-level keys of a config and in `--set`
(`--set network_dim=8`); each is moved to its sdtrain key (`network.rank`), its value converted where kohya's
meaning differs (`resolution = "512,512"`, `save_precision = "float"`, `v_parameterization = true`), and one
note per option says where it went. Caption options (`shuffle_caption`, `keep_tokens`, `flip_aug`, ...) apply
to every subset that does not set its own value, like kohya's command-line values under a dataset config.

Dataset configs (`sdtrain train CONFIG --dataset-config FILE.toml`): kohya's `[general]`, `[[datasets]]` and
`[[datasets.subsets]]` tables become `data.subsets` plus the dataset-wide keys (resolution, bucket sides,
batch size). As in kohya, a subset's value wins over its dataset's, which wins over `[general]`; keys the file
leaves out take CONFIG's values (so sdtrain's defaults, not kohya's: captions `.txt`, buckets on). Relative
`image_dir` paths are read from the dataset file's folder. A kohya key sdtrain has no equivalent of is accepted
only at kohya's default value (a note says it was ignored); any other value is an error naming the key.

Loss masks: kohya's `masked_loss = true` reads the masks of a dataset config's `conditioning_data_dir` (one image
per training image, same name; kohya reads its red channel, sdtrain its grey level: the same for black-and-white
masks) as `data.subsets.N.mask_path`; `alpha_mask` (an option for every subset, or a subset key) is sdtrain's
`alpha_mask`. kohya multiplies the loss by the mask and averages over the whole image, so a config that brings masks
through these names also gets `train.normalize_masked_loss = false` unless it sets that key itself.

Kohya facts from kohya-ss/sd-scripts `library/config_util.py` and `train_util.py` (commit 0253472; the masked
loss: `apply_masked_loss`, `train_network.py` and `config_util.py` at commit 48d368f); the network options
(`network_dropout`, `network_args`) from `networks/lora.py` (commit 48d368f).
"""

from __future__ import annotations

import ast
import os
from collections.abc import Callable
from dataclasses import dataclass

from sdtrain.errors import ConfigError
from sdtrain.train.optim import OPTIMIZER_TYPES

SUBSETS = "data.subsets.*."  # an option with this prefix is set on every subset


def _same(value):
    return value


def _resolution(value):
    """kohya's `resolution`: "512" or "512,768" (width,height) as text, or a number / [w, h]."""
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(",")]
        try:
            sides = [int(p) for p in parts]
        except ValueError:
            raise ConfigError(f'kohya resolution "{value}" is not "SIDE" or "WIDTH,HEIGHT" (e.g. "512,512")') from None
        if len(sides) not in (1, 2):
            raise ConfigError(f'kohya resolution "{value}" has {len(sides)} numbers; write "SIDE" or "WIDTH,HEIGHT"')
        return sides[0] if len(sides) == 1 else sides
    if isinstance(value, (list, tuple)) and len(value) == 1:
        return value[0]
    return value


def _precision(value):
    """kohya's `save_precision` says "float" for fp32."""
    return {"float": "fp32", "fp32": "fp32", "float32": "fp32", "fp16": "fp16", "bf16": "bf16"}.get(value, value)


def _v_parameterization(value):
    """kohya trains v-prediction with `v_parameterization = true`, epsilon otherwise (it never reads the model)."""
    if isinstance(value, bool):
        return "v_prediction" if value else "epsilon"
    return value


def _optimizer_type(value):
    """kohya matches optimizer names case-insensitively."""
    if isinstance(value, str):
        for name in OPTIMIZER_TYPES:
            if name.lower() == value.lower():
                return name
    return value


def _optimizer_args(value):
    """kohya's `optimizer_args = ["weight_decay=0.1", "betas=0.9,0.99"]`: Python literals after `=`."""
    if isinstance(value, dict):
        return value
    if isinstance(value, str):
        value = value.split()
    if not isinstance(value, (list, tuple)):
        return value
    args = {}
    for item in value:
        key, sep, text = str(item).partition("=")
        if not sep or not key.strip():
            raise ConfigError(f'kohya optimizer_args entry "{item}" is not key=value (e.g. "weight_decay=0.1")')
        try:
            parsed = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError):
            parsed = text.strip()
        args[key.strip()] = list(parsed) if isinstance(parsed, tuple) else parsed
    return args


_SAMPLERS = {"k_euler_a": "euler_a", "euler_a": "euler_a", "k_euler": "euler", "euler": "euler", "ddim": "ddim",
             "dpmsolver++": "dpmpp_2m", "k_dpmpp_2m": "dpmpp_2m", "dpmpp_2m": "dpmpp_2m"}


def _sampler(value):
    return _SAMPLERS.get(value, value) if isinstance(value, str) else value


@dataclass(frozen=True)
class KohyaOption:
    """Where a kohya option goes: an sdtrain dotted key (`SUBSETS` prefix: every subset) and a value converter."""

    key: str
    convert: Callable = _same

    @property
    def subset_wide(self) -> bool:
        return self.key.startswith(SUBSETS)

    @property
    def shown_key(self) -> str:
        return self.key.replace(".*.", ".N.")


OPTIONS: dict[str, KohyaOption] = {
    "pretrained_model_name_or_path": KohyaOption("model.path"),
    "v_parameterization": KohyaOption("model.prediction_type", _v_parameterization),
    "clip_skip": KohyaOption("model.clip_skip"),
    "network_dim": KohyaOption("network.rank"),
    "network_alpha": KohyaOption("network.alpha"),
    "network_dropout": KohyaOption("network.dropout"),
    "conv_dim": KohyaOption("network.conv_rank"),
    "conv_alpha": KohyaOption("network.conv_alpha"),
    "learning_rate": KohyaOption("optimizer.lr"),
    "unet_lr": KohyaOption("optimizer.unet_lr"),
    "text_encoder_lr": KohyaOption("optimizer.text_encoder_lr"),
    "optimizer_type": KohyaOption("optimizer.type", _optimizer_type),
    "optimizer_args": KohyaOption("optimizer.args", _optimizer_args),
    "lr_scheduler": KohyaOption("scheduler.type"),
    "lr_warmup_steps": KohyaOption("scheduler.warmup_steps"),
    "lr_scheduler_num_cycles": KohyaOption("scheduler.num_cycles"),
    "lr_scheduler_power": KohyaOption("scheduler.power"),
    "max_train_steps": KohyaOption("train.max_steps"),
    "max_train_epochs": KohyaOption("train.epochs"),
    "train_batch_size": KohyaOption("train.batch_size"),
    "gradient_accumulation_steps": KohyaOption("train.gradient_accumulation_steps"),
    "gradient_checkpointing": KohyaOption("train.gradient_checkpointing"),
    "max_grad_norm": KohyaOption("train.max_grad_norm"),
    "mixed_precision": KohyaOption("train.mixed_precision"),
    "seed": KohyaOption("train.seed"),
    "noise_offset": KohyaOption("train.noise_offset"),
    "min_snr_gamma": KohyaOption("train.min_snr_gamma"),
    "debiased_estimation_loss": KohyaOption("train.debiased_estimation_loss"),
    "scale_v_pred_loss_like_noise_pred": KohyaOption("train.scale_v_pred_loss_like_noise_pred"),
    "prior_loss_weight": KohyaOption("train.prior_loss_weight"),
    "multires_noise_iterations": KohyaOption("train.multires_noise_iterations"),
    "multires_noise_discount": KohyaOption("train.multires_noise_discount"),
    "ip_noise_gamma": KohyaOption("train.ip_noise_gamma"),
    "zero_terminal_snr": KohyaOption("train.zero_terminal_snr"),
    "min_timestep": KohyaOption("train.min_timestep"),
    "max_timestep": KohyaOption("train.max_timestep"),
    "max_token_length": KohyaOption("model.max_token_length"),
    "output_dir": KohyaOption("train.output_dir"),
    "output_name": KohyaOption("train.output_name"),
    "save_every_n_steps": KohyaOption("save.every_n_steps"),
    "save_every_n_epochs": KohyaOption("save.every_n_epochs"),
    "save_precision": KohyaOption("save.dtype", _precision),
    "sample_every_n_steps": KohyaOption("sample.every_n_steps"),
    "sample_sampler": KohyaOption("sample.sampler", _sampler),
    "logging_dir": KohyaOption("log.log_dir"),
    "resolution": KohyaOption("data.resolution", _resolution),
    "caption_extension": KohyaOption("data.caption_extension"),
    "min_bucket_reso": KohyaOption("data.min_bucket_side"),
    "max_bucket_reso": KohyaOption("data.max_bucket_side"),
    "bucket_reso_steps": KohyaOption("data.bucket_step"),
    "bucket_no_upscale": KohyaOption("data.no_upscale"),
    "cache_latents": KohyaOption("data.cache_latents"),
    "cache_text_encoder_outputs": KohyaOption("data.cache_text_encoder_outputs"),
    "max_data_loader_n_workers": KohyaOption("data.num_workers"),
    "shuffle_caption": KohyaOption(SUBSETS + "shuffle_tags"),
    "keep_tokens": KohyaOption(SUBSETS + "keep_tokens"),
    "keep_tokens_separator": KohyaOption(SUBSETS + "keep_tokens_separator"),
    "caption_separator": KohyaOption(SUBSETS + "tag_separator"),
    "flip_aug": KohyaOption(SUBSETS + "flip"),
    "random_crop": KohyaOption(SUBSETS + "random_crop"),
    "caption_dropout_rate": KohyaOption(SUBSETS + "caption_dropout"),
    "caption_tag_dropout_rate": KohyaOption(SUBSETS + "tag_dropout"),
    "caption_prefix": KohyaOption(SUBSETS + "caption_prefix"),
    "caption_suffix": KohyaOption(SUBSETS + "caption_suffix"),
    "enable_wildcard": KohyaOption(SUBSETS + "wildcards"),
    "alpha_mask": KohyaOption(SUBSETS + "alpha_mask"),
}
MASKED_LOSS = "masked_loss"  # kohya's switch for the masks of conditioning_data_dir: see take_options

# `network_args = ["rank_dropout=0.1", ...]` entries read as sdtrain keys (networks/lora.py create_network).
NETWORK_ARGS: dict[str, str] = {
    "rank_dropout": "network.rank_dropout",
    "module_dropout": "network.module_dropout",
    "conv_dim": "network.conv_rank",
    "conv_alpha": "network.conv_alpha",
}
_BLOCK_ARGS = ("block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas", "down_lr_weight",
               "mid_lr_weight", "up_lr_weight", "block_lr_zero_threshold")

# kohya names with no one-to-one key, for "did you mean" only.
SUGGESTIONS = {name: option.shown_key for name, option in OPTIONS.items()} | NETWORK_ARGS | {
    name: "network.blocks" for name in _BLOCK_ARGS} | {
    "network_module": "network.type",
    MASKED_LOSS: "train.normalize_masked_loss",
    "enable_bucket": "data.min_bucket_side",
    "image_dir": "data.subsets.N.path",
    "num_repeats": "data.subsets.N.repeats",
    "class_tokens": "data.subsets.N.class_caption",
    "is_reg": "data.subsets.N.is_reg",
}


def read_option(name: str, value) -> tuple[KohyaOption, object]:
    """The option `name` and its value converted to sdtrain's meaning."""
    option = OPTIONS[name]
    return option, option.convert(value)


def _show(value) -> str:
    from sdtrain.config.dump import toml_value

    try:
        return toml_value(value)
    except TypeError:
        return repr(value)


def option_note(name: str, option: KohyaOption, raw, value, where: str, override: bool = False) -> str:
    """One line: where a kohya option went (`override`: a --set, which sets every subset's value)."""
    converted = "" if value == raw else f" (kohya {_show(raw)})"
    every = (" on every subset" + ("" if override else " that does not set it")) if option.subset_wide else ""
    return f"{where}: kohya option {name} read as {option.shown_key} = {_show(value)}{converted}{every}"


def _section(data: dict, name: str, where: str) -> dict:
    table = data.setdefault(name, {})
    if not isinstance(table, dict):
        raise ConfigError(f"'{name}' in {where} must be a table ([{name}]), got {_show(table)}")
    return table


def take_options(data: dict, source: str, notes: list[str], origins: dict[str, str]) -> dict[str, tuple]:
    """Move the kohya options at the top level of a raw config to their sdtrain keys (in place).

    Returns the caption options meant for every subset, {subset key: (value, where)}, to be applied with
    `apply_subset_defaults` once the subsets are known. Setting both a kohya name and its sdtrain key fails.
    """
    subset_defaults: dict[str, tuple] = {}
    if MASKED_LOSS in data:
        _take_masked_loss(data, data.pop(MASKED_LOSS), source, notes, origins)
    if "network_args" in data:
        _take_network_args(data, data.pop("network_args"), source, notes, origins)
    for name in [n for n in data if n in OPTIONS]:
        raw = data.pop(name)
        option, value = read_option(name, raw)
        where = f"{source} (kohya {name})"
        notes.append(option_note(name, option, raw, value, source))
        if option.subset_wide:
            subset_defaults[option.key[len(SUBSETS):]] = (value, where)
            continue
        section, key = option.key.split(".")
        table = _section(data, section, source)
        if key in table:
            raise ConfigError(f"{source} sets both {name} (kohya's name for {option.key}) and {option.key}; "
                              "keep one of them")
        table[key] = value
        origins[option.key] = where
    return subset_defaults


def _take_masked_loss(data: dict, value, source: str, notes: list[str], origins: dict[str, str]) -> None:
    """kohya's `masked_loss`: true weighs the loss by the masks (of conditioning_data_dir, or alpha masks) and
    averages over the whole image, i.e. train.normalize_masked_loss = false; false changes nothing here."""
    if not isinstance(value, bool):
        raise ConfigError(f"{source}: kohya masked_loss must be true or false, got {_show(value)}")
    if not value:
        notes.append(f"{source}: kohya masked_loss = false ignored (without it kohya reads no conditioning_data_dir "
                     "masks; alpha masks still apply)")
        return
    table = _section(data, "train", source)
    if "normalize_masked_loss" in table:
        raise ConfigError(f"{source} sets both masked_loss (kohya's masked loss, read as "
                          "train.normalize_masked_loss = false) and train.normalize_masked_loss; keep one of them")
    table["normalize_masked_loss"] = False
    origins["train.normalize_masked_loss"] = f"{source} (kohya {MASKED_LOSS})"
    notes.append(f"{source}: kohya masked_loss = true read as train.normalize_masked_loss = false (loss x mask "
                 "averaged over the whole image, as kohya); a dataset config's conditioning_data_dir is read as the "
                 "subset's mask_path")


def masked_loss_on(origins: dict[str, str]) -> bool:
    """Whether kohya's masked_loss = true was read (take_options) into the config these origins describe."""
    return origins.get("train.normalize_masked_loss", "").endswith(f"(kohya {MASKED_LOSS})")


def match_kohya_mask_weighting(data: dict, source: str, notes: list[str], origins: dict[str, str]) -> None:
    """Masks brought by kohya names (alpha_mask, conditioning_data_dir) are weighted as kohya weighs them:
    train.normalize_masked_loss = false, unless the config sets that key itself."""
    subsets = data.get("data", {}).get("subsets") if isinstance(data.get("data"), dict) else None
    if not isinstance(subsets, list):
        return
    kohya_masks = [f"data.subsets.{i}.{key}" for i, subset in enumerate(subsets) if isinstance(subset, dict)
                   for key in ("alpha_mask", "mask_path")
                   if subset.get(key) and _from_kohya_name(origins.get(f"data.subsets.{i}.{key}", ""))]
    train = data.get("train") if isinstance(data.get("train"), dict) else {}
    if not kohya_masks or "normalize_masked_loss" in train:
        return
    _section(data, "train", source)["normalize_masked_loss"] = False
    origins["train.normalize_masked_loss"] = f"kohya's masked loss ({origins[kohya_masks[0]]})"
    notes.append(f"{source}: loss masks from kohya names ({', '.join(kohya_masks)}) are weighted as kohya does: "
                 "train.normalize_masked_loss = false (loss x mask averaged over the whole image); set "
                 "train.normalize_masked_loss = true to average over each mask instead")


def _from_kohya_name(origin: str) -> bool:
    return "(kohya " in origin or origin.startswith("--set alpha_mask=")


def _take_network_args(data: dict, raw, source: str, notes: list[str], origins: dict[str, str]) -> None:
    """kohya's `network_args` list: the entries with an sdtrain key go there; any other is an error."""
    args = _optimizer_args(raw)
    if not isinstance(args, dict):
        raise ConfigError(f'{source}: kohya network_args must be a list of "key=value" strings, got {_show(raw)}')
    for name, value in args.items():
        key = NETWORK_ARGS.get(name)
        if key is None:
            hint = ("write per-block ranks and learning rates as [[network.blocks]] tables (pattern, rank, alpha, "
                    "lr)" if name in _BLOCK_ARGS else "remove it")
            raise ConfigError(f"{source}: kohya network_args entry {name} = {_show(value)} has no sdtrain "
                              f"equivalent; {hint}")
        table = _section(data, "network", source)
        field_name = key.split(".")[1]
        if field_name in table:
            raise ConfigError(f"{source} sets both network_args {name} (kohya's name for {key}) and {key}; "
                              "keep one of them")
        table[field_name] = value
        origins[key] = f"{source} (kohya network_args {name})"
        notes.append(f"{source}: kohya network_args {name} read as {key} = {_show(value)}")


def apply_subset_defaults(data: dict, defaults: dict[str, tuple], origins: dict[str, str]) -> None:
    """Give every `[[data.subsets]]` table the kohya caption options it does not set itself."""
    subsets = data.get("data", {}).get("subsets") if isinstance(data.get("data"), dict) else None
    if not defaults or not isinstance(subsets, list):
        return
    for index, subset in enumerate(subsets):
        if not isinstance(subset, dict):
            continue
        for key, (value, where) in defaults.items():
            if key == "alpha_mask" and subset.get("mask_path"):
                continue  # kohya's subsets with conditioning_data_dir masks have no alpha masks
            if key not in subset:
                subset[key] = value
                origins[f"data.subsets.{index}.{key}"] = where


def override_paths(option: KohyaOption, data: dict) -> list[list[str]]:
    """The sdtrain key path(s) `--set NAME=value` sets for a kohya option (a caption option: every subset)."""
    if not option.subset_wide:
        return [option.key.split(".")]
    subsets = data.get("data", {}).get("subsets") if isinstance(data.get("data"), dict) else None
    count = len(subsets) if isinstance(subsets, list) else 0
    return [["data", "subsets", str(i), option.key[len(SUBSETS):]] for i in range(count)]


# ---------------------------------------------------------------- dataset configs

_SUBSET_KEYS = {  # kohya subset key -> sdtrain subset key
    "image_dir": "path",
    "num_repeats": "repeats",
    "is_reg": "is_reg",
    "class_tokens": "class_caption",
    "caption_extension": "caption_extension",
    "shuffle_caption": "shuffle_tags",
    "keep_tokens": "keep_tokens",
    "keep_tokens_separator": "keep_tokens_separator",
    "caption_separator": "tag_separator",
    "flip_aug": "flip",
    "random_crop": "random_crop",
    "caption_dropout_rate": "caption_dropout",
    "caption_tag_dropout_rate": "tag_dropout",
    "caption_prefix": "caption_prefix",
    "caption_suffix": "caption_suffix",
    "enable_wildcard": "wildcards",
    "alpha_mask": "alpha_mask",
    "conditioning_data_dir": "mask_path",
}
_DISTINCT_SUBSET_KEYS = ("image_dir", "is_reg", "alpha_mask", "conditioning_data_dir")  # never from [general]
_DATASET_KEYS = {  # kohya dataset key -> sdtrain dotted key
    "resolution": "data.resolution",
    "batch_size": "train.batch_size",
    "min_bucket_reso": "data.min_bucket_side",
    "max_bucket_reso": "data.max_bucket_side",
    "bucket_reso_steps": "data.bucket_step",
    "bucket_no_upscale": "data.no_upscale",
    "prior_loss_weight": "train.prior_loss_weight",
}
# kohya keys sdtrain has no equivalent of, with kohya's default: accepted (and ignored) only at that value.
_KOHYA_DEFAULTS = {
    "color_aug": False, "face_crop_aug_range": None,
    "caption_dropout_every_n_epochs": 0, "token_warmup_min": 1, "token_warmup_step": 0,
    "secondary_separator": None, "network_multiplier": 1.0,
}
_ANY_VALUE = {"cache_info": "sdtrain scans every image itself", "debug_dataset": "sdtrain has --dry-run"}
_REFUSED = {
    "metadata_file": "fine-tuning datasets (metadata files) are not supported; use image folders with caption files",
}


def _check_table(table, where: str, allowed: set[str]) -> dict:
    if not isinstance(table, dict):
        raise ConfigError(f"{where} must be a table, got {_show(table)}")
    for key in table:
        if key in _REFUSED:
            raise ConfigError(f"{where}: {key}: {_REFUSED[key]}")
        if key not in allowed and key not in _KOHYA_DEFAULTS and key not in _ANY_VALUE:
            accepted = sorted(allowed | set(_KOHYA_DEFAULTS) | set(_ANY_VALUE))
            raise ConfigError(f"{where}: unknown kohya dataset key '{key}'; keys accepted here: {', '.join(accepted)}")
    return table


def _pick(key: str, tables: list[tuple[dict, str]]):
    """kohya's fallback: the first table (subset, dataset, general) that sets `key`: (value, where) or None."""
    for table, where in tables:
        if table.get(key) is not None:
            return table[key], where
    return None


def read_dataset_config(path, notes: list[str], masked_loss: bool = False) -> tuple[dict, dict[str, str]]:
    """A kohya dataset config as a raw sdtrain fragment {"data": {...}, "train": {...}} and its origins.
    `masked_loss`: whether the training config has kohya's masked_loss = true (needed for conditioning_data_dir)."""
    from sdtrain.config.load import display_path, read_toml

    source = display_path(path)
    folder = os.path.dirname(os.path.abspath(path))
    raw = read_toml(os.fspath(path))
    subset_allowed, dataset_allowed = set(_SUBSET_KEYS), set(_DATASET_KEYS) | {"enable_bucket"}
    ascending = subset_allowed - set(_DISTINCT_SUBSET_KEYS)  # subset keys a dataset or [general] may set for all
    _check_table(raw, source, {"general", "datasets"})
    general = _check_table(raw.get("general", {}), f"{source} [general]", ascending | dataset_allowed)
    datasets = raw.get("datasets")
    if not isinstance(datasets, list) or not datasets:
        raise ConfigError(f"{source} has no [[datasets]] tables; a kohya dataset config lists its image folders as "
                          "[[datasets]] with [[datasets.subsets]] image_dir = \"...\" entries")
    fragment: dict = {"data": {"subsets": []}, "train": {}}
    origins: dict[str, str] = {}
    wide: dict[str, tuple] = {}  # sdtrain dotted key -> (value, where, kohya key): the same for every dataset
    used: dict[str, str] = {}
    ignored: set[str] = set()
    first_sets: set[str] = set()  # dataset-level keys that give the first dataset a value
    for d, dataset in enumerate(datasets):
        dwhere = f"{source} datasets.{d}"
        _check_table(dataset, dwhere, ascending | dataset_allowed | {"subsets"})
        levels = [(dataset, dwhere), (general, f"{source} [general]")]
        for kohya_key in sorted(dataset_allowed):
            found = _pick(kohya_key, levels)
            values = _dataset_values(kohya_key, found[0], levels, found[1]) if found else {}
            for key, value in values.items():
                if key in wide and wide[key][0] != value:
                    raise ConfigError(
                        f"{source}: datasets differ in {kohya_key} ({_show(wide[key][0])} in {wide[key][1]}, "
                        f"{_show(value)} in {found[1]}); sdtrain trains all subsets with one {key}: give the "
                        "datasets the same value or merge them into one [[datasets]]")
                wide[key] = (value, found[1], kohya_key)
            if d == 0 and values:
                first_sets.add(kohya_key)
            elif d and bool(values) != (kohya_key in first_sets):
                raise ConfigError(f"{source}: {kohya_key} differs between [[datasets]] (set in some, not in others); "
                                  "sdtrain trains all subsets with one value: set it in [general] or the same in "
                                  "every dataset")
        subsets = dataset.get("subsets")
        if not isinstance(subsets, list) or not subsets:
            raise ConfigError(f"{dwhere} has no [[datasets.subsets]] tables with image_dir = \"...\"")
        for s, subset in enumerate(subsets):
            swhere = f"{dwhere}.subsets.{s}"
            _check_table(subset, swhere, subset_allowed)
            if "image_dir" not in subset:
                raise ConfigError(f"{swhere} has no image_dir; add image_dir = \"path/to/images\"")
            if "conditioning_data_dir" in subset and not masked_loss:
                raise ConfigError(f"{swhere}: conditioning_data_dir is read (as loss masks) only with kohya's "
                                  "masked_loss = true in the training config, as kohya's train_network.py does; "
                                  "add masked_loss = true to CONFIG, or remove conditioning_data_dir")
            tables = [(subset, swhere), *levels]
            index = len(fragment["data"]["subsets"])
            entry: dict = {}
            for kohya_key, key in _SUBSET_KEYS.items():
                found = _pick(kohya_key, tables if kohya_key not in _DISTINCT_SUBSET_KEYS else tables[:1])
                if found is None:
                    continue
                value, where = found
                if kohya_key in ("image_dir", "conditioning_data_dir") and isinstance(value, str):
                    value = os.path.normpath(os.path.join(folder, os.path.expanduser(value)))
                entry[key] = value
                origins[f"data.subsets.{index}.{key}"] = f"{where} (kohya {kohya_key})"
                used[kohya_key] = f"data.subsets.N.{key}"
            # kohya reads num_repeats from the file only (1 when unset), never from an N_name folder name
            if "repeats" not in entry:
                entry["repeats"] = 1
                origins[f"data.subsets.{index}.repeats"] = f"{swhere} (kohya num_repeats default 1)"
            for table, where in tables:
                ignored |= _ignored_keys(table, where)
            fragment["data"]["subsets"].append(entry)
    for key, (value, where, kohya_key) in wide.items():
        section, name = key.split(".")
        fragment[section][name] = value
        origins[key] = f"{where} (kohya {kohya_key})"
        used[kohya_key] = key
    count = len(fragment["data"]["subsets"])
    mapping = ", ".join(f"{k} -> {v}" for k, v in used.items())
    notes.append(f"{source}: kohya dataset config read as {count} data.subsets ({mapping})")
    if ignored:
        notes.append(f"{source}: ignored kohya keys at their default values (no sdtrain equivalent): "
                     + ", ".join(sorted(ignored)))
    return fragment, origins


def _dataset_values(kohya_key: str, value, levels, where: str) -> dict:
    """sdtrain values of one kohya dataset-level key."""
    if kohya_key != "enable_bucket":
        convert = _resolution if kohya_key == "resolution" else _same
        return {_DATASET_KEYS[kohya_key]: convert(value)}
    if value is True:
        return {}  # sdtrain always buckets
    if value is not False:
        raise ConfigError(f"{where}: enable_bucket must be true or false, got {_show(value)}")
    found = _pick("resolution", levels)
    side = _resolution(found[0]) if found else None
    if isinstance(side, list) and len(side) == 2 and side[0] == side[1]:
        side = side[0]
    if not isinstance(side, int):
        raise ConfigError(f"{where}: enable_bucket = false trains every image at one square size; sdtrain does that "
                          "only for a square resolution given in the dataset config (e.g. resolution = 512); set "
                          "one, or set enable_bucket = true")
    # one bucket: every image resized to cover the square and centre-cropped, as kohya does without buckets
    return {"data.min_bucket_side": side, "data.max_bucket_side": side}


def _ignored_keys(table: dict, where: str) -> set[str]:
    ignored = set()
    for key, value in table.items():
        if key in _ANY_VALUE:
            ignored.add(key)
        elif key in _KOHYA_DEFAULTS:
            default = _KOHYA_DEFAULTS[key]
            if value != default and not (default is None and value in ("", [])):
                raise ConfigError(f"{where}: {key} = {_show(value)} has no sdtrain equivalent; remove it (kohya's "
                                  f"default {_show(default) if default is not None else 'unset'} is accepted and ignored)")
            ignored.add(key)
    return ignored


def merge_dataset_config(data: dict, path, source: str, notes: list[str], origins: dict[str, str]) -> None:
    """Put the subsets and dataset-wide keys of a kohya dataset config into the raw config `data` (in place);
    they replace CONFIG's `[[data.subsets]]` and win over its data/batch keys."""
    fragment, file_origins = read_dataset_config(path, notes, masked_loss=masked_loss_on(origins))
    data_table = _section(data, "data", source)
    if data_table.get("subsets"):
        notes.append(f"{source}: its {len(data_table['subsets'])} [[data.subsets]] are replaced by the dataset config's")
    for section, values in fragment.items():
        table = _section(data, section, source)
        for key, value in values.items():
            table[key] = value
    origins.update(file_origins)
