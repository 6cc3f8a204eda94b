"""Text conditioning of the UNet, as diffusers' pipelines compute it, for training and sampling.

SD1.5 / SD2: the text encoder's last hidden state; `clip_skip = 2` (A1111/kohya "clip skip 2") takes the
penultimate layer's hidden state and applies the final layer norm to it.
SDXL: CLIP-L's and CLIP-G's penultimate hidden states (`clip_skip = 2` goes one layer further back), concatenated
on the feature axis, with no final layer norm; the pooled embedding is CLIP-G's projected `text_embeds`.

Prompt length (`max_token_length`, kohya's option of that name; kohya-ss/sd-scripts `library/strategy_base.py`
`_get_input_ids`, `strategy_sd.py` / `strategy_sdxl.py` `encode_tokens`, commit 48d368f):
- 75 (the default): CLIP's one window of 77 tokens (BOS, 75 tokens, EOS/padding); longer prompts are cut.
- 150 or 225: the prompt is tokenized to 75·n + 2 tokens (n = 2 or 3; cut beyond that, padded to it) and split
  into n windows of 77: BOS, the window's 75 tokens, and the last token of the whole sequence (EOS when the
  prompt fills it, else padding). For tokenizers whose padding is not EOS (SD2, SDXL's CLIP-G) a window whose
  75 tokens are all text ends in EOS, and an empty window starts BOS EOS. Each window is encoded on its own;
  the embedding is the first window's BOS state, the 75 middle states of every window in order, and the last
  window's final state: [b, 75·n + 2, d]. SDXL's pooled embedding is the first window's.
kohya's SD2 encoder also has a step that copies a padding state into empty windows; it compares a token id with
the token's text, never fires, and is left out.

Gradients flow through the encoders: train adapters in them by calling this with grad enabled.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

MAX_TOKENS = 77  # one CLIP window: BOS, 75 tokens, EOS
WINDOW = MAX_TOKENS - 2
MAX_TOKEN_LENGTHS = (75, 150, 225)


@dataclass
class Conditioning:
    prompt_embeds: torch.Tensor  # [b, 75·n + 2, d] (SDXL: d = CLIP-L width + CLIP-G width)
    pooled_embeds: torch.Tensor | None = None  # SDXL only: [b, CLIP-G projection dim]


def windows_of(max_token_length: int) -> int:
    if max_token_length not in MAX_TOKEN_LENGTHS:
        raise ValueError(f"max_token_length must be one of {MAX_TOKEN_LENGTHS}, got {max_token_length}")
    return max_token_length // WINDOW


def tokenize(tokenizer, prompts: Sequence[str], max_token_length: int = 75) -> torch.Tensor:
    """Token ids [b, n, 77] in n = max_token_length / 75 windows (see the module docstring)."""
    n = windows_of(max_token_length)
    ids = tokenizer(list(prompts), padding="max_length", max_length=WINDOW * n + 2, truncation=True,
                    return_tensors="pt").input_ids
    if n == 1:
        return ids.unsqueeze(1)
    windows = torch.stack([torch.cat([ids[:, :1], ids[:, 1 + WINDOW * k:1 + WINDOW * (k + 1)], ids[:, -1:]], dim=1)
                           for k in range(n)], dim=1)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    if pad != eos:
        full = (windows[..., -2] != eos) & (windows[..., -2] != pad)
        windows[..., -1] = torch.where(full, eos, windows[..., -1])
        windows[..., 1] = torch.where(windows[..., 1] == pad, eos, windows[..., 1])
    return windows


def join_windows(hidden: torch.Tensor, batch: int) -> torch.Tensor:
    """Hidden states [b·n, 77, d] of n windows per prompt -> [b, 75·n + 2, d] (BOS, the windows' middles, the
    last state); [b, 77, d] for one window."""
    hidden = hidden.reshape(batch, -1, MAX_TOKENS, hidden.shape[-1])
    if hidden.shape[1] == 1:
        return hidden[:, 0]
    middles = hidden[:, :, 1:-1].reshape(batch, -1, hidden.shape[-1])
    return torch.cat([hidden[:, 0, :1], middles, hidden[:, -1, -1:]], dim=1)


def _device_of(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


def _final_layer_norm(text_encoder):
    model = getattr(text_encoder, "module", text_encoder)  # the encoder inside a DDP wrapper
    # transformers 5 CLIPTextModel keeps it at the top level; CLIPTextModelWithProjection under `text_model`.
    owner = getattr(model, "text_model", model)
    return owner.final_layer_norm


def encode_prompts(arch: str, tokenizers: Sequence, text_encoders: Sequence, prompts: Sequence[str],
                   clip_skip: int = 1, max_token_length: int = 75) -> Conditioning:
    """Encode `prompts` with one text encoder (sd15, sd2) or two (sdxl: [CLIP-L, CLIP-G])."""
    if clip_skip < 1:
        raise ValueError(f"clip_skip must be >= 1, got {clip_skip}")
    prompts = list(prompts)
    batch = len(prompts)

    def ids_for(tokenizer, encoder):
        return tokenize(tokenizer, prompts, max_token_length).reshape(-1, MAX_TOKENS).to(_device_of(encoder))

    if arch == "sdxl":
        if len(tokenizers) != 2 or len(text_encoders) != 2:
            raise ValueError("SDXL needs two tokenizers and two text encoders")
        hidden, pooled = [], None
        for tokenizer, encoder in zip(tokenizers, text_encoders):
            out = encoder(ids_for(tokenizer, encoder), output_hidden_states=True)
            hidden.append(join_windows(out.hidden_states[-(clip_skip + 1)], batch))
            pooled = getattr(out, "text_embeds", None)
        if pooled is None:
            raise ValueError("SDXL's second text encoder must be a CLIPTextModelWithProjection (no text_embeds)")
        embeds = torch.cat([hidden[0], hidden[1].to(hidden[0].device)], dim=-1)
        pooled = pooled.reshape(batch, -1, pooled.shape[-1])[:, 0]  # the first window's
        return Conditioning(embeds, pooled.to(embeds.device))

    (tokenizer,), (encoder,) = tokenizers, text_encoders
    ids = ids_for(tokenizer, encoder)
    if clip_skip == 1:
        return Conditioning(join_windows(encoder(ids).last_hidden_state, batch))
    out = encoder(ids, output_hidden_states=True)
    return Conditioning(join_windows(_final_layer_norm(encoder)(out.hidden_states[-clip_skip]), batch))


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
