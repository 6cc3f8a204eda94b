"""Training guards: NaN/inf stops with the step, group and last save named; --init-from a foreign file."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers_training import run, write_config
from sdtrain.config import load_config
from sdtrain.train.loop import Trainer, TrainerCallback, TrainingDiverged


class PoisonAt(TrainerCallback):
    def on_step_end(self, trainer, step, loss):
        if step == 3:
            with torch.no_grad():
                next(iter(trainer.adapters.parameters("unet"))).fill_(math.nan)


def test_nan_stops_with_step_group_and_last_save(tmp_path):
    config = write_config(tmp_path, "nan", steps=8)
    with pytest.raises(TrainingDiverged) as error:
        run(config, ["save.every_n_steps=2"], callbacks=[PoisonAt()])
    message = str(error.value)
    assert "at step 4" in message and "unet" in message and "run-step000002.safetensors" in message


def test_init_from_onetrainer_style_input_axis_file(tmp_path):
    """A file in OneTrainer's style (input axis, 1-D dora_scale, fp16, no alpha keys) initialises a run whose
    config says output axis: the file's network is used, its weights loaded exactly, the optimizer fresh."""
    source = run(write_config(tmp_path, "source", steps=3), ["network.decompose_axis=input"])
    tensors = load_file(str(source.result.final_adapter))
    foreign = {}
    for key, value in tensors.items():
        if key.endswith(".alpha"):
            continue  # OneTrainer may omit alpha: loaders then use alpha = rank (our files store alpha = rank)
        foreign[key] = value.flatten().half() if key.endswith(".dora_scale") else value.half()
    path = tmp_path / "onetrainer.safetensors"
    save_file(foreign, str(path))

    cfg = load_config(write_config(tmp_path, "continued", steps=2))
    trainer = Trainer(cfg, init_from=str(path), quiet=True)
    trainer.setup()
    assert trainer.spec.decompose_axis == "input"
    name = next(iter(trainer.adapters.modules))
    module = trainer.adapters.modules[name]
    torch.testing.assert_close(module.magnitude.detach(), foreign[f"{name}.dora_scale"].float(), rtol=0, atol=0)
    torch.testing.assert_close(module.lora_down.weight.detach(), foreign[f"{name}.lora_down.weight"].float(),
                               rtol=0, atol=0)
    assert not trainer.optimizer.state  # fresh optimizer state
    trainer.run()
    assert trainer.result.final_adapter.is_file()


class PoisonAndStopAt(TrainerCallback):
    """NaN into one unet parameter (`what` = "weights") or into one floating-point tensor of the optimizer state
    ("optimizer", the weights stay finite) after step `step` (after that step's saves); with `stop`, Ctrl+C then."""

    def __init__(self, step: int, stop: bool = False, what: str = "weights"):
        self.step, self.stop, self.what = step, stop, what

    def on_step_end(self, trainer, step, loss):
        if step == self.step:
            with torch.no_grad():
                if self.what == "weights":
                    next(iter(trainer.adapters.parameters("unet"))).fill_(math.nan)
                else:
                    state = next(iter(trainer.optimizer.state.values()))
                    next(v for v in state.values() if torch.is_tensor(v) and v.is_floating_point()).fill_(math.nan)
            if self.stop:
                trainer.request_stop("the test")


@pytest.mark.parametrize("what", ["weights", "optimizer"])
@pytest.mark.parametrize("case", ["last-step", "stop"])
def test_divergence_writes_nothing_and_names_the_last_finite_state(tmp_path, case, what):
    """Weights (or only the optimizer state) that turn NaN after the last step (no loss is computed after it:
    the final state is saved first), or before a stop's save (the state is saved first): the run raises
    TrainingDiverged (exit code 2), writes no adapter and no state, keeps the last finite state
    (save.keep_last_states = 1 would have deleted it) and names it exactly."""
    from sdtrain.train.divergence import non_finite_groups
    from sdtrain.train.state import complete_states, states_root

    config = write_config(tmp_path, "diverged", steps=8)
    callback = PoisonAndStopAt(8, what=what) if case == "last-step" else PoisonAndStopAt(7, stop=True, what=what)
    with pytest.raises(TrainingDiverged) as error:
        run(config, ["save.keep_last_states=1"], callbacks=[callback])
    assert error.value.exit_code == 2
    root = states_root(tmp_path / "diverged")
    last = root / "step-00000005"
    message = str(error.value)
    if what == "weights":
        assert "parameter group(s) unet hold NaN/inf" in message
    else:
        assert "1 optimizer state tensor(s) hold NaN/inf" in message and "parameter group" not in message
    assert f"the last finite training state is {last}: resume it with --resume {last}" in message
    assert [p.name for p in complete_states(root)[0]] == [last.name]
    assert all(torch.isfinite(t).all() for t in load_file(str(last / "adapters.safetensors")).values())
    assert not (tmp_path / "diverged" / "run.safetensors").exists()
    assert not list((tmp_path / "diverged").glob("run-step*.safetensors"))

    class Adapters:  # the check on its own: a finite adapter passes
        groups = {"a": "unet"}

        def parameters(self, group):
            return [torch.ones(3)]

    assert non_finite_groups(Adapters()) == []


class InfSecondMomentAt(TrainerCallback):
    """Sets one element of an AdamW second moment to +inf after step `step`: the next update of that element is
    m / (sqrt(inf) + eps) = 0, so the weights stay finite while the optimizer state does not."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, trainer, step, loss):
        if step == self.step:
            state = next(s for s in trainer.optimizer.state.values() if "exp_avg_sq" in s)
            state["exp_avg_sq"].view(-1)[0] = math.inf


def test_divergence_of_the_optimizer_alone_stops_a_periodic_adapter_save(tmp_path):
    """Finite weights over a non-finite optimizer state at a save where only the adapter is due (step 6 of
    save.every_n_steps = 2; states every 5): the adapter's own check stops the run with TrainingDiverged naming
    the optimizer state and the last finite state; no step-6 adapter is written."""
    config = write_config(tmp_path, "periodic", steps=8)
    with pytest.raises(TrainingDiverged) as error:
        run(config, ["save.every_n_steps=2", "optimizer.type=AdamW"], callbacks=[InfSecondMomentAt(5)])
    message = str(error.value)
    out = tmp_path / "periodic"
    assert "1 optimizer state tensor(s) hold NaN/inf" in message and "parameter group" not in message
    assert f"the adapter {out / 'run-step000006.safetensors'} was not written" in message
    assert f"the last finite training state is {out / 'states' / 'step-00000005'}" in message
    assert not (out / "run-step000006.safetensors").exists() and (out / "run-step000004.safetensors").is_file()


class OverflowFp16At(TrainerCallback):
    """Sets one lora_up weight to 1e5 (finite, above fp16's 65504) after step `step`."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, trainer, step, loss):
        if step == self.step:
            with torch.no_grad():
                next(p for n, p in trainer.adapters.named_parameters() if "lora_up" in n).view(-1)[0] = 1e5


def test_final_save_overflowing_fp16_keeps_the_state_and_resume_writes_the_adapter(tmp_path):
    """Finite weights above fp16's range at the last step: the final adapter (save.dtype = fp16) is refused, but
    the training state at the last step is saved first, and the message gives the command that writes the adapter
    from it with bf16. That command trains no step and writes the state's weights exactly."""
    from sdtrain.export.adapter_file import SaveDtypeOverflow, load_adapter
    from sdtrain.train.state import ADAPTERS, complete_states, states_root

    config = write_config(tmp_path, "overflow", steps=6)
    with pytest.raises(SaveDtypeOverflow) as error:
        run(config, ["save.dtype=fp16", "save.state_every_n_steps=0"], callbacks=[OverflowFp16At(6)])
    message = str(error.value)
    states = complete_states(states_root(tmp_path / "overflow"))[0]
    assert [p.name for p in states] == ["step-00000006"]
    assert f"The training state at step 6 is saved ({states[0]})" in message
    assert "--resume latest --set save.dtype=bf16" in message
    final = tmp_path / "overflow" / "run.safetensors"
    assert not final.exists()
    log = (tmp_path / "overflow" / "loss_log.csv").read_text()

    trainer = run(config, ["save.dtype=bf16", "save.state_every_n_steps=0"], resume="latest")
    assert trainer.result.final_adapter == final and trainer.result.steps == 6
    assert (tmp_path / "overflow" / "loss_log.csv").read_text() == log  # nothing trained
    assert [p.name for p in complete_states(states_root(tmp_path / "overflow"))[0]] == ["step-00000006"]
    assert any(t.max() == 1e5 for t in load_file(str(states[0] / ADAPTERS)).values())
    written = load_file(str(final))
    ups = [t for name, t in written.items() if name.endswith("lora_up.weight")]
    assert ups and all(t.dtype == torch.bfloat16 for t in ups)
    assert max(float(t.float().max()) for t in ups) == torch.tensor(1e5).to(torch.bfloat16).item()
    assert len(load_adapter(final).modules) == len(ups)

    again = run(config, ["save.dtype=bf16", "save.state_every_n_steps=0"], resume="latest")  # now complete
    assert again.base is None and final.stat().st_mtime_ns == trainer.result.final_adapter.stat().st_mtime_ns


def test_periodic_save_overflowing_fp16_saves_a_state_to_continue_from(tmp_path):
    """An adapter save during the run (save.every_n_steps) refused for fp16 overflow: no state was due there
    (states only at the end), yet the run saves one at that step before it stops, and the message gives the
    command that continues with bf16; continuing trains the remaining steps exactly once."""
    from sdtrain.export.adapter_file import SaveDtypeOverflow
    from sdtrain.train.state import complete_states, states_root

    config = write_config(tmp_path, "midway", steps=6)
    overrides = ["save.dtype=fp16", "save.state_every_n_steps=0", "save.every_n_steps=4"]
    with pytest.raises(SaveDtypeOverflow) as error:
        run(config, overrides, callbacks=[OverflowFp16At(3)])
    message = str(error.value)
    states = complete_states(states_root(tmp_path / "midway"))[0]
    assert [p.name for p in states] == ["step-00000004"]
    assert f"The training state at step 4 is saved ({states[0]}): continue from it" in message
    assert "--resume latest --set save.dtype=bf16" in message
    assert not list((tmp_path / "midway").glob("run*.safetensors"))

    trainer = run(config, overrides[1:] + ["save.dtype=bf16"], resume="latest")
    assert trainer.result.steps == 6 and (tmp_path / "midway" / "run.safetensors").is_file()
    steps = [line.split(",")[0] for line in (tmp_path / "midway" / "loss_log.csv").read_text().splitlines()[1:]]
    assert steps == [str(i) for i in range(1, 7)]


def test_runaway_learning_rate_exits_2_from_the_command_line(tmp_path, capsys):
    """optimizer.lr = 1e30 diverges in the first steps: exit code 2, sdtrain's message, no traceback, no
    adapter written."""
    from sdtrain.cli import main

    config = write_config(tmp_path, "runaway", steps=6)
    assert main(["train", config, "--set", "optimizer.lr=1e30", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and ("NaN" in err or "nan" in err or "inf" in err), err
    assert "no training state was written yet" in err or "the last finite training state is" in err
    assert not (tmp_path / "runaway" / "run.safetensors").exists()
