"""EMA of the adapter weights: the closed form over a few updates, and a resume that continues it exactly."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from helpers_training import closed_form, run, write_config
from sdtrain.train.ema import AdapterEma, split_state


def test_ema_updates_follow_the_closed_form():
    param = torch.nn.Parameter(torch.zeros(3))
    ema = AdapterEma([param], decay=0.2, every_n_steps=2, start_step=1)
    weights = {}
    for step in range(1, 10):
        with torch.no_grad():
            param.copy_(torch.tensor([step, step ** 2, -step], dtype=torch.float32))
        weights[step] = param.detach().clone()
        ema.after_step(step)
        with ema.applied():
            seen = param.detach().clone()
        assert torch.equal(param, weights[step])  # the trained weights are back after the block
        updates = [s for s in (3, 5, 7, 9) if s <= step]
        expected = closed_form(weights, updates, 0.2) if updates else weights[step]  # not started: the weights
        torch.testing.assert_close(seen, expected, rtol=1e-6, atol=1e-6)
        assert ema.updates_until(step) == len(updates)
    # d_1 = 2/11, then the cap 0.2 (< 3/12, 4/13): the cap is what changes the last two updates
    assert closed_form(weights, [3, 5, 7, 9], 0.2)[0] != closed_form(weights, [3, 5, 7, 9], 0.999)[0]

    restored = AdapterEma([torch.nn.Parameter(torch.zeros(3))], decay=0.2, every_n_steps=2, start_step=1)
    assert restored.load_state_tensors(ema.state_tensors(), 9)
    assert restored.model.optimization_step == ema.model.optimization_step == 4
    assert not AdapterEma([param], 0.2, 2, 1).load_state_tensors({}, 9)  # due updates but nothing saved


def test_ema_resumes_bit_exactly_and_is_saved_as_its_own_adapter(tmp_path, monkeypatch):
    """Also: sample.at_start renders at step 0 once, not again when the run resumes."""
    import sdtrain.train.sampling as sampling

    sampled = []
    monkeypatch.setattr(sampling, "sample_images", lambda arch, *, step, **kwargs: sampled.append(step) or [])
    options = ["ema.enabled=true", "ema.decay=0.5", "ema.every_n_steps=2", "ema.start_step=1",
               "save.state_every_n_steps=0", "sample.at_start=true", 'sample.prompts=["a square"]']
    straight = run(write_config(tmp_path, "straight", steps=6), options)
    assert sampled == [0]
    config = write_config(tmp_path, "resumed", steps=6)
    stopped = run(config, options, stop_at=4)
    assert sampled == [0, 0]
    _, saved_ema = split_state(load_file(str(stopped.result.state / "adapters.safetensors")))
    assert len(saved_ema) == len(stopped.trainable_params)
    resumed = run(config, options, resume="latest")
    assert sampled == [0, 0]  # not again after the resume
    for folder in ("straight", "resumed"):
        assert (tmp_path / folder / "run-ema.safetensors").is_file()
    a, b = (load_file(str(tmp_path / f / "run-ema.safetensors")) for f in ("straight", "resumed"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    final = load_file(str(tmp_path / "straight" / "run.safetensors"))
    assert final.keys() == a.keys()
    assert any(not torch.equal(final[k], a[k]) for k in a if k.endswith("lora_up.weight"))
    assert torch.equal(straight.ema.model.shadow_params[0], resumed.ema.model.shadow_params[0])
