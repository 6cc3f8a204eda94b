"""Data-parallel training through torchrun/accelerate on 2 CPU processes (gloo)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from helpers_training import run, write_config

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
    accelerate skips the all-reduce of every wrapped model until the last one); stopped at step 3 and resumed,
    the 2-process run ends bit-identical to the straight one."""
    steps = 6
    # SGD: the update is linear in the gradient, so the all-reduce's fp32 round-off stays round-off (Adam and the
    # 8-bit optimizers normalise near-zero gradient entries and turn last-bit differences into visible ones)
    # no weight decay: DDP hands zero gradients (not none) to the adapters of CLIP-L's last layer, which SDXL's
    # conditioning never reads, and weight decay would then shrink them in the 2-process run only
    options = ["optimizer.type=SGD", "optimizer.lr=2.0", "optimizer.weight_decay=0", "network.train_text_encoder=true",
               "train.gradient_accumulation_steps=2"]
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

    resumed = write_config(tmp_path, "resumed", count=4, steps=steps)
    torchrun(resumed, "--set", "train.batch_size=1", *sets, "--set", "train.max_steps=3")
    done = torchrun(resumed, "--set", "train.batch_size=1", *sets, "--resume", "latest")
    assert "resumed from" in done.stdout and "at step 3" in done.stdout
    again = load_file(str(tmp_path / "resumed" / "run.safetensors"))
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
