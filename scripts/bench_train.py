"""Full-size training step: LoRA, sdtrain DoRA (output and input axis) and PEFT DoRA, side by side in one run.

Builds the released architectures from their configs with random weights (no download): SD1.5 = UNet + CLIP-L,
SDXL = UNet + CLIP-L + CLIP-G (`sdtrain.train.plan.reference_configs`). Every variant wraps the same frozen base
layers, those `network.preset` selects (with `--text-encoder train` the text encoders' too, else they run frozen):
sdtrain's through `inject_adapters`, PEFT's as `peft.tuners.lora` layers with `use_dora=True` on the same targets.
Each variant has its own optimizer; its wrappers are swapped into the models for its step, so one copy of the base
weights serves all.

One step = encode the caption (CLIP), noise the latents, UNet forward, MSE loss, backward, gradient clipping at
1.0, optimizer step, zero_grad: the pieces `sdtrain/train/loop.py` runs, without data loading. The variants run
interleaved (one step each per round, the order rotating every round), so drift of the machine hits them alike;
besides the ratio of the medians, the table gives the median (and range) of the ratios within each round.

Time: `--clock process` (CPU time of the process; use it with `--threads 1` on a shared CPU) or wall; on CUDA wall
time between synchronizations. Memory on CPU: the peak resident set size (RSS, sampled every millisecond in an
untimed step per variant after `malloc_trim`) and, as the rise in the step, the peak of the tensor memory that
PyTorch's allocator holds above the level before the step (from torch.profiler's allocation events, in one more
untimed step: exact and repeatable, where RSS moves by a few hundred MiB with the C allocator's state). On CUDA:
`torch.cuda.max_memory_allocated` of every timed step, as the peak and as the rise above the step's start. "optimizer" is the CPU time of
gradient clipping, the optimizer step and zero_grad inside the step (on CUDA: the host time to queue them).

    nice python3 scripts/bench_train.py --arch sd15 --resolution 256 512 --threads 1 --clock process
    python3 scripts/bench_train.py --device cuda --arch sdxl --resolution 1024 --dtype bf16 \
        --gradient-checkpointing --optimizer AdamW8bit
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import statistics
import sys
import threading
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench_adapters, beside this script

VARIANTS = ("lora", "dora-out", "dora-in", "peft-dora")
CAPTION = "a photo of sks person standing in a garden, detailed face, soft light"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="sd15", choices=["sd15", "sdxl", "tiny-sd15", "tiny-sdxl"],
                   help="tiny-*: sdtrain's tiny test models (a smoke test of this script; their figures mean nothing)")
    p.add_argument("--resolution", type=int, nargs="+", default=[256])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--preset", default="attn-mlp", choices=["attn", "attn-mlp", "full"])
    p.add_argument("--text-encoder", default="frozen", choices=["train", "frozen"],
                   help="train: adapters in the text encoders too (network.train_text_encoder; off by default, as "
                        "in sdtrain's config)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--optimizer", default="AdamW", help="an optimizer.type of sdtrain (AdamW, AdamW8bit, ...)")
    p.add_argument("--steps", type=int, nargs="+", default=[5],
                   help="timed rounds (one step of every variant each); one value, or one per --resolution")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument("--memory-steps", type=int, default=1, help="CPU: untimed steps per variant with RSS sampling")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"],
                   help="base weights and autocast dtype (adapters stay fp32); default fp32 on CPU, bf16 on CUDA")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--clock", choices=["process", "wall"], default="process")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the raw step times and memory to this file")
    args = p.parse_args(argv)
    if len(args.steps) not in (1, len(args.resolution)):
        p.error("--steps takes one value or one per --resolution")
    args.steps = dict(zip(args.resolution, args.steps * len(args.resolution) if len(args.steps) == 1 else args.steps))
    if args.dtype is None:
        args.dtype = "bf16" if args.device == "cuda" else "fp32"
    if args.device == "cuda":
        args.clock = "wall"
    return args


# ---------------------------------------------------------------- models


def configs(arch):
    if arch.startswith("tiny-"):
        from sdtrain.models.tiny import tiny_configs

        return arch[5:], *tiny_configs(arch[5:])
    from sdtrain.train.plan import reference_configs

    return arch, *reference_configs(arch)


def build_models(args):
    """(family, UNet, [text encoders], [tokenizers]) with random weights, frozen, in train mode."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from sdtrain.models.clip_tokenizer import build_clip_tokenizer

    family, unet_config, te_configs = configs(args.arch)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    torch.manual_seed(args.seed)
    with torch.device(args.device):
        unet = UNet2DConditionModel(**unet_config)
        encoders = [(CLIPTextModelWithProjection if family == "sdxl" and i == 1 else CLIPTextModel)(config)
                    for i, config in enumerate(te_configs)]
    for model in [unet, *encoders]:
        model.to(dtype).requires_grad_(False).train()
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        for encoder in encoders:
            encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    tokenizers = [build_clip_tokenizer()] + ([build_clip_tokenizer(pad_token="!")] if family == "sdxl" else [])
    return family, unet, encoders, tokenizers


def _parent(root, path):
    parent, _, attr = path.rpartition(".")
    return (root.get_submodule(parent) if parent else root), attr


class Variant:
    """One adapter variant: its wrappers (swapped into the models for its steps), parameters and optimizer."""

    def __init__(self, name, layers, params, args):
        from sdtrain.train.optim import build_optimizer

        self.name, self.layers, self.params = name, layers, params
        self.optimizer = build_optimizer([{"params": params, "lr": 1e-4, "name": "all"}], args.optimizer, 1e-4)
        self.times, self.memory, self.optimizer_times = [], [], []

    def swap_in(self):
        for parent, attr, module, _ in self.layers:
            setattr(parent, attr, module)

    def swap_out(self):
        for parent, attr, _, base in self.layers:
            setattr(parent, attr, base)


def build_variant(name, family, unet, encoders, args):
    from sdtrain.adapters.inject import NetworkSpec, inject_adapters, plan_injection

    spec = NetworkSpec(type="lora" if name == "lora" else "dora", rank=args.rank, preset=args.preset,
                       decompose_axis="input" if name == "dora-in" else "output",
                       train_text_encoder=args.text_encoder == "train")
    roots = {"unet": unet, **{f"te{i + 1}": te for i, te in enumerate(encoders)}}
    layers, params = [], []
    if name == "peft-dora":
        import peft
        from peft.tuners.lora import Conv2d as PeftConv2d
        from peft.tuners.lora import Linear as PeftLinear

        for entry in plan_injection(unet, encoders, family, spec):
            parent, attr = _parent(roots[entry.component], entry.module_path)
            base = getattr(parent, attr)
            rank, alpha = spec.rank_alpha(entry.kind)
            config = peft.LoraConfig(r=rank, lora_alpha=alpha, use_dora=True, lora_dropout=0.0)
            layer = (PeftLinear if entry.kind == "linear" else PeftConv2d)(base, "default", config, r=rank,
                                                                            lora_alpha=alpha)
            own = [p for n, p in layer.named_parameters() if not n.startswith("base_layer.")]
            for p in own:  # adapters in fp32 over a low-precision base, as sdtrain's are
                p.data = p.data.float()
                p.requires_grad_(True)
            layers.append((parent, attr, layer, base))
            params += own
    else:
        adapters = inject_adapters(unet, encoders, family, spec)
        for kohya, module in adapters.modules.items():
            component, path = adapters.module_paths[kohya]
            parent, attr = _parent(roots[component], path)
            layers.append((parent, attr, module, module.base))
        params = adapters.parameters()
    variant = Variant(name, layers, params, args)
    variant.swap_out()
    return variant


# ---------------------------------------------------------------- one training step


def make_batches(family, resolution, args, count):
    """`count` fixed batches (latents, noise, timesteps, SDXL time ids), the same for every variant."""
    gen = torch.Generator().manual_seed(args.seed + resolution)
    side = resolution // 8
    batches = []
    for _ in range(count):
        latents = torch.randn(args.batch, 4, side, side, generator=gen)
        noise = torch.randn(latents.shape, generator=gen)
        timesteps = torch.randint(0, 1000, (args.batch,), generator=gen)
        batches.append([t.to(args.device) for t in (latents, noise, timesteps)])
    return batches


class Step:
    """The training step of one resolution (see the module docstring)."""

    def __init__(self, family, unet, encoders, tokenizers, resolution, args):
        from diffusers import DDPMScheduler

        from sdtrain.train.conditioning import sdxl_add_time_ids

        self.family, self.unet, self.encoders, self.tokenizers, self.args = family, unet, encoders, tokenizers, args
        self.scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                       beta_schedule="scaled_linear")
        self.time_ids = sdxl_add_time_ids((resolution, resolution), (0, 0), (resolution, resolution),
                                          device=args.device) if family == "sdxl" else None
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.dtype)
        self.amp = (lambda: torch.autocast(args.device, dtype=dtype)) if dtype else contextlib.nullcontext
        self.weight_dtype = dtype or torch.float32
        self.optimizer_seconds = 0.0

    def __call__(self, variant, batch):
        from sdtrain.train.conditioning import encode_prompts, unet_added_cond_kwargs

        latents, noise, timesteps = batch
        train_te = self.args.text_encoder == "train"
        with self.amp(), torch.set_grad_enabled(train_te):
            cond = encode_prompts(self.family, self.tokenizers, self.encoders, [CAPTION] * latents.shape[0])
        noisy = self.scheduler.add_noise(latents, noise, timesteps).to(self.weight_dtype)
        added = unet_added_cond_kwargs(cond, self.time_ids) if self.family == "sdxl" else None
        with self.amp():
            pred = self.unet(noisy, timesteps, encoder_hidden_states=cond.prompt_embeds, added_cond_kwargs=added).sample
        loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        start = time.process_time()
        torch.nn.utils.clip_grad_norm_(variant.params, 1.0)
        variant.optimizer.step()
        variant.optimizer.zero_grad(set_to_none=True)
        self.optimizer_seconds = time.process_time() - start


# ---------------------------------------------------------------- measuring


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _trim():
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def rss_peak(fn) -> tuple[int, int]:
    """(RSS before, peak RSS during) one call of fn, sampled every millisecond in a thread."""
    _trim()
    before = peak = _rss()
    done = threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _rss())
            time.sleep(0.001)

    thread = threading.Thread(target=sample)
    thread.start()
    try:
        fn()
    finally:
        done.set()
        thread.join()
    return before, max(peak, _rss())


def timed(fn, args) -> tuple[float, tuple[int, int] | None]:
    """(seconds, (memory before, peak) on CUDA else None) of one call of fn."""
    if args.device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        return time.perf_counter() - start, (before, torch.cuda.max_memory_allocated())
    clock = time.process_time if args.clock == "process" else time.perf_counter
    start = clock()
    fn()
    return clock() - start, None


def run_resolution(family, unet, encoders, tokenizers, variants, resolution, args):
    step = Step(family, unet, encoders, tokenizers, resolution, args)
    rounds = args.warmup + args.steps[resolution]
    batches = make_batches(family, resolution, args, rounds + args.memory_steps)
    for v in variants:
        v.times, v.memory, v.optimizer_times = [], [], []
    for r in range(rounds):
        order = variants[r % len(variants):] + variants[:r % len(variants)]
        for v in order:
            v.swap_in()
            try:
                seconds, memory = timed(lambda: step(v, batches[r]), args)
            finally:
                v.swap_out()
            if r >= args.warmup:
                v.times.append(seconds)
                v.optimizer_times.append(step.optimizer_seconds)
                if memory:
                    v.memory.append(memory)
            print(f"  {resolution} px round {r}{' (warm-up)' if r < args.warmup else ''} {v.name:9s} "
                  f"{seconds:8.2f} s", file=sys.stderr, flush=True)
    tensor_peaks = {}
    if args.device == "cpu":
        from bench_adapters import cpu_tensor_peak

        for m in range(args.memory_steps):
            for v in variants:
                v.swap_in()
                try:
                    v.memory.append(rss_peak(lambda: step(v, batches[rounds + m])))
                    if m == 0:  # the allocation events do not depend on the machine: one step is enough
                        tensor_peaks[v.name] = cpu_tensor_peak(lambda: step(v, batches[rounds]))
                finally:
                    v.swap_out()
    return {v.name: {"times": list(v.times), "memory": list(v.memory), "optimizer": list(v.optimizer_times),
                     "tensor_peak": tensor_peaks.get(v.name)} for v in variants}


def table(results, names) -> str:
    """Markdown table: times and their ratios to LoRA, optimizer time, memory and its ratios to LoRA."""
    gib = 2 ** 30
    lines = ["| variant | median (s) | min (s) | max (s) | median / LoRA | per-round ratio: median (range) | min / LoRA "
             "| optimizer (ms) | peak (GiB) | peak / LoRA | rise in the step (GiB) | rise / LoRA |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def memory(name):
        """(peak, rise above the level before the step): RSS or CUDA; on CPU the rise is the tensor peak."""
        result = results[name]
        if not result["memory"]:
            return float("nan"), float("nan")
        peak = min(p for _, p in result["memory"])
        rise = result["tensor_peak"] if result.get("tensor_peak") else min(p - b for b, p in result["memory"])
        return peak, rise

    lora = results["lora"]["times"]
    lora_peak, lora_rise = memory("lora")
    for name in names:
        times = results[name]["times"]
        med = statistics.median(times)
        peak, rise = memory(name)
        opt = statistics.median(results[name]["optimizer"]) * 1e3
        rounds = [t / t_lora for t, t_lora in zip(times, lora)]
        lines.append(f"| {name} | {med:.2f} | {min(times):.2f} | {max(times):.2f} | {med / statistics.median(lora):.3f} "
                     f"| {statistics.median(rounds):.3f} ({min(rounds):.3f}–{max(rounds):.3f}) "
                     f"| {min(times) / min(lora):.3f} | {opt:.1f} | {peak / gib:.2f} | {peak / lora_peak:.3f} "
                     f"| {rise / gib:.3f} | {rise / lora_rise:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter(), time.process_time()
    family, unet, encoders, tokenizers = build_models(args)
    variants = [build_variant(name, family, unet, encoders, args) for name in args.variants]
    counts = {v.name: len(v.layers) for v in variants}
    results = {}
    for resolution in args.resolution:
        results[resolution] = run_resolution(family, unet, encoders, tokenizers, variants, resolution, args)
    wall, cpu = time.perf_counter() - started[0], time.process_time() - started[1]
    device = (torch.cuda.get_device_name() if args.device == "cuda"
              else f"CPU, {torch.get_num_threads()} thread(s), {args.clock} clock")
    print(f"{args.arch} (random weights), batch {args.batch}, rank {args.rank}, preset {args.preset}, text encoders "
          f"{args.text_encoder}, {args.optimizer}, {args.dtype}, gradient checkpointing "
          f"{'on' if args.gradient_checkpointing else 'off'}; {device}; torch {torch.__version__}; adapted layers "
          f"{counts}; median of {args.steps} (per resolution) interleaved rounds after {args.warmup} warm-up; "
          f"run took {wall:.0f} s wall, {cpu:.0f} s CPU")
    for resolution, result in results.items():
        print(f"\n{resolution} px\n")
        print(table(result, [v.name for v in variants]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "layers": counts, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
