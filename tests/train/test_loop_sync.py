"""The training loop reads nothing from the device between log steps (on a GPU: no host-device synchronization),
and its NaN/inf guard still stops a diverged run, at the latest at the next log step or save, saving nothing."""

from __future__ import annotations

import math
import traceback

import pytest

from helpers_sync import count_syncs
from helpers_training import write_config
from sdtrain.config import load_config
from sdtrain.train.loop import Trainer, TrainingDiverged


def host_resident(name, tensor) -> bool:
    """A read of a tensor that stays on the host in a CUDA run too, so that it waits for nothing: torch optimizers'
    step counters and the DataLoader's base seed (drawn on the CPU when a loader iterator starts)."""
    if name != "item" or tensor.device.type != "cpu" or tensor.dim() != 0:
        return False
    files = [frame.filename for frame in traceback.extract_stack(limit=8)]
    return any("torch/optim/" in f or f.endswith("torch/utils/data/dataloader.py") for f in files)


def counted_run(trainer):
    """Run a set-up `trainer`. Returns ({optimizer step: host reads}, [(step, reads) of each divergence check],
    the reads themselves). A step's reads are those of the optimizer step and of the loop's work after it (loss
    bookkeeping, the saves-due checks, callbacks, the stop check); the checks and saves read on purpose and are
    counted apart (`check_diverged`) or not at all (`save_adapter`, `save_state`)."""
    state = {"step": None}
    per_step, checks = {}, []

    def ignore(name, tensor):
        if state["step"] is None or host_resident(name, tensor):
            return True
        per_step[state["step"]] = per_step.get(state["step"], 0) + 1
        return False

    def paused(method, record=None):
        def call(*args, **kwargs):
            step, state["step"] = state["step"], None
            before = len(calls)
            try:
                return method(*args, **kwargs)
            finally:
                state["step"] = step
                if record is not None:
                    record.append((trainer.global_step, len(calls) - before))

        return call

    optimizer_step = trainer.optimizer_step

    def counted_step(index):
        state["step"] = index + 1
        per_step.setdefault(index + 1, 0)
        return optimizer_step(index)

    with count_syncs(ignore=ignore) as calls:
        trainer.optimizer_step = counted_step
        check = trainer.check_diverged

        def checked(*args, **kwargs):  # counts its own reads, apart from the steps'
            state_step, state["step"] = state["step"], "check"
            before = per_step.get("check", 0)
            try:
                return check(*args, **kwargs)
            finally:
                checks.append((trainer.global_step, per_step.get("check", 0) - before))
                state["step"] = state_step

        trainer.check_diverged = checked
        trainer.save_adapter = paused(trainer.save_adapter)
        trainer.save_state = paused(trainer.save_state)
        try:
            trainer.run()
        finally:
            state["step"] = None
    per_step.pop("check", None)
    return per_step, checks, calls


def test_steps_between_logs_read_nothing_from_the_device(tmp_path):
    """8 steps of 2 accumulated batches (DoRA on the UNet and both text encoders, live caption encoding with
    augmentation, clipping, AdamW8bit, batches loaded in the main process so that loading is counted too), logging
    every 4 steps: no step reads a tensor on the host; each log reads the steps' values in one transfer."""
    config = write_config(tmp_path, "sync", steps=8)
    cfg = load_config(config, ["log.log_every_n_steps=4", "save.state_every_n_steps=0", "data.num_workers=0",
                               "train.gradient_accumulation_steps=2", "network.train_text_encoder=true"])
    trainer = Trainer(cfg, quiet=True)
    trainer.setup()
    per_step, checks, calls = counted_run(trainer)
    stacks = "".join(f"{name}:\n{stack}" for name, _, stack in calls[:3])
    assert per_step == {step: 0 for step in range(1, 9)}, stacks
    assert checks[:2] == [(4, 1), (8, 1)]  # the log steps: one read each (losses, grad norms, weights' check)
    assert all(reads == 1 for _, reads in checks)  # and the saves' checks at the end
    assert len(trainer.result.losses) == 8 and all(math.isfinite(loss) for loss in trainer.result.losses)
    rows = (trainer.output_dir / "loss_log.csv").read_text().splitlines()[1:]
    assert [float(row.split(",")[1]) for row in rows] == trainer.result.losses


def poisoned(trainer, global_batch: int):
    """Make the loss of one global batch NaN (its gradients then make the weights NaN)."""
    loss_of = trainer.micro_batch_loss

    def micro_batch_loss(batch):
        loss = loss_of(batch)
        return loss * math.nan if batch.global_index == global_batch else loss

    trainer.micro_batch_loss = micro_batch_loss


@pytest.mark.parametrize("save_every,stopped_at", [(0, 5), (3, 3)], ids=["next-log", "next-save"])
def test_non_finite_loss_stops_at_the_next_log_or_save_and_saves_nothing(tmp_path, save_every, stopped_at):
    """A NaN loss at step 2, logs every 5 steps: the run stops at step 5, or at the save due at step 3, naming
    step 2 and the last good save; no adapter or state is written after step 2."""
    config = write_config(tmp_path, "nan", steps=8)
    cfg = load_config(config, ["log.log_every_n_steps=5", f"save.every_n_steps={save_every}",
                               "save.state_every_n_steps=0", "optimizer.type=AdamW"])
    trainer = Trainer(cfg, quiet=True)
    trainer.setup()
    poisoned(trainer, global_batch=1)  # step 2
    with pytest.raises(TrainingDiverged, match=r"loss is nan at step 2: .*unet.*no adapter was saved yet"):
        trainer.run()
    assert trainer.global_step == stopped_at
    assert not list(trainer.output_dir.glob("*.safetensors")) and trainer.result.state is None
    assert math.isfinite(trainer.result.losses[0]) and math.isnan(trainer.result.losses[1])
