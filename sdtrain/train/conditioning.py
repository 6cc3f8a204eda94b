"""Text conditioning of the UNet, as diffusers' pipelines compute it, for training and sampling.

SD1.5 / SD2: the text encoder's last hidden state; `clip_skip = 2` (A1111/kohya "clip skip 2") takes the
penultimate layer's hidden state and applies the final layer norm to it.
SDXL: CLIP-L's and CLIP-G's penultimate hidden states (`clip_skip = 2` goes one layer further back), concatenated
on the feature axis, with no final layer norm; the pooled embedding is CLIP-G's projected `text_embeds`.

Prompts are tokenized to CLIP's 77 tokens with truncation; longer prompts are cut (no chunking into several
77-token windows). Gradients flow through the encoders: train adapters in them by calling this with grad enabled.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

MAX_TOKENS = 77


@dataclass
class Conditioning:
    prompt_embeds: torch.Tensor  # [b, 77, d] (SDXL: d = CLIP-L width + CLIP-G width)
    pooled_embeds: torch.Tensor | None = None  # SDXL only: [b, CLIP-G projection dim]


def tokenize(tokenizer, prompts: Sequence[str]) -> torch.Tensor:
    """Token ids [b, 77]: padded to the tokenizer's max length (77), longer prompts truncated."""
    return tokenizer(list(prompts), padding="max_length", max_length=min(tokenizer.model_max_length, MAX_TOKENS),
                     truncation=True, return_tensors="pt").input_ids


def _device_of(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


def _final_layer_norm(text_encoder):
    model = getattr(text_encoder, "module", text_encoder)  # the encoder inside a DDP wrapper
    # transformers 5 CLIPTextModel keeps it at the top level; CLIPTextModelWithProjection under `text_model`.
    owner = getattr(model, "text_model", model)
    return owner.final_layer_norm


def encode_prompts(arch: str, tokenizers: Sequence, text_encoders: Sequence, prompts: Sequence[str],
                   clip_skip: int = 1) -> Conditioning:
    """Encode `prompts` with one text encoder (sd15, sd2) or two (sdxl: [CLIP-L, CLIP-G])."""
    if clip_skip < 1:
        raise ValueError(f"clip_skip must be >= 1, got {clip_skip}")
    prompts = list(prompts)
    if arch == "sdxl":
        if len(tokenizers) != 2 or len(text_encoders) != 2:
            raise ValueError("SDXL needs two tokenizers and two text encoders")
        hidden, pooled = [], None
        for tokenizer, encoder in zip(tokenizers, text_encoders):
            out = encoder(tokenize(tokenizer, prompts).to(_device_of(encoder)), output_hidden_states=True)
            hidden.append(out.hidden_states[-(clip_skip + 1)])
            pooled = getattr(out, "text_embeds", None)
        if pooled is None:
            raise ValueError("SDXL's second text encoder must be a CLIPTextModelWithProjection (no text_embeds)")
        embeds = torch.cat([hidden[0], hidden[1].to(hidden[0].device)], dim=-1)
        return Conditioning(embeds, pooled.to(embeds.device))

    (tokenizer,), (encoder,) = tokenizers, text_encoders
    ids = tokenize(tokenizer, prompts).to(_device_of(encoder))
    if clip_skip == 1:
        return Conditioning(encoder(ids).last_hidden_state)
    out = encoder(ids, output_hidden_states=True)
    return Conditioning(_final_layer_norm(encoder)(out.hidden_states[-clip_skip]))


def sdxl_add_time_ids(original_size, crop_top_left, target_size, dtype=torch.float32, device=None) -> torch.Tensor:
    """SDXL micro-conditioning [b, 6]: (orig_h, orig_w, crop_top, crop_left, target_h, target_w) per sample.

    Each argument is one (h, w) / (top, left) pair, a list of pairs or a [b, 2] tensor; single pairs broadcast.
    """
    parts = [torch.as_tensor(x, dtype=torch.float64).reshape(-1, 2) for x in (original_size, crop_top_left, target_size)]
    batch = max(p.shape[0] for p in parts)
    parts = [p.expand(batch, 2) if p.shape[0] == 1 else p for p in parts]
    if any(p.shape[0] != batch for p in parts):
        raise ValueError(f"sdxl_add_time_ids: batch sizes differ {[p.shape[0] for p in parts]}")
    return torch.cat(parts, dim=1).to(dtype=dtype, device=device)


def unet_added_cond_kwargs(cond: Conditioning, time_ids: torch.Tensor | None = None) -> dict | None:
    """`added_cond_kwargs` for the UNet: SDXL's pooled text embeds and time ids (one row broadcasts to the batch);
    None for SD1.5/SD2."""
    if cond.pooled_embeds is None:
        return None
    if time_ids is None:
        raise ValueError("SDXL conditioning needs time_ids (see sdxl_add_time_ids)")
    time_ids = time_ids.to(cond.pooled_embeds.device, cond.pooled_embeds.dtype)
    if time_ids.shape[0] == 1:
        time_ids = time_ids.expand(cond.pooled_embeds.shape[0], -1)
    return {"text_embeds": cond.pooled_embeds, "time_ids": time_ids}
