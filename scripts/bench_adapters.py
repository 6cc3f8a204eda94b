"""Forward+backward time and peak memory of one adapted layer: plain, LoRA, sdtrain DoRA, PEFT DoRA.

A secondary tool beside the full-size training step (scripts/bench_train.py), for looking at one layer kind.
Shapes are SDXL at 1024² (batch 1) plus the CLIP-L/G query projections. Variants of a shape are
timed interleaved (round-robin, rotating order) so that CPU contention hits them alike; times are
medians after warm-up. Peak memory is the largest amount of tensor memory allocated during one
forward+backward above what existed before it (input, output gradient and weights excluded):
on CUDA torch.cuda.max_memory_allocated, on CPU the running sum of the allocation/free events that
torch.profiler(profile_memory=True) records from PyTorch's CPU allocator (library-internal
scratch buffers, e.g. oneDNN's, are not seen).

    python scripts/bench_adapters.py --threads 2 --repeats 5 --warmup 1
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import statistics
import sys
import time

import torch
from torch import nn

from sdtrain.adapters.dora import DoRAConv2d, DoRALinear

# name -> (kind, in, out, tokens or (H, W))
SHAPES = {
    "attn1.q 640 x4096": ("linear", 640, 640, 4096),
    "attn1.q 1280 x1024": ("linear", 1280, 1280, 1024),
    "attn2.kv 2048>640 x77": ("linear", 2048, 640, 77),
    "attn2.kv 2048>1280 x77": ("linear", 2048, 1280, 77),
    "ff.in 1280>10240 x1024": ("linear", 1280, 10240, 1024),
    "ff.out 5120>1280 x1024": ("linear", 5120, 1280, 1024),
    "conv3x3 640 @64²": ("conv", 640, 640, (64, 64)),
    "conv3x3 1280 @32²": ("conv", 1280, 1280, (32, 32)),
    "clip-l q 768 x77": ("linear", 768, 768, 77),
    "clip-g q 1280 x77": ("linear", 1280, 1280, 77),
}
QUICK_SHAPES = {
    "quick linear 64 x256": ("linear", 64, 64, 256),
    "quick conv 32 @16²": ("conv", 32, 32, (16, 16)),
}
VARIANTS = ("plain", "lora", "dora-out", "dora-in", "peft-dora")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ranks", type=int, nargs="+", default=[16, 32])
    p.add_argument("--repeats", type=int, default=5, help="timed runs per variant (median), at least")
    p.add_argument("--min-time", type=float, default=1.0,
                   help="raise the repeats of fast shapes so each variant is timed for about this many seconds")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per variant first")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--clock", choices=("wall", "process"), default="wall",
                   help="process: CPU time of this process (robust on a shared CPU with --threads 1)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="base weights and activations; non-fp32 runs under autocast, adapters stay fp32")
    p.add_argument("--shapes", nargs="*", default=None, help="keep shapes whose name contains any of these")
    p.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--quick", action="store_true", help="two tiny shapes, 1 repeat (smoke test)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    return p.parse_args(argv)


def build_base(kind, fan_in, out, device, dtype, seed=0):
    torch.manual_seed(seed)
    layer = nn.Linear(fan_in, out) if kind == "linear" else nn.Conv2d(fan_in, out, 3, padding=1)
    return layer.to(device=device, dtype=dtype).requires_grad_(False)


def build_variant(variant, base, rank):
    """A module computing the variant's layer, with B random so the adapter is not at its init."""
    base = copy.deepcopy(base)
    if variant == "plain":
        return base
    if variant == "peft-dora":
        import peft

        holder = nn.Module()
        holder.layer = base
        config = peft.LoraConfig(r=rank, lora_alpha=rank, target_modules=["layer"], use_dora=True, lora_dropout=0.0)
        module = peft.get_peft_model(holder, config).base_model.model.layer
        up = module.lora_B["default"].weight
    else:
        cls = DoRALinear if isinstance(base, nn.Linear) else DoRAConv2d
        axis = "input" if variant == "dora-in" else "output"
        module = cls(base, rank, float(rank), decompose=variant.startswith("dora"), axis=axis)
        up = module.lora_up.weight
    with torch.no_grad():
        up.normal_(0, 1e-3)
    return module


def make_input(kind, fan_in, out, size, device, dtype):
    torch.manual_seed(1)
    if kind == "linear":
        x_shape, y_shape = (1, size, fan_in), (1, size, out)
    else:
        x_shape, y_shape = (1, fan_in, *size), (1, out, *size)
    x = torch.randn(x_shape, device=device, dtype=dtype).requires_grad_(True)
    grad = torch.randn(y_shape, device=device, dtype=dtype)
    return x, grad


def simulate_update(module):
    """Mark the trainable parameters as changed, as an optimizer step does (adding 0 bumps their version counters):
    sdtrain keeps 1/‖V‖ until A or B change, and every training step changes them."""
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(0.0)


def step(module, x, grad, amp):
    """One forward+backward; gradients set to None first (as optimizer.zero_grad does)."""
    x.grad = None
    for p in module.parameters():
        p.grad = None
    with amp():
        y = module(x)
    y.backward(grad.to(y.dtype))


def timed(module, x, grad, amp, device, clock=time.perf_counter):
    simulate_update(module)
    if device == "cuda":
        torch.cuda.synchronize()
    start = clock()
    step(module, x, grad, amp)
    if device == "cuda":
        torch.cuda.synchronize()
    return clock() - start


def peak_memory(module, x, grad, amp, device):
    """Peak bytes allocated during one step above the allocation level before it."""
    simulate_update(module)
    x.grad = None
    for p in module.parameters():
        p.grad = None
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step(module, x, grad, amp)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    return cpu_tensor_peak(lambda: step(module, x, grad, amp))


def cpu_tensor_peak(fn) -> int:
    """Peak of the tensor memory that PyTorch's CPU allocator holds during fn(), above the level before it: the
    running sum of the allocation and free events that torch.profiler(profile_memory=True) records."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    sizes = []

    def walk(event):
        fields = event.extra_fields
        if type(fields).__name__.endswith("Allocation") and fields.device.type == "cpu":
            sizes.append((event.start_time_ns, fields.alloc_size))
        for child in event.children:
            walk(child)

    for root in prof.profiler.kineto_results.experimental_event_tree():
        walk(root)
    level = peak = 0
    for _, size in sorted(sizes):
        level += size
        peak = max(peak, level)
    return peak


def geomean(values):
    values = [v for v in values if v and math.isfinite(v)]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def run(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = args.device, getattr(torch, args.dtype)
    clock = time.process_time if args.clock == "process" else time.perf_counter
    if args.quick:
        shapes, args.repeats, args.warmup, args.min_time, args.ranks = QUICK_SHAPES, 1, 1, 0.0, args.ranks[:1]
    else:
        shapes = {k: v for k, v in SHAPES.items() if not args.shapes or any(s in k for s in args.shapes)}
    variants = list(args.variants)
    if "peft-dora" in variants:
        try:
            import peft  # noqa: F401
        except ImportError:
            variants.remove("peft-dora")
    if dtype == torch.float32:
        amp = contextlib.nullcontext
    else:
        amp = lambda: torch.autocast(device, dtype=dtype)  # noqa: E731
    results = []  # (shape, rank, variant, seconds, bytes)
    for name, (kind, fan_in, out, size) in shapes.items():
        base = build_base(kind, fan_in, out, device, dtype)
        x, grad = make_input(kind, fan_in, out, size, device, dtype)
        for rank in args.ranks:
            modules = {v: build_variant(v, base, rank) for v in variants}
            slowest = 0.0
            for _ in range(args.warmup):
                for v in variants:
                    slowest = max(slowest, timed(modules[v], x, grad, amp, device, clock))
            repeats = args.repeats
            if slowest > 0:
                repeats = max(repeats, min(200, math.ceil(args.min_time / slowest)))
            times = {v: [] for v in variants}
            for r in range(repeats):
                order = variants[r % len(variants):] + variants[: r % len(variants)]
                for v in order:
                    times[v].append(timed(modules[v], x, grad, amp, device, clock))
            for v in variants:
                mem = float("nan") if args.no_memory else peak_memory(modules[v], x, grad, amp, device)
                results.append((name, rank, v, statistics.median(times[v]), mem))
                print(f"  {name:26s} r={rank:<3d} {v:10s} x{repeats:<4d} {1e3 * results[-1][3]:9.1f} ms "
                      f"{results[-1][4] / 2**20:9.1f} MiB", file=sys.stderr, flush=True)
            del modules
    return variants, results


def table(variants, results, ranks, value_index, unit, scale, fmt):
    """Markdown table of one measure with ratios to LoRA and geomean rows per rank and overall."""
    by_key = {(n, r, v): res for n, r, v, *res in [(a, b, c, d, e) for a, b, c, d, e in results]}
    names = list(dict.fromkeys(n for n, *_ in results))
    head = ["shape", "rank"] + [f"{v} ({unit})" for v in variants]
    others = [v for v in variants if v not in ("lora",)]
    head += [f"{v} / lora" for v in others if v != "plain"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    ratios = {}
    for rank in ranks:
        for n in names:
            vals = {v: by_key[(n, rank, v)][value_index] for v in variants if (n, rank, v) in by_key}
            if not vals:
                continue
            row = [n, str(rank)] + [fmt.format(vals[v] * scale) for v in variants]
            for v in others:
                if v == "plain":
                    continue
                ratio = vals[v] / vals["lora"] if "lora" in vals and vals["lora"] else float("nan")
                ratios.setdefault((rank, v), []).append(ratio)
                row.append(f"{ratio:.3f}")
            lines.append("| " + " | ".join(row) + " |")
    for rank in list(ranks) + ["all"]:
        row = [f"**geomean**", str(rank)] + [""] * len(variants)
        for v in others:
            if v == "plain":
                continue
            vals = [x for (r, vv), xs in ratios.items() if vv == v and (rank == "all" or r == rank) for x in xs]
            row.append(f"**{geomean(vals):.3f}**")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    variants, results = run(args)
    ranks = args.ranks
    print(f"torch {torch.__version__}, device {args.device}, dtype {args.dtype}, threads {torch.get_num_threads()}, "
          f"repeats {args.repeats} (min time {args.min_time:g} s), warmup {args.warmup}, clock {args.clock}\n")
    print(f"Forward+backward time (median, {'CPU time of the process' if args.clock == 'process' else 'wall clock'}):\n")
    print(table(variants, results, ranks, 0, "ms", 1e3, "{:.1f}"))
    if not args.no_memory:
        print("\nPeak memory above the pre-step level:\n")
        print(table(variants, results, ranks, 1, "MiB", 1 / 2**20, "{:.1f}"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
