"""The real CLIP BPE tokenizer, built offline from OpenAI's `bpe_simple_vocab_16e6.txt.gz`.

The vocabulary ships inside the package (`sdtrain/models/data/`, MIT licence beside it). CLIP derives its
vocabulary from the merge list: the 256 byte symbols, the same with the end-of-word marker `</w>`, one entry
per merge (the first 49152 - 256 - 2 merges of the file), then `<|startoftext|>` and `<|endoftext|>`:
49408 tokens in all. `write_clip_tokenizer_files` writes them as `vocab.json` / `merges.txt`.
"""

from __future__ import annotations

import gzip
import json
import os
from functools import lru_cache
from importlib import resources
from pathlib import Path

BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
NUM_MERGES = 49152 - 256 - 2
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte → printable-character table."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


@lru_cache(maxsize=1)
def clip_merges() -> tuple[tuple[str, str], ...]:
    data = resources.files("sdtrain.models").joinpath("data", BPE_FILE).read_bytes()
    lines = gzip.decompress(data).decode("utf-8").split("\n")
    return tuple(tuple(line.split()) for line in lines[1 : NUM_MERGES + 1])


def clip_vocab() -> dict[str, int]:
    symbols = list(_bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in clip_merges()] + [BOS, EOS]
    return {token: i for i, token in enumerate(vocab)}


def write_clip_tokenizer_files(folder: str | os.PathLike) -> Path:
    """Write `vocab.json` and `merges.txt` into `folder` (created) and return it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(clip_vocab(), ensure_ascii=False), encoding="utf-8")
    merges = "#version: 0.2\n" + "\n".join(" ".join(m) for m in clip_merges()) + "\n"
    (folder / "merges.txt").write_text(merges, encoding="utf-8")
    return folder


def build_clip_tokenizer(pad_token: str = EOS, model_max_length: int = 77):
    """CLIP tokenizer as used by SD1.5 and SDXL (`pad_token="!"` for SDXL's second tokenizer)."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer(
        vocab=clip_vocab(),
        merges=list(clip_merges()),
        pad_token=pad_token,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=EOS,
        model_max_length=model_max_length,
    )
