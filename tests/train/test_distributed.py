"""Data-parallel training through torchrun/accelerate on 2 CPU processes (gloo)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from helpers_training import make_dataset, run, write_config, write_half_masks

pytestmark = pytest.mark.skipif(not hasattr(torch.distributed, "is_gloo_available")
                                or not torch.distributed.is_gloo_available(), reason="needs gloo")


def torchrun(config, *args, expect_ok=True):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(29500 + os.getpid() % 1000), "-m", "sdtrain", "train", str(config), *args]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    if expect_ok:
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done


def test_two_processes_match_one_process_with_double_batch_and_resume(tmp_path):
    """2 processes x batch 1 train what 1 process trains at batch 2 (text encoders too, accumulating 2 batches:
    accelerate skips the all-reduce of every wrapped model until the last one; with the per-sample noise,
    timestep and loss-weight options and 150-token captions); stopped at step 3 and resumed,
    the 2-process run ends bit-identical to the straight one."""
    steps = 6
    # SGD: the update is linear in the gradient, so the all-reduce's fp32 round-off stays round-off (Adam and the
    # 8-bit optimizers normalise near-zero gradient entries and turn last-bit differences into visible ones)
    # no weight decay: DDP hands zero gradients (not none) to the adapters of CLIP-L's last layer, which SDXL's
    # conditioning never reads, and weight decay would then shrink them in the 2-process run only
    # a validation folder (12 fixed samples shared out between the processes), loss masks on the training images
    # and an EMA (each process keeps its own, the same); adapter dropout and a [[network.blocks]] entry: masks are
    # drawn per global batch and sample slot, so the processes draw what the single process draws; module dropout
    # leaves adapters without gradients
    held = make_dataset(tmp_path / "held", count=3)
    masks = write_half_masks(tmp_path / "masks", ["img0", "img1", "img2"])
    options = ["optimizer.type=SGD", "optimizer.lr=2.0", "optimizer.weight_decay=0", "network.train_text_encoder=true",
               "train.gradient_accumulation_steps=2",
               # per-sample draws and weights: the same on any process count
               "train.multires_noise_iterations=3", "train.ip_noise_gamma=0.1", "train.timestep_sampling=logit_normal",
               "train.timestep_shift=2", "train.debiased_estimation_loss=true", "model.max_token_length=150",
               "data.subsets.0.caption_prefix=sks,",
               f"validation.path={held}", "validation.every_n_steps=2",
               f"data.subsets.0.mask_path={masks}", "ema.enabled=true", "ema.decay=0.5", "ema.start_step=2",
               "network.dropout=0.2", "network.rank_dropout=0.3", "network.module_dropout=0.2",
               "network.blocks.0.pattern=lora_te2_*", "network.blocks.0.rank=2", "network.blocks.0.lr=1.0"]
    sets = [x for item in options for x in ("--set", item)]
    config = write_config(tmp_path, "ddp", count=4, steps=steps)
    done = torchrun(config, "--set", "train.batch_size=1", *sets)
    assert "all 2 processes hold identical adapter weights" in done.stdout
    assert "1 per device x 2 process(es) x 2 accumulation = 4 images" in done.stdout
    two = load_file(str(tmp_path / "ddp" / "run.safetensors"))

    single = run(write_config(tmp_path, "single", count=4, steps=steps), ["train.batch_size=2", *options])
    one = load_file(str(single.result.final_adapter))
    assert two.keys() == one.keys() and any(key.startswith("lora_te2_") for key in one)
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-5)
    moved = max(one[k].abs().max().item() for k in one if k.endswith("lora_up.weight"))
    assert moved > 1e-3  # lora_up starts at zero: training moved it 100x more than the tolerance
    losses = [float(line.split(",")[1]) for line in (tmp_path / "ddp" / "loss_log.csv").read_text().splitlines()[1:]]
    assert losses == pytest.approx(single.result.losses, rel=1e-4)
    validation = [line.split(",") for line in (tmp_path / "ddp" / "validation_log.csv").read_text().splitlines()[1:]]
    assert [int(step) for step, _ in validation] == [2, 4, 6]
    assert [float(loss) for _, loss in validation] == pytest.approx([v for _, v in single.result.validation], rel=1e-4)

    resumed = write_config(tmp_path, "resumed", count=4, steps=steps)
    torchrun(resumed, "--set", "train.batch_size=1", *sets, "--set", "train.max_steps=3")
    done = torchrun(resumed, "--set", "train.batch_size=1", *sets, "--resume", "latest")
    assert "resumed from" in done.stdout and "at step 3" in done.stdout
    again = load_file(str(tmp_path / "resumed" / "run.safetensors"))
    ema_two, ema_one = (load_file(str(tmp_path / folder / "run-ema.safetensors")) for folder in ("ddp", "single"))
    for key in ema_one:
        torch.testing.assert_close(ema_two[key], ema_one[key], rtol=1e-4, atol=1e-5)
    ema_again = load_file(str(tmp_path / "resumed" / "run-ema.safetensors"))
    assert all(torch.equal(ema_two[key], ema_again[key]) for key in ema_two)
    # the same validation values, plus the one the first run (max_steps = 3) computed after its last step
    resumed_rows = (tmp_path / "resumed" / "validation_log.csv").read_text().splitlines()
    straight_rows = (tmp_path / "ddp" / "validation_log.csv").read_text().splitlines()
    assert [row for row in resumed_rows if not row.startswith("3,")] == straight_rows
    for key in two:
        assert torch.equal(two[key], again[key]), key

    # a different process count is refused with a clear message
    with pytest.raises(Exception, match="trained with 2 process"):
        run(resumed, ["train.batch_size=1", *options, "train.max_steps=8"], resume="latest")


def test_unsynchronised_processes_are_detected(tmp_path):
    """Under torchrun on a CPU machine, a default Accelerator() does not join the process group: each process
    would train its own copy. sdtrain's check refuses that setup."""
    script = tmp_path / "naive.py"
    script.write_text("from accelerate import Accelerator\n"
                      "from sdtrain.train.accelerator import check_distributed\n"
                      "check_distributed(Accelerator())\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(30500 + os.getpid() % 1000), str(script)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode != 0
    assert "no gradient sync" in done.stderr


# The bound of 2 processes x batch 1 against 1 process x batch 2 with AdamW8bit (6 steps, lr 2e-3): the
# all-reduced mean gradient differs from the one-process mean in the last bits (another summation order);
# Adam divides by sqrt(v), so entries whose gradient is near zero turn that into visible update differences,
# and the 8-bit state's quantisation can move such an entry to a neighbouring code. Measured: a largest
# per-tensor relative difference ||two - one|| / ||one|| of 1.8e-4 (README, "Multi-GPU").
ADAMW8BIT_BOUND = 2e-3


def test_two_processes_adamw8bit_within_the_documented_bound(tmp_path):
    steps = 6
    config = write_config(tmp_path, "ddp8", count=4, steps=steps)
    torchrun(config, "--set", "train.batch_size=1", "--set", "save.state_every_n_steps=0")
    two = load_file(str(tmp_path / "ddp8" / "run.safetensors"))
    single = run(write_config(tmp_path, "single8", count=4, steps=steps),
                 ["train.batch_size=2", "save.state_every_n_steps=0"])
    one = load_file(str(single.result.final_adapter))
    assert two.keys() == one.keys()
    relative = {key: ((two[key].double() - one[key].double()).norm() / one[key].double().norm()).item()
                for key in one if one[key].double().norm() > 0}
    worst = max(relative.values())
    print(f"AdamW8bit, 2 processes vs 1: largest per-tensor relative difference {worst:.3g}, "
          f"{sum(r > 1e-4 for r in relative.values())}/{len(relative)} tensors beyond 1e-4")
    assert worst <= ADAMW8BIT_BOUND, sorted(relative.items(), key=lambda kv: -kv[1])[:5]
    # the bound is small against what training moved: lora_up starts at zero
    moved = max(one[k].abs().max().item() for k in one if k.endswith("lora_up.weight"))
    assert moved > 1e-3
