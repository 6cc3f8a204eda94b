"""After the schema check: resolve paths and derived defaults, and check rules that span keys."""

from __future__ import annotations

import importlib.util
import os
import re
import tempfile

from sdtrain.config.schema import BUILTIN_MODELS, Config, default_resolution
from sdtrain.prompts import parse_prompt_line

CHECKPOINT_SUFFIXES = (".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")
_OUTPUT_NAME = re.compile(r"[A-Za-z0-9._+-]+")
OPTIMIZER_PACKAGES = {
    "AdamW8bit": "bitsandbytes",
    "PagedAdamW8bit": "bitsandbytes",
    "Lion8bit": "bitsandbytes",
    "Prodigy": "prodigyopt",
}


def looks_like_hub_id(value: str) -> bool:
    """True for "org/name" strings that are not checkpoint file names."""
    return bool(_HUB_ID.fullmatch(value)) and not value.lower().endswith(CHECKPOINT_SUFFIXES) \
        and not value.startswith(".")


def _local(base_dir: str, value: str) -> str:
    return os.path.normpath(os.path.join(base_dir, os.path.expanduser(value)))


def _unwritable(folder: str) -> str:
    """Why files cannot be created in `folder` (or in the folders that would be created for it), or ""."""
    existing = folder
    while not os.path.exists(existing):
        parent = os.path.dirname(existing)
        if parent == existing:
            break
        existing = parent
    if not os.path.isdir(existing):
        return f"{existing} is a file, not a folder"
    try:  # the only reliable test: read-only mounts, /proc and ACLs all answer os.access wrongly for root
        os.rmdir(tempfile.mkdtemp(prefix=".sdtrain-write-check-", dir=existing))
    except OSError as exc:
        return f"{existing} is not writable ({exc.strerror})"
    return ""


class Resolver:
    """Fills derived defaults of a schema-checked `Config` in place, collecting problems."""

    def __init__(self, config: Config, base_dir: str, problems, stem: str | None):
        self.c = config
        self.base_dir = os.path.abspath(base_dir)
        self.problems = problems
        self.stem = stem

    def fail(self, dotted: str, message: str):
        self.problems.add(f"'{dotted}' in {self.problems.where(dotted)}: {message}")

    def note(self, message: str):
        """Something the user should know about the resolved config (printed once by the command)."""
        self.problems.notes.append(message)

    def run(self):
        self.model()
        self.network()
        self.data()
        self.optimizer()
        self.scheduler_and_train()
        self.outputs()
        self.save()
        self.sample()
        self.validation()
        self.ema()
        self.log()

    # ------------------------------------------------------------ model

    def _model_ref(self, dotted: str, value: str | None, allow_builtin: bool) -> str | None:
        if value is None:
            return None
        if value.startswith("builtin:"):
            if allow_builtin and value in BUILTIN_MODELS:
                return value
            accepted = ", ".join(f'"{b}"' for b in BUILTIN_MODELS) if allow_builtin else "no builtin models"
            self.fail(dotted, f'unknown builtin model "{value}"; it accepts {accepted}')
            return value
        local = _local(self.base_dir, value)
        if os.path.exists(local):
            if os.path.isfile(local):
                suffix = os.path.splitext(local)[1].lower()
                if suffix not in CHECKPOINT_SUFFIXES:
                    self.fail(dotted, f"{local} is not a checkpoint; it accepts a diffusers folder or a "
                                      f"{', '.join(CHECKPOINT_SUFFIXES)} file")
                elif suffix in PICKLE_SUFFIXES and not self.c.model.allow_pickle:
                    self.fail(dotted, f"{local} is a pickle checkpoint, which can run code when loaded; convert it to "
                                      ".safetensors, or set model.allow_pickle = true if you trust the file")
            return local
        if looks_like_hub_id(value):
            return value
        self.fail(dotted, f'no file or folder at {local} (relative paths are read from {self.base_dir}), and '
                          f'"{value}" is not a hub id like "org/name"; fix the path')
        return value

    def model(self):
        m = self.c.model
        m.path = self._model_ref("model.path", m.path, allow_builtin=True)
        m.vae = self._model_ref("model.vae", m.vae, allow_builtin=False)
        m.config_dir = self._input_dir("model.config_dir", m.config_dir)
        builtin_arch = BUILTIN_MODELS.get(m.path)
        if builtin_arch:
            if m.arch not in ("auto", builtin_arch):
                self.fail("model.arch", f'"{m.arch}" does not match {m.path}, which is {builtin_arch}; '
                                        f'set it to "auto" or "{builtin_arch}"')
            m.arch = builtin_arch

    def _input_dir(self, dotted: str, value: str | None) -> str | None:
        if value is None:
            return None
        local = _local(self.base_dir, value)
        if not os.path.isdir(local):
            state = "is a file, not a folder" if os.path.exists(local) else "does not exist"
            self.fail(dotted, f'folder {local} {state} ("{value}" is read relative to {self.base_dir}); '
                              "create it or fix the path")
        return local

    # ------------------------------------------------------------ network

    def network(self):
        n = self.c.network
        if n.alpha is None:
            n.alpha = float(n.rank)
        if n.conv_rank is None:
            n.conv_rank = n.rank
        if n.conv_alpha is None:
            n.conv_alpha = n.conv_rank * n.alpha / n.rank
        for key in ("dropout", "rank_dropout"):
            if getattr(n, key) >= 1:
                self.fail(f"network.{key}", f"{getattr(n, key)} drops everything (the rest is scaled by 1/(1-p)); "
                                            "use a value below 1, e.g. 0.1")
        for i, block in enumerate(n.blocks):
            if block.pattern.startswith("re:"):
                try:
                    re.compile(block.pattern[3:])
                except re.error as err:
                    self.fail(f"network.blocks.{i}.pattern", f'"{block.pattern}" is not a valid regular expression '
                                                            f'({err}); fix it or write a glob such as "lora_unet_up_blocks_0_*"')
            if block.rank is None and block.alpha is None and block.lr is None:
                self.fail(f"network.blocks.{i}", "sets none of rank, alpha, lr; add one or remove the entry")
        if not (n.train_unet or n.train_text_encoder):
            self.fail("network.train_unet", "nothing to train: network.train_unet and network.train_text_encoder "
                                            "are both false; set one of them to true")

    # ------------------------------------------------------------ data

    def data(self):
        d = self.c.data
        if not d.caption_extension.startswith("."):
            self.fail("data.caption_extension", f'"{d.caption_extension}" must start with a dot, e.g. ".txt"')
        for i, s in enumerate(d.subsets):
            s.path = self._input_dir(f"data.subsets.{i}.path", s.path)
            if s.caption_extension is None:
                s.caption_extension = d.caption_extension
            elif not s.caption_extension.startswith("."):
                self.fail(f"data.subsets.{i}.caption_extension",
                          f'"{s.caption_extension}" must start with a dot, e.g. ".txt"')
            s.mask_path = self._input_dir(f"data.subsets.{i}.mask_path", s.mask_path)
            if s.mask_path is not None and s.path is not None and os.path.realpath(s.mask_path) == os.path.realpath(s.path):
                self.fail(f"data.subsets.{i}.mask_path", "is the subset's own folder, so each image would be its own "
                                                         "mask; put the masks in a folder of their own")
            if s.mask_path is not None and s.alpha_mask:
                self.fail(f"data.subsets.{i}.alpha_mask", "a subset takes its loss masks from mask_path or from the "
                                                          "alpha channel, not both; drop one of them")
            if d.cache_text_encoder_outputs and (s.shuffle_tags or s.caption_dropout or s.tag_dropout):
                self.fail("data.cache_text_encoder_outputs",
                          f"cached text-encoder outputs need fixed captions, but data.subsets.{i} uses shuffle_tags, "
                          "caption_dropout or tag_dropout; turn those off or set cache_text_encoder_outputs = false")
            if d.cache_latents and s.random_crop:
                self.fail(f"data.subsets.{i}.random_crop", "random crops change every time an image is used, but cached "
                          "latents hold one fixed crop; set data.cache_latents = false or turn random_crop off")
        if d.subsets and all(s.is_reg for s in d.subsets):
            self.fail("data.subsets", "every subset has is_reg = true; add at least one subset of training images")
        if d.cache_text_encoder_outputs and self.c.network.train_text_encoder:
            self.fail("data.cache_text_encoder_outputs", "cannot cache text-encoder outputs while training the text "
                                                         "encoder; set network.train_text_encoder = false or this to false")
        if d.resolution == "auto" and self.c.model.arch != "auto":
            d.resolution = default_resolution(self.c.model.arch)
        for key in ("min_bucket_side", "max_bucket_side"):
            if getattr(d, key) % d.bucket_step:
                self.fail(f"data.{key}", f"{getattr(d, key)} is not a multiple of data.bucket_step ({d.bucket_step})")
        if d.min_bucket_side > d.max_bucket_side:
            self.fail("data.min_bucket_side", f"{d.min_bucket_side} is larger than data.max_bucket_side ({d.max_bucket_side})")
        if d.resolution != "auto":
            width, height = d.resolution
            if width % d.bucket_step or height % d.bucket_step:
                self.fail("data.resolution", f"{d.resolution} has sides that are not multiples of data.bucket_step ({d.bucket_step})")
            if min(width, height) < d.min_bucket_side or max(width, height) > d.max_bucket_side:
                self.fail("data.resolution", f"{d.resolution} lies outside the bucket sides [{d.min_bucket_side}, "
                                             f"{d.max_bucket_side}]; change data.min_bucket_side / data.max_bucket_side")

    # ------------------------------------------------------------ optimizer, schedule, loop

    def optimizer(self):
        o = self.c.optimizer
        if o.unet_lr is None:
            o.unet_lr = o.lr
        if o.text_encoder_lr is None:
            o.text_encoder_lr = o.lr
        if o.text_encoder_2_lr is None:
            o.text_encoder_2_lr = o.text_encoder_lr
        package = OPTIMIZER_PACKAGES.get(o.type)
        if package and importlib.util.find_spec(package) is None:
            self.fail("optimizer.type", f'"{o.type}" needs the {package} package; install it (pip install {package}) '
                                        'or choose "AdamW"')

    def scheduler_and_train(self):
        s, t = self.c.scheduler, self.c.train
        if s.type == "constant" and s.warmup_steps:
            self.fail("scheduler.warmup_steps", f'{s.warmup_steps} warm-up steps have no effect with scheduler.type = '
                                                '"constant"; use "constant_with_warmup" or set warmup_steps = 0')
        if t.max_steps is None and t.epochs is None:
            self.problems.add(f"missing required key 'train.max_steps' (or 'train.epochs') in {self.problems.source}; "
                              "add it, e.g.\n[train]\nmax_steps = 2000")
        elif t.max_steps is not None and s.warmup_steps >= t.max_steps:
            self.fail("scheduler.warmup_steps", f"{s.warmup_steps} is not below train.max_steps ({t.max_steps})")
        if t.min_timestep >= t.max_timestep:
            self.fail("train.min_timestep", f"{t.min_timestep} must be below train.max_timestep ({t.max_timestep})")
        self.noise_and_weights()

    def noise_and_weights(self):
        """Loss weights that need v-prediction (when the config says the model predicts epsilon; "auto" is
        checked once the model is loaded), and timestep settings that do nothing."""
        from sdtrain.errors import ConfigError
        from sdtrain.train.loss_weights import prediction_notes

        t, m = self.c.train, self.c.model
        if m.prediction_type == "epsilon":
            try:
                prediction_notes("epsilon", zero_terminal_snr=t.zero_terminal_snr,
                                 debiased_estimation=t.debiased_estimation_loss,
                                 scale_v_pred_loss_like_noise_pred=t.scale_v_pred_loss_like_noise_pred)
            except ConfigError as exc:
                self.fail("train.scale_v_pred_loss_like_noise_pred" if t.scale_v_pred_loss_like_noise_pred
                          else "train.debiased_estimation_loss", str(exc))
        if t.timestep_sampling != "logit_normal":
            for key, default in (("logit_mean", 0.0), ("logit_std", 1.0)):
                if getattr(t, key) != default:
                    self.note(f"train.{key} = {getattr(t, key):g} has no effect with train.timestep_sampling = "
                              f'"{t.timestep_sampling}" (it shapes "logit_normal" timesteps)')
        if not t.multires_noise_iterations and t.multires_noise_discount != 0.3:
            self.note(f"train.multires_noise_discount = {t.multires_noise_discount:g} has no effect while "
                      "train.multires_noise_iterations = 0 (multires noise is off)")

    # ------------------------------------------------------------ outputs

    def _output_dir(self, dotted: str, value: str) -> str:
        local = _local(self.base_dir, value)
        if os.path.exists(local) and not os.path.isdir(local):
            self.fail(dotted, f"{local} is a file; it accepts a folder path")
        else:
            problem = _unwritable(local)
            if problem:
                self.fail(dotted, f"cannot write into {local}: {problem}; choose a folder you can write to")
        return local

    def outputs(self):
        t, d = self.c.train, self.c.data
        t.output_dir = self._output_dir("train.output_dir", t.output_dir)
        if t.output_name is None:
            t.output_name = self.stem or "adapter"
        if not _OUTPUT_NAME.fullmatch(t.output_name):
            self.fail("train.output_name", f'"{t.output_name}" is not a plain file name; it accepts letters, digits '
                                           "and . _ + - (no folders or spaces)")
        d.cache_dir = self._output_dir("data.cache_dir", d.cache_dir or os.path.join(t.output_dir, "cache"))

    def save(self):
        """save.target must be able to hold the trained DoRA axis; every UI in save.targets must apply it exactly."""
        from sdtrain.export import targets

        s, n = self.c.save, self.c.network
        axis = n.decompose_axis if n.type == "dora" else None
        target = targets.TARGETS[s.target]
        problem = targets.axis_problem(target, axis)
        if problem:
            self.fail("save.target", problem)
            return
        for consumer in s.targets or []:
            if targets.expected_exact(consumer, axis, target.rule):
                continue
            better = targets.targets_exact_in(consumer, axis)
            other = "input" if axis == "output" else "output"
            fix = (f'set save.target = "{better[0]}"' if better else
                   f'no file of this axis is: train with network.decompose_axis = "{other}", load it through '
                   f"sdtrain's ComfyUI nodes / A1111-Forge extension, or drop it from save.targets")
            self.fail("save.targets", f'{consumer} does not apply {axis}-axis DoRA written for save.target = '
                                      f'"{s.target}" exactly; {fix}')

    def sample(self):
        s = self.c.sample
        if s.seed is None:
            s.seed = self.c.train.seed
        for key, value in (("every_n_steps", s.every_n_steps), ("every_n_epochs", s.every_n_epochs),
                           ("at_start", s.at_start)):
            if value and not s.prompts:
                shown = "true" if value is True else value
                self.fail(f"sample.{key}", f"{shown} asks for samples but sample.prompts is empty; "
                                           'add prompts, e.g. prompts = ["a photo of sks person --w 1024 --h 1024"]')
        self._check_prompt_lines("sample.prompts", s.prompts)

    def _check_prompt_lines(self, key: str, lines: list[str]) -> None:
        """Each prompt line of `key` parses (sample.prompts syntax)."""
        for i, line in enumerate(lines):
            try:
                parse_prompt_line(line)
            except ValueError as exc:
                self.fail(f"{key}.{i}", f'"{line}": {exc}')

    def validation(self):
        v, t = self.c.validation, self.c.train
        v.path = self._input_dir("validation.path", v.path)
        if v.seed is None:
            v.seed = t.seed
        if v.batch_size is None:
            v.batch_size = t.batch_size
        if v.prompts and not (v.fraction or v.path):
            self.fail("validation.prompts", "are rendered at each validation, but validation is off; set "
                                            "validation.fraction (e.g. 0.1) or validation.path")
        self._check_prompt_lines("validation.prompts", v.prompts)
        if v.fraction and v.path is not None:
            self.fail("validation.path", f"validation images come from validation.path or from a held-out "
                                         f"validation.fraction ({v.fraction:g}) of the training images, not both; "
                                         "drop one of them")

    def ema(self):
        e = self.c.ema
        if e.use_for_samples and not e.enabled:
            self.fail("ema.use_for_samples", "needs the EMA: set ema.enabled = true, or drop ema.use_for_samples")

    def log(self):
        """log.trackers: the trackers asked for, with "tensorboard" when log.tensorboard is on ("auto": when the
        tensorboard package is installed); every tracker's package must be installed."""
        from sdtrain.train.trackers import TRACKER_PACKAGES

        g = self.c.log
        g.log_dir = self._output_dir("log.log_dir", g.log_dir or os.path.join(self.c.train.output_dir, "logs"))
        trackers = list(dict.fromkeys(g.trackers or []))
        if g.tensorboard is False and "tensorboard" in trackers:
            self.fail("log.trackers", 'has "tensorboard" but log.tensorboard = false; drop one of them')
            return
        installed = importlib.util.find_spec("tensorboard") is not None
        if g.tensorboard == "auto":
            g.tensorboard = installed or "tensorboard" in trackers
            if not g.tensorboard:
                self.note("TensorBoard logging is off: the tensorboard package is not installed (pip install "
                          "tensorboard turns it on; loss_log.csv in the output folder has the loss of every step)")
        elif g.tensorboard and not installed:
            self.fail("log.tensorboard", "needs the tensorboard package; install it (pip install tensorboard) "
                                         'or set log.tensorboard = "auto" or false')
            return
        if g.tensorboard and "tensorboard" not in trackers:
            trackers.insert(0, "tensorboard")
        for tracker in trackers:
            package = TRACKER_PACKAGES[tracker]
            if importlib.util.find_spec(package) is None:
                self.fail("log.trackers", f'"{tracker}" needs the {package} package; install it (pip install '
                                          f"{package}) or leave it out of log.trackers")
        g.trackers = trackers


def resolve_config(config: Config, base_dir: str, problems, stem: str | None = None) -> Config:
    """Resolve paths and derived defaults of `config` in place; problems are added to `problems`."""
    Resolver(config, base_dir, problems, stem).run()
    return config
