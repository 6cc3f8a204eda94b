"""train.compile: the UNet with its DoRA adapters trains under torch.compile, step for step as in eager mode."""

from __future__ import annotations

import pytest
import torch

from helpers_training import adapter_tensors, run, write_config
from sdtrain.adapters.adapter_set import AdapterSet


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_compiled_unet_trains_like_eager(tmp_path, monkeypatch):
    """3 steps of tiny SD1.5 with DoRA (AdamW): the compiled run captures the UNet's forward and backward as graphs
    and ends where the eager run ends, within round-off. The backend is dynamo + AOT autograd without inductor's
    code generation ("aot_eager"): inductor's C++ kernels for a whole UNet take minutes to build on 2 CPU cores;
    tests/adapters/test_compile.py checks inductor's kernels on a DoRA-adapted UNet block."""
    from torch._dynamo.utils import counters

    compiled_with = []
    compile_unet = AdapterSet.compile

    def compile_cheaply(self, component="unet", **options):
        compiled_with.append(component)
        return compile_unet(self, component, **{"backend": "aot_eager", **options})

    monkeypatch.setattr(AdapterSet, "compile", compile_cheaply)
    options = ["train.max_steps=3", "save.state_every_n_steps=0", "optimizer.type=AdamW", "data.num_workers=0"]
    eager = run(write_config(tmp_path, "eager", arch="sd15"), options)
    torch._dynamo.reset()
    counters.clear()
    compiled = run(write_config(tmp_path, "compiled", arch="sd15"), options + ["train.compile=true"])

    assert compiled_with == ["unet"]
    assert counters["stats"]["unique_graphs"] >= 1 and not counters["graph_break"]
    assert compiled.result.losses == pytest.approx(eager.result.losses, rel=1e-4)
    expected, got = adapter_tensors(eager), adapter_tensors(compiled)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-5)
    moved = max(expected[k].abs().max().item() for k in expected if k.endswith("lora_up.weight"))
    assert moved > 1e-3  # lora_up starts at zero: the steps moved it 100x more than the tolerance
