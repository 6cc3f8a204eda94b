"""Count host-device synchronizations: the calls that make the host wait for a tensor's value.

On a GPU each of these waits until every queued kernel has run; on the CPU they cost nothing, so tests count
the calls instead of timing them.
"""

from __future__ import annotations

import contextlib
import traceback

import torch

# Tensor methods that read values on the host (nonzero: its output shape depends on the values)
TENSOR_SYNCS = ("item", "cpu", "tolist", "numpy", "nonzero", "__bool__", "__float__", "__int__", "__index__")


@contextlib.contextmanager
def count_syncs(ignore=None):
    """Within the block, record every call of the `TENSOR_SYNCS` methods and of `torch.cuda.synchronize`.

    Yields a list that receives (name, tensor or None, stack summary) per call; `ignore(name, tensor)` returning
    True leaves a call out (e.g. reads of tensors that stay on the host in a CUDA run).
    """
    calls = []
    originals = {name: getattr(torch.Tensor, name) for name in TENSOR_SYNCS}
    synchronize = torch.cuda.synchronize

    def record(name, tensor):
        if ignore is None or not ignore(name, tensor):
            calls.append((name, tensor, "".join(traceback.format_stack(limit=6)[:-2])))

    def wrap(name, original):
        def method(self, *args, **kwargs):
            record(name, self)
            return original(self, *args, **kwargs)

        return method

    def sync(*args, **kwargs):
        record("torch.cuda.synchronize", None)

    try:
        for name, original in originals.items():
            setattr(torch.Tensor, name, wrap(name, original))
        torch.cuda.synchronize = sync
        yield calls
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
        torch.cuda.synchronize = synchronize
