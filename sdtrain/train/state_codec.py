"""State dicts as safetensors + JSON: what a training state holds, written and read without pickle.

An optimizer's `state_dict()` (bitsandbytes' 8-bit state with its nested quantisation dicts included), a
GradScaler's and the RNG states are trees of dicts, lists and tuples whose leaves are tensors, numbers,
strings, booleans and None. `save_tree` writes such a tree as two files: `<name>.safetensors` with every
tensor (bytes as they are: dtype, shape and values exact) and `<name>.json` with the structure, each tensor
replaced by its key in the safetensors file. Numbers are exact in JSON (Python writes the shortest text that
reads back as the same float; NaN/inf as `NaN`/`Infinity`). Containers are tagged, so dict keys keep their
type (an optimizer's state is keyed by int) and tuples stay tuples.

Reading (`load_tree`) uses `safetensors.torch.load_file` and `json`: nothing in a state file can run code.
Any other Python object in a tree is a writer error (TypeError), never silently pickled.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

TREE_FORMAT = "sdtrain-tree-1"


def _encode(value, tensors: dict[str, torch.Tensor]):
    if isinstance(value, torch.Tensor):
        key = f"t{len(tensors)}"
        # a copy: safetensors refuses tensors that share memory (bitsandbytes' grouped state is views of one buffer)
        tensors[key] = value.detach().to("cpu").clone().contiguous()
        return {"tensor": key}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        return {"dict": [[_encode(k, tensors), _encode(v, tensors)] for k, v in value.items()]}
    if isinstance(value, tuple):
        return {"tuple": [_encode(v, tensors) for v in value]}
    if isinstance(value, list):
        return {"list": [_encode(v, tensors) for v in value]}
    raise TypeError(f"cannot store a {type(value).__name__} in a training state (only tensors, numbers, strings, "
                    "booleans, None and dicts/lists/tuples of them)")


def _decode(value, tensors: dict[str, torch.Tensor]):
    if not isinstance(value, dict):
        return value
    (tag, body), = value.items()
    if tag == "tensor":
        return tensors[body]
    if tag == "dict":
        return {_decode(k, tensors): _decode(v, tensors) for k, v in body}
    if tag == "tuple":
        return tuple(_decode(v, tensors) for v in body)
    if tag == "list":
        return [_decode(v, tensors) for v in body]
    raise ValueError(f"unknown entry {tag!r}")


def tree_files(name: str) -> tuple[str, str]:
    """The two file names `save_tree` writes for `name`."""
    return f"{name}.safetensors", f"{name}.json"


def save_tree(folder: Path, name: str, tree) -> None:
    """Write `tree` as `<folder>/<name>.safetensors` + `<folder>/<name>.json`."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    structure = _encode(tree, tensors)
    tensor_file, json_file = tree_files(name)
    save_file(tensors, str(Path(folder) / tensor_file))
    (Path(folder) / json_file).write_text(json.dumps({"format": TREE_FORMAT, "tree": structure}))


def load_tree(folder: Path, name: str):
    """Read what `save_tree` wrote (ValueError/OSError for a damaged or missing file)."""
    from safetensors.torch import load_file

    tensor_file, json_file = tree_files(name)
    document = json.loads((Path(folder) / json_file).read_text())
    if not isinstance(document, dict) or document.get("format") != TREE_FORMAT:
        raise ValueError(f"{json_file} is not an sdtrain state file ({TREE_FORMAT})")
    tensors = load_file(str(Path(folder) / tensor_file))
    return _decode(document["tree"], tensors)


def tree_bytes(tree) -> int:
    """Bytes of the tensors in `tree` (what its safetensors file holds, less the header)."""
    if isinstance(tree, torch.Tensor):
        return tree.numel() * tree.element_size()
    if isinstance(tree, dict):
        return sum(tree_bytes(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return sum(tree_bytes(v) for v in tree)
    return 0


# ---------------------------------------------------------------- random number generators


def rng_state() -> dict:
    """The global RNG states of Python, NumPy, torch (CPU) and CUDA (when available), as a storable tree."""
    import numpy as np

    kind, keys, position, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                       "position": int(position), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state` returned."""
    import numpy as np

    version, keys, gauss = state["python"]
    random.setstate((version, tuple(keys), gauss))
    saved = state["numpy"]
    np.random.set_state((saved["kind"], saved["keys"].numpy().astype(np.uint32), saved["position"],
                         saved["has_gauss"], saved["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def looks_like_pickle(path: Path) -> bool:
    """Whether a file is (or is named like) a pickle or a torch.save archive: what sdtrain never loads from a
    state. A safetensors file (8-byte header length, then its JSON header) is not one."""
    if path.suffix.lower() in (".pkl", ".pickle", ".bin", ".pt", ".pth", ".ckpt", ".npy", ".npz", ".joblib"):
        return True
    try:
        with open(path, "rb") as handle:
            head = handle.read(9)
    except OSError:
        return False
    if len(head) == 9 and head[8:9] == b"{":
        return False  # safetensors
    return (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")) or head[:4] == b"PK\x03\x04"
