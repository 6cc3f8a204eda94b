"""Re-encode an adapter file for another export target (`sdtrain export ADAPTER --base MODEL --target T`).

Every module's magnitude is decoded with the base weight it was trained on (files written for ComfyUI's ‖W0‖ rule
need it) and encoded again for the target; lora_down, lora_up and their dtypes are kept, alpha is written for every
module (a file without alpha means alpha = rank to kohya, LyCORIS and A1111), dora_scale is written 2-D as sdtrain
writes it. The metadata is kept, with the target and the rule recorded and the sshs hashes recomputed.
"""

from __future__ import annotations

import torch

from sdtrain.errors import ModelLoadError
from sdtrain.export import targets
from sdtrain.export.adapter_file import magnitude_shape


def retargeted_tensors(adapter_file, base_weights: dict, target: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of `adapter_file` written for `target`; `base_weights` maps module name → W0."""
    spec = targets.get_target(target)
    targets.check_axis(spec, adapter_file.axis, "--target")
    missing = [name for name in adapter_file.modules if name not in base_weights]
    if missing:
        raise ModelLoadError(f"{adapter_file.path or 'adapter'}: {len(missing)} module(s) have no layer in the base "
                             f"(e.g. {missing[0]}); pass the base model the adapter was trained for")
    tensors: dict[str, torch.Tensor] = {}
    for name, module in adapter_file.modules.items():
        tensors[f"{name}.lora_down.weight"] = module.down.contiguous()
        tensors[f"{name}.lora_up.weight"] = module.up.contiguous()
        tensors[f"{name}.alpha"] = torch.tensor(float(module.alpha), dtype=torch.float32)
        if module.dora_scale is None:
            continue
        w0 = base_weights[name].detach().to(torch.float32).reshape(module.weight_shape)
        delta = module.delta_weight()
        magnitude = module.magnitude(w0)
        stored = targets.encode_magnitude(spec.rule, magnitude, w0, delta, module.axis)
        tensors[f"{name}.dora_scale"] = stored.reshape(magnitude_shape(module.axis, module.weight_shape)).contiguous()
    metadata = {**adapter_file.metadata, **targets.metadata_for(spec)}
    return tensors, metadata
