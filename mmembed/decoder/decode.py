"""The decoding loop: a left-padded batch prefilled once, then one token per step from the KV caches.

`pad_left` puts every row's last prompt token in the last column; `decode_steps` yields one
`Choice` per step, masking the padding out of attention (`_KeyMask`, rolling caches included)
and counting positions over real tokens only. generate.py sizes the steps and drives the loop.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from mmembed.decoder.model import Decoder
from mmembed.decoder.prompt import PromptFormat
from mmembed.decoder.sampling import Choice, Sampling, choose


def pad_left(fmt: PromptFormat, rows: list[list[int]], device: torch.device) -> tuple[Tensor, Tensor | None]:
    """Ids (B, T) padded on the left, and the mask (B, T) (None when no row is padded)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), fmt.pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for b, r in enumerate(rows):
        ids[b, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[b, width - len(r):] = True
    return ids.to(device), (None if bool(mask.all()) else mask.to(device))


@torch.inference_mode()
def decode_steps(decoder: Decoder, embeds: Tensor, mask: Tensor | None, max_new_tokens: int,
                 sampling: Sampling, generator: torch.Generator | None = None,
                 suppress: Sequence[int] = ()) -> Iterator[Choice]:
    """Yield one `Choice` per step for every row; the caller stops iterating when it is done.

    Args:
        embeds: (B, T, C) left-padded prompt embeddings (soft tokens already in place).
        mask: (B, T) bool, True = real token; None when no row is padded.
        max_new_tokens: steps at most (the caches hold T + max_new_tokens - 1 slots: the last token
            chosen is never fed back).
        suppress: ids never chosen (probability 0), e.g. `PromptFormat.prompt_only_ids`.
    """
    B, T, _ = embeds.shape
    device = embeds.device
    slots = T + max_new_tokens - 1  # the last token chosen is never fed back
    caches = decoder.new_caches(B, slots)
    if mask is None:
        positions = None
        next_pos = torch.tensor([T], device=device)
    else:
        positions = (mask.long().cumsum(dim=1) - 1).clamp(min=0)  # (B, T): real tokens before each
        next_pos = positions[:, -1:] + 1  # (B, 1)
    head = _logits_fn(decoder, torch.tensor(list(suppress), dtype=torch.long, device=device))
    hidden = decoder.hidden(inputs_embeds=embeds, mask=mask, positions=positions, kv_caches=caches)
    logits = head(hidden[:, -1])  # (B, V)
    keys = _KeyMask(mask, slots, caches[0].max_len)
    for step in range(max_new_tokens):
        choice = choose(logits, sampling, generator)
        yield choice
        if step + 1 == max_new_tokens:
            return
        hidden = decoder.hidden(choice.tokens[:, None], mask=keys.last(T + step + 1), positions=next_pos,
                                kv_caches=caches)
        logits = head(hidden[:, -1])
        next_pos = next_pos + 1


class _KeyMask:
    """Key padding masks for the decoding steps of a left-padded batch: the prompt's padding, then
    real tokens. Attention reads a mask's last columns (as many keys as the cache returns), so a
    step gets the columns of the last `width` slots (the most keys a cache call returns): all of
    them for full caches; for rolling caches a bounded slice, None once the padding has left it."""

    def __init__(self, prompt_mask: Tensor | None, slots: int, width: int) -> None:
        self.width = width
        self.prompt = 0 if prompt_mask is None else prompt_mask.shape[1]
        self.full = None
        if prompt_mask is not None:  # one buffer, sliced per step: no allocation in the loop
            B = prompt_mask.shape[0]
            self.full = torch.ones(B, min(slots, self.prompt + width), dtype=torch.bool, device=prompt_mask.device)
            self.full[:, : self.prompt] = prompt_mask

    def last(self, end: int) -> Tensor | None:
        """(B, ≤ width) mask of slots [end - width, end), or None when they are all real tokens."""
        start = max(0, end - self.width)
        if self.full is None or start >= self.prompt:
            return None
        return self.full[:, start:end]  # end <= the buffer's width whenever start < prompt


def _logits_fn(decoder: Decoder, suppress: Tensor):
    """The LM head for this generation, with the `suppress` ids at -inf."""
    def head(h: Tensor) -> Tensor:
        logits = decoder.lm_head(h)
        return logits.index_fill_(-1, suppress, float("-inf")) if len(suppress) else logits

    return head
