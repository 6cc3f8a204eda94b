"""Before/after grid of a run: its config's sample prompts rendered by the base model and by the base with the
run's adapter merged in, with the same sampler, seeds and settings as the run's own samples.

    python3 scripts/demo_grid.py [--config configs/demo.toml] [--adapter output/demo/demo.safetensors]
                                 [--out docs/figures/demo-before-after.png] [--seeds 2]

Rows: "before" and "after" for each seed (a prompt's --d, then --d + 100, ...); columns: the prompts.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO))

import shapes_dataset as shapes  # noqa: E402


def render(cfg, base, prompts: list[dict]):
    from PIL import Image

    from sdtrain.train.sampling import sample_images

    with tempfile.TemporaryDirectory() as tmp:
        paths = sample_images(base.arch, unet=base.unet, vae=base.vae, text_encoders=base.text_encoders,
                              tokenizers=base.tokenizers, scheduler_config=base.noise_scheduler.config,
                              prompts=prompts, sampler=cfg.sample.sampler, out_dir=tmp, step=0,
                              clip_skip=cfg.model.clip_skip)
        return [Image.open(p).convert("RGB") for p in paths[:len(prompts)]]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "demo.toml")
    parser.add_argument("--adapter", type=Path, default=REPO / "output" / "demo" / "demo.safetensors")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "figures" / "demo-before-after.png")
    parser.add_argument("--seeds", type=int, default=2, help="rows of before/after pairs")
    args = parser.parse_args(argv)

    from sdtrain.config import load_config, parse_prompt_line
    from sdtrain.export.adapter_file import load_adapter
    from sdtrain.export.merge import merge_into_base
    from sdtrain.models.loading import load_base

    cfg = load_config(args.config)
    defaults = {"steps": cfg.sample.steps, "cfg": cfg.sample.cfg_scale, "seed": cfg.train.seed if cfg.sample.seed is None else cfg.sample.seed}
    lines = [{**defaults, **{k: v for k, v in parse_prompt_line(line).items() if v is not None}}
             for line in cfg.sample.prompts]
    seeded = [[{**p, "seed": int(p["seed"]) + 100 * k} for p in lines] for k in range(args.seeds)]
    base = load_base(cfg.model.path)
    before = [render(cfg, base, prompts) for prompts in seeded]
    merge_into_base(load_adapter(args.adapter), base)
    after = [render(cfg, base, prompts) for prompts in seeded]
    rows = [row for pair in zip(before, after) for row in pair]
    labels = [label for k in range(args.seeds) for label in ("before", "after")]
    path = shapes.contact_sheet(rows, args.out, [p["prompt"] for p in lines], labels, scale=2)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
