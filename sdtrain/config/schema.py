"""The config schema: one dataclass per TOML section, one `setting(...)` per key.

Each setting carries its kind (type and accepted values), default and help text, so
validation, defaults, the resolved-config dump and docs/config.md all come from here.
Defaults written as text in `default_doc` are filled in by `resolve.py` after loading.
The accepted values of a choice come from the module that implements it (optimizers, schedules, samplers,
losses, network types, axes, presets); those modules import torch only where they use it, so loading a config
stays light.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields

from sdtrain.adapters.presets import PRESETS
from sdtrain.adapters.spec import AXES, TYPES
from sdtrain.config.kinds import (
    Bool,
    BoolOrAuto,
    Choice,
    Float,
    FloatPair,
    Int,
    Kind,
    Path,
    Resolution,
    Section,
    SectionList,
    Str,
    StrList,
    Table,
)
from sdtrain.export.targets import TARGETS as EXPORT_TARGET_TABLE
from sdtrain.limits import MAX_CFG_SCALE, MAX_RANK, MAX_REPEATS, MAX_SAMPLE_STEPS, MAX_SEED, MAX_SIDE
from sdtrain.train.loss import LOSS_KINDS
from sdtrain.train.optim import OPTIMIZER_TYPES, SCHEDULER_TYPES
from sdtrain.train.sampling import SAMPLERS
from sdtrain.train.timesteps import TIMESTEP_SAMPLINGS
from sdtrain.train.trackers import TRACKER_PACKAGES

ARCHS = ("auto", "sd15", "sd2", "sdxl")
BUILTIN_MODELS = {  # name -> arch; the -random names are the same architectures with seed-0 random weights
    "builtin:tiny-sd15": "sd15", "builtin:tiny-sdxl": "sdxl",
    "builtin:tiny-sd15-random": "sd15", "builtin:tiny-sdxl-random": "sdxl",
}
DEFAULT_RESOLUTION = {"sd15": 512, "sd2": 768, "sdxl": 1024}
EXPORT_TARGETS = tuple(EXPORT_TARGET_TABLE)
TRACKERS = tuple(TRACKER_PACKAGES)
CONSUMERS = ("comfyui", "forge", "comfyui-fixed", "a1111", "a1111-1.9", "lycoris", "diffusers")  # verify.LOADERS (imports torch)


def setting(default=None, kind: Kind | None = None, help: str = "", *, required: bool = False,
            example: str | None = None, default_doc: str | None = None):
    """A schema field: `default` (a callable for mutable defaults), its `kind` and `help`."""
    metadata = {"kind": kind, "help": help, "required": required, "example": example, "default_doc": default_doc}
    if callable(default):
        return field(default_factory=default, metadata=metadata)
    return field(default=default, metadata=metadata)


def section(cls, help: str = ""):
    return setting(cls, Section(cls), help)


@dataclass
class ModelConfig:
    path: str = setting(None, Path("model"), "Base model to train on.", required=True,
                        example='path = "stabilityai/stable-diffusion-xl-base-1.0"')
    arch: str = setting("auto", Choice(ARCHS), "Model family; \"auto\" detects it from the weights.")
    vae: str | None = setting(None, Path("vae"), "VAE to use instead of the model's own (e.g. an fp16-safe SDXL VAE).",
                              default_doc="the model's VAE")
    config_dir: str | None = setting(None, Path("input_dir"),
                                     "Local diffusers config folder used to build a single-file checkpoint offline.")
    prediction_type: str = setting("auto", Choice(("auto", "epsilon", "v_prediction")),
                                   "What the UNet predicts; \"auto\" reads it from the model's scheduler config.")
    clip_skip: int = setting(1, Int(min=1, max=12), "Use the output of the N-th last text-encoder layer (1 = last, 2 = kohya/A1111 \"clip skip 2\").")
    max_token_length: int = setting(75, Int(min=75, max=225, multiple_of=75),
                                    "Longest caption and sample prompt in tokens (kohya max_token_length): 75 is CLIP's one "
                                    "window; 150 or 225 encode 2 or 3 windows of 75 and concatenate them, as kohya and "
                                    "A1111 do. Longer text is cut.")
    allow_pickle: bool = setting(False, Bool(), "Allow loading pickled .ckpt/.pt/.bin files, which can run code; only for files you trust.")
    revision: str | None = setting(None, Str(nonempty=True), "Hub revision (branch, tag or commit) of a hub model.")
    variant: str | None = setting(None, Str(nonempty=True), "Weight variant of a hub model or diffusers folder, e.g. \"fp16\" (files *.fp16.safetensors).")


@dataclass
class BlockConfig:
    pattern: str = setting(None, Str(nonempty=True),
                           "Layers of this entry: a glob or re: pattern over kohya module names, e.g. "
                           "\"lora_unet_output_blocks_*\" (SDXL) or \"lora_unet_up_blocks_*\" (SD1.5); the first "
                           "entry that matches a layer sets its values.",
                           required=True, example='pattern = "lora_unet_output_blocks_*"')
    rank: int | None = setting(None, Int(min=1, max=MAX_RANK), "Rank of these layers (kohya block_dims).",
                               default_doc="network.rank (network.conv_rank for convolutions)")
    alpha: float | None = setting(None, Float(min=0, min_open=True), "Alpha of these layers (kohya block_alphas).",
                                  default_doc="the layer's alpha / rank times this entry's rank (same scale)")
    lr: float | None = setting(None, Float(min=0), "Learning rate of these layers (0 = frozen at their initial "
                               "weights; kohya down_lr_weight / mid_lr_weight / up_lr_weight times the lr).",
                               default_doc="optimizer.unet_lr / text_encoder_lr of their model")


@dataclass
class NetworkConfig:
    type: str = setting("dora", Choice(TYPES), "Adapter type: DoRA (weight-decomposed) or plain LoRA.")
    rank: int = setting(16, Int(min=1, max=MAX_RANK), "Adapter rank (kohya network_dim); 16-32 is typical for SDXL characters.")
    alpha: float | None = setting(None, Float(min=0, min_open=True), "Scale numerator: the update is multiplied by alpha / rank.",
                                  default_doc="rank")
    decompose_axis: str = setting("output", Choice(AXES),
                                  "DoRA magnitude axis: one scale per output row (LyCORIS default) or per input column.")
    detach_norm: bool = setting(True, Bool(), "Treat the DoRA weight norm as a constant in the backward pass (the paper's memory saving).")
    preset: str = setting("attn-mlp", Choice(tuple(PRESETS)),
                          "Which layers get adapters: attention only, attention + feed-forward, or also ResNet convolutions.")
    include: list[str] = setting(list, StrList(), "Extra layers to adapt: glob or re: patterns over kohya module names (lora_unet_...).")
    exclude: list[str] = setting(list, StrList(), "Layers to skip: glob or re: patterns over kohya module names; applied after include.")
    conv_rank: int | None = setting(None, Int(min=1, max=MAX_RANK), "Rank of convolution adapters (preset \"full\").", default_doc="rank")
    conv_alpha: float | None = setting(None, Float(min=0, min_open=True), "Alpha of convolution adapters.",
                                       default_doc="conv_rank * alpha / rank")
    train_unet: bool = setting(True, Bool(), "Train adapters on the UNet.")
    train_text_encoder: bool = setting(False, Bool(), "Also train adapters on the text encoder(s).")
    dropout: float = setting(0.0, Float(min=0, max=1), "Network dropout (kohya network_dropout): probability of "
                             "zeroing each element of the down projection's output in training, the rest scaled "
                             "by 1/(1-p); 0.1 is common. Must be below 1.")
    rank_dropout: float = setting(0.0, Float(min=0, max=1), "Rank dropout (kohya network_args rank_dropout): "
                                  "probability of dropping each rank in training (per sample for LoRA, per step and "
                                  "layer for DoRA, before the norm), the update scaled by 1/(1-p). Must be below 1.")
    module_dropout: float = setting(0.0, Float(min=0, max=1), "Module dropout (kohya network_args module_dropout): "
                                    "probability that a layer's adapter is skipped for a training step.")
    blocks: list[BlockConfig] = setting(list, SectionList(BlockConfig), "Per-block rank / alpha / learning rate: "
                                        "[[network.blocks]] tables with a kohya-name pattern (kohya block_dims, "
                                        "down_lr_weight ...); the dry run lists what each entry matched.")


@dataclass
class SubsetConfig:
    path: str = setting(None, Path("input_dir"), "Folder of images with caption files.", required=True,
                        example='path = "datasets/my_character"')
    repeats: int | None = setting(None, Int(min=1, max=MAX_REPEATS), "How many times each image is seen per epoch.",
                                  default_doc="N from a kohya \"N_name\" folder, else 1")
    is_reg: bool = setting(False, Bool(), "Regularisation (class) images instead of training images.")
    caption_extension: str | None = setting(None, Str(nonempty=True), "Caption file extension for this subset.",
                                            default_doc="data.caption_extension")
    shuffle_tags: bool = setting(False, Bool(), "Shuffle comma-separated tags each time a caption is used (kohya shuffle_caption).")
    keep_tokens: int = setting(0, Int(min=0), "Number of leading tags kept in place when shuffling or dropping tags.")
    keep_tokens_separator: str = setting("", Str(), "If set, everything before this separator is kept in place instead of keep_tokens tags.")
    tag_separator: str = setting(", ", Str(nonempty=True), "Separator between tags in captions.")
    caption_dropout: float = setting(0.0, Float(min=0, max=1), "Probability of training on an empty caption.")
    tag_dropout: float = setting(0.0, Float(min=0, max=1), "Probability of dropping each (non-kept) tag.")
    flip: bool = setting(False, Bool(), "Randomly flip images horizontally (not for asymmetric characters).")
    random_crop: bool = setting(False, Bool(), "Crop a random part of an image that is larger than its bucket, drawn anew each "
                                "time it is used, instead of the centre (kohya random_crop); needs data.cache_latents = false.")
    class_caption: str | None = setting(None, Str(), "Caption used for images that have no caption file.",
                                        default_doc="none: an image without a caption file trains with an empty caption (the dry run counts them)")
    caption_prefix: str = setting("", Str(), "Text put before every caption of this subset, with a space (kohya caption_prefix), "
                                  "e.g. a trigger word; kept by keep_tokens = 1 when it ends with the tag separator.")
    caption_suffix: str = setting("", Str(), "Text put after every caption of this subset, with a space (kohya caption_suffix).")
    wildcards: bool = setting(False, Bool(), "Wildcard captions (kohya enable_wildcard): each use of a caption picks one of "
                              "its file's non-empty lines and one alternative of every {a|b|c}; {{ and }} are literal braces.")
    mask_path: str | None = setting(None, Path("input_dir"),
                                    "Folder of loss masks: a greyscale image per training image, same file name stem "
                                    "(white = trained, black = ignored, grey = weighted); masked loss for this subset.",
                                    default_doc="none (no masks)")
    alpha_mask: bool = setting(False, Bool(), "Use each image's alpha channel as its loss mask (opaque = trained, "
                                              "transparent = ignored; images without alpha train everywhere).")


@dataclass
class DataConfig:
    resolution: str | list[int] = setting("auto", Resolution(), "Training resolution: bucket area target.",
                                          default_doc="\"auto\": 1024 for SDXL, 768 for SD2, 512 for SD1.5")
    caption_extension: str = setting(".txt", Str(nonempty=True), "Caption file extension, with the dot.")
    min_bucket_side: int = setting(256, Int(min=64, max=MAX_SIDE, multiple_of=64), "Smallest bucket side in pixels.")
    max_bucket_side: int = setting(2048, Int(min=64, max=MAX_SIDE, multiple_of=64), "Largest bucket side in pixels.")
    bucket_step: int = setting(64, Int(min=64, max=MAX_SIDE, multiple_of=64), "Bucket sides are multiples of this many pixels.")
    no_upscale: bool = setting(False, Bool(), "Never upscale small images; they get a bucket of their own size instead.")
    cache_latents: bool = setting(True, Bool(), "Encode images with the VAE once and cache the latents.")
    cache_dir: str | None = setting(None, Path("output_dir"), "Folder for cached latents and text-encoder outputs.",
                                    default_doc="{train.output_dir}/cache")
    cache_text_encoder_outputs: bool = setting(False, Bool(), "Cache text-encoder outputs (needs fixed captions and frozen text encoders).")
    num_workers: int = setting(2, Int(min=0), "Data loader worker processes that read, decode and augment the next batches while the "
                                 "device trains (0 = load in the main process); batches are the same with any number.")
    subsets: list[SubsetConfig] = setting(list, SectionList(SubsetConfig), "Image folders, one [[data.subsets]] table each.",
                                          required=True, example='[[data.subsets]]\npath = "datasets/my_character"')


@dataclass
class OptimizerConfig:
    type: str = setting("AdamW8bit", Choice(OPTIMIZER_TYPES), "Optimizer (8-bit ones come from bitsandbytes).")
    lr: float = setting(1e-4, Float(min=0, min_open=True), "Learning rate (kohya learning_rate); about 1.0 for Prodigy.")
    unet_lr: float | None = setting(None, Float(min=0, min_open=True), "Learning rate of UNet adapters.", default_doc="lr")
    text_encoder_lr: float | None = setting(None, Float(min=0, min_open=True), "Learning rate of text-encoder adapters.",
                                            default_doc="lr")
    text_encoder_2_lr: float | None = setting(None, Float(min=0, min_open=True), "Learning rate of SDXL's second text encoder.",
                                              default_doc="text_encoder_lr")
    weight_decay: float = setting(0.01, Float(min=0), "Decoupled weight decay.")
    betas: list[float] | None = setting(None, FloatPair(), "Adam/Lion betas.", default_doc="the optimizer's default")
    eps: float | None = setting(None, Float(min=0, min_open=True), "Adam epsilon.", default_doc="the optimizer's default")
    args: dict = setting(dict, Table(), "Extra keyword arguments passed to the optimizer, e.g. { decouple = true }.")


@dataclass
class SchedulerConfig:
    type: str = setting("constant", Choice(SCHEDULER_TYPES), "Learning-rate schedule (diffusers get_scheduler names).")
    warmup_steps: int = setting(0, Int(min=0), "Linear warm-up steps (not with \"constant\").")
    num_cycles: int = setting(1, Int(min=1), "Restarts of \"cosine_with_restarts\".")
    power: float = setting(1.0, Float(min=0, min_open=True), "Power of the \"polynomial\" decay.")


@dataclass
class TrainConfig:
    max_steps: int | None = setting(None, Int(min=1), "Optimizer steps to train (set this or epochs; the first limit reached stops).",
                                    example="max_steps = 2000")
    epochs: int | None = setting(None, Int(min=1), "Epochs to train (set this or max_steps).")
    batch_size: int = setting(1, Int(min=1), "Images per step on the device.")
    gradient_accumulation_steps: int = setting(1, Int(min=1), "Batches accumulated per optimizer step.")
    max_grad_norm: float = setting(1.0, Float(min=0), "Gradient clipping norm (0 = off).")
    mixed_precision: str = setting("bf16", Choice(("no", "fp16", "bf16")), "Autocast precision; bf16 needs an Ampere or newer GPU.")
    gradient_checkpointing: bool = setting(False, Bool(), "Recompute activations in backward to save memory.")
    compile: bool = setting(False, Bool(), "Run the UNet (with its adapters) under torch.compile: faster steps on a GPU after the "
                            "first steps compile it (minutes for SDXL); needs a C++ compiler on the CPU.")
    seed: int = setting(42, Int(min=0, max=MAX_SEED), "Random seed for noise, timesteps, shuffling, augmentation and the adapters' initial weights.")
    loss: str = setting("l2", Choice(LOSS_KINDS), "Loss between prediction and target.")
    huber_c: float = setting(0.1, Float(min=0, min_open=True), "Huber loss threshold.")
    min_snr_gamma: float = setting(0.0, Float(min=0), "Min-SNR loss weighting gamma (5 is common; 0 = off).")
    debiased_estimation_loss: bool = setting(False, Bool(), "Weight each sample's loss by 1/sqrt(SNR) (epsilon) or 1/(SNR+1) "
                                             "(v-prediction) of its timestep (kohya debiased_estimation_loss).")
    scale_v_pred_loss_like_noise_pred: bool = setting(False, Bool(), "v-prediction only: weight each sample's loss by "
                                                      "SNR/(SNR+1), which makes it an epsilon loss (kohya's option of this name).")
    prior_loss_weight: float = setting(1.0, Float(min=0), "Loss weight of regularisation images (subsets with is_reg; kohya prior_loss_weight).")
    noise_offset: float = setting(0.0, Float(min=0), "Noise offset for darker/brighter images (0.0357 is common; 0 = off).")
    multires_noise_iterations: int = setting(0, Int(min=0, max=64), "Multires (pyramid) noise: add this many levels of "
                                             "coarser noise (kohya multires_noise_iterations; 6-10 is common; 0 = off).")
    multires_noise_discount: float = setting(0.3, Float(min=0, max=1, min_open=True),
                                             "Strength of each coarser multires noise level relative to the one before "
                                             "(kohya multires_noise_discount).")
    ip_noise_gamma: float = setting(0.0, Float(min=0), "Input perturbation: the noisy latents get gamma x extra noise that "
                                    "the target leaves out (kohya ip_noise_gamma; 0.1 is common; 0 = off).")
    zero_terminal_snr: bool = setting(False, Bool(), "Rescale the noise schedule so the last timestep is pure noise "
                                      "(diffusers rescale_betas_zero_snr; kohya zero_terminal_snr); for v-prediction "
                                      "models; samples use the rescaled schedule too, from the last timestep (trailing spacing).")
    timestep_sampling: str = setting("uniform", Choice(TIMESTEP_SAMPLINGS),
                                     "How training timesteps are drawn between min_timestep and max_timestep: "
                                     "\"uniform\", or \"logit_normal\" (the sigmoid of a normal draw; "
                                     "logit_mean and logit_std).")
    logit_mean: float = setting(0.0, Float(), "Mean of the normal draw of \"logit_normal\" timesteps (> 0: noisier).")
    logit_std: float = setting(1.0, Float(min=0, min_open=True), "Standard deviation of the normal draw of \"logit_normal\" timesteps.")
    timestep_shift: float = setting(1.0, Float(min=0, min_open=True), "Shift of the timestep draw u in (0, 1) to "
                                    "s*u/(1+(s-1)*u): above 1 trains more at noisy timesteps, below 1 at detailed ones "
                                    "(1 = off).")
    min_timestep: int = setting(0, Int(min=0, max=999), "Lowest training timestep.")
    max_timestep: int = setting(1000, Int(min=1, max=1000), "Highest training timestep (exclusive).")
    normalize_masked_loss: bool = setting(True, Bool(), "With loss masks: divide each image's masked loss by its mask's "
                                                        "mean, so every image counts fully however small its mask "
                                                        "(OneTrainer's normalize_masked_area_loss); false: loss x mask "
                                                        "averaged over the whole image, as kohya's masked_loss.")
    output_dir: str = setting("output", Path("output_dir"), "Folder for adapters, states, samples and the resolved config.")
    output_name: str | None = setting(None, Str(nonempty=True), "File name stem of saved adapters.",
                                      default_doc="the config file's name")


@dataclass
class SaveConfig:
    every_n_steps: int = setting(0, Int(min=0), "Save the adapter every N steps (0 = off; it is always saved at the end).")
    every_n_epochs: int = setting(0, Int(min=0), "Save the adapter every N epochs (0 = off).")
    keep_last: int = setting(0, Int(min=0), "Keep only the newest N intermediate adapters (0 = keep all).")
    dtype: str = setting("fp16", Choice(("fp16", "bf16", "fp32")), "Precision of saved adapter weights.")
    state_every_n_steps: int = setting(0, Int(min=0), "Also save a resumable training state every N steps (0 = only at the end and when stopped).")
    keep_last_states: int = setting(1, Int(min=0), "Keep only the newest N training states (0 = keep all).")
    target: str = setting("comfyui", Choice(EXPORT_TARGETS),
                          "Which UI the DoRA magnitudes are written for: \"comfyui\" / \"forge\" (their loaders as they "
                          "are), \"lycoris\" (LyCORIS, SD.Next; output axis), \"a1111\" or \"portable\" (ComfyUI, Forge "
                          "and A1111; input axis). Recorded in the file; see README \"Load in your UI\".")
    targets: list[str] | None = setting(None, StrList(CONSUMERS),
                                        "UIs the final file must load exactly in; checked (and the verdict printed) at "
                                        "the end of the run ([] = skip the check).",
                                        default_doc="the UIs save.target is written for")


@dataclass
class SampleConfig:
    every_n_steps: int = setting(0, Int(min=0), "Render sample images every N steps (0 = off).")
    every_n_epochs: int = setting(0, Int(min=0), "Render sample images every N epochs (0 = off).")
    at_start: bool = setting(False, Bool(), "Also render sample images before the first step (step 0; a resumed run "
                                            "does not render them again).")
    prompts: list[str] = setting(list, StrList(), "kohya prompt lines: text with --n negative, --w width, --h height, "
                                 "--d seed, --l CFG scale, --s steps.")
    sampler: str = setting("euler_a", Choice(tuple(SAMPLERS)), "Sampler for sample images.")
    steps: int = setting(20, Int(min=1, max=MAX_SAMPLE_STEPS), "Sampling steps (a prompt's --s wins).")
    cfg_scale: float = setting(7.0, Float(min=0, max=MAX_CFG_SCALE), "Classifier-free guidance scale (a prompt's --l wins).")
    seed: int | None = setting(None, Int(min=0, max=MAX_SEED), "Seed of sample images (a prompt's --d wins).", default_doc="train.seed")


@dataclass
class ValidationConfig:
    fraction: float = setting(0.0, Float(min=0, max=0.5), "Hold out this fraction of the training images (at least "
                                                         "one; chosen by validation.seed, never trained on) to compute "
                                                         "a validation loss (0 = off).")
    path: str | None = setting(None, Path("input_dir"), "Folder of held-out validation images with captions (instead "
                                                        "of validation.fraction).", default_doc="none")
    seed: int | None = setting(None, Int(min=0, max=MAX_SEED), "Seed of the held-out split and of the fixed validation "
                                                               "noise.", default_doc="train.seed")
    every_n_steps: int = setting(100, Int(min=1), "Compute the validation loss every N steps (and after the last step).")
    timesteps: int = setting(4, Int(min=1, max=100), "Timesteps each validation image is evaluated at, evenly spaced "
                                                     "over train.min_timestep..max_timestep, each with its own fixed "
                                                     "noise.")
    batch_size: int | None = setting(None, Int(min=1), "Validation samples per forward pass.",
                                     default_doc="train.batch_size")
    prompts: list[str] = setting(list, StrList(), "Prompt lines (as sample.prompts, with the sample.* defaults) "
                                                  "rendered at every validation into <output_dir>/validation.")


@dataclass
class EmaConfig:
    enabled: bool = setting(False, Bool(), "Keep an exponential moving average of the adapter weights, saved as "
                                           "<output_name>-ema.safetensors next to each adapter and in training states.")
    decay: float = setting(0.999, Float(min=0, max=1),
                           "EMA decay: ema = d x ema + (1 - d) x weights, with d = min(decay, (1 + k) / (10 + k)) at "
                           "the k-th update (diffusers' EMAModel warm-up).")
    every_n_steps: int = setting(1, Int(min=1), "Update the EMA every N optimizer steps.")
    start_step: int = setting(0, Int(min=0), "The EMA equals the trained weights up to this step; its first update "
                                             "after it starts it as their copy.")
    use_for_samples: bool = setting(False, Bool(), "Render sample images with the EMA weights.")


@dataclass
class LogConfig:
    tensorboard: bool | str = setting("auto", BoolOrAuto(), "Write TensorBoard event files (loss, learning rate, "
                                      "grad norm, validation loss, sample grids; the resolved config as hyperparameters); \"auto\": when the tensorboard package is installed "
                                      "(pip install tensorboard), else off with a note. Adds \"tensorboard\" to log.trackers.")
    trackers: list[str] | None = setting(None, StrList(TRACKERS),
                                         "Experiment trackers (accelerate's) that get the logged values, the sample "
                                         "grids and the resolved config as hyperparameters; \"wandb\" needs pip "
                                         "install wandb (WANDB_MODE=offline runs without network; wandb sync "
                                         "uploads later).",
                                         default_doc='["tensorboard"] when log.tensorboard is on, else []')
    log_dir: str | None = setting(None, Path("output_dir"), "Folder for logs.", default_doc="{train.output_dir}/logs")
    log_every_n_steps: int = setting(10, Int(min=1), "Log loss and learning rate every N steps. Only then does the host read values "
                                     "from the device (losses, the NaN/inf check; with several processes, the agreement on a stop).")


@dataclass
class Config:
    model: ModelConfig = section(ModelConfig, "Base model.")
    data: DataConfig = section(DataConfig, "Dataset, buckets and caching.")
    network: NetworkConfig = section(NetworkConfig, "Adapter type, rank and target layers.")
    optimizer: OptimizerConfig = section(OptimizerConfig, "Optimizer and learning rates.")
    scheduler: SchedulerConfig = section(SchedulerConfig, "Learning-rate schedule.")
    train: TrainConfig = section(TrainConfig, "Training loop.")
    save: SaveConfig = section(SaveConfig, "Saving adapters and training states.")
    sample: SampleConfig = section(SampleConfig, "Sample images during training.")
    validation: ValidationConfig = section(ValidationConfig, "Validation loss on held-out images.")
    ema: EmaConfig = section(EmaConfig, "Exponential moving average of the adapter weights.")
    log: LogConfig = section(LogConfig, "Logging.")


def field_default(f):
    """A field's default value (calling its factory for mutable defaults)."""
    if f.default is not MISSING:
        return f.default
    return f.default_factory()


def iter_keys(cls=Config, prefix: str = ""):
    """Yield (dotted key, field) for every leaf key; subset keys use the index `N`."""
    for f in fields(cls):
        kind = f.metadata["kind"]
        if isinstance(kind, Section):
            yield from iter_keys(kind.cls, f"{prefix}{f.name}.")
        elif isinstance(kind, SectionList):
            yield f"{prefix}{f.name}", f
            yield from iter_keys(kind.cls, f"{prefix}{f.name}.N.")
        else:
            yield f"{prefix}{f.name}", f


def default_resolution(arch: str) -> list[int]:
    """The community default training resolution of a model family, as [width, height]."""
    side = DEFAULT_RESOLUTION[arch]
    return [side, side]
