"""Early fusion: shared-space vectors become soft tokens at their places in the token sequence.

    media item ─► tower ─► unit vector z (D) ─► Projector ─► k soft tokens (k, C) ─┐
    prompt ids with k placeholder ids per item ─► token embedding (B, T, C) ────────┴► masked_scatter
                                                                                     ─► Decoder

With `decoder.whiten` the vectors are whitened (whitening.py) before the projector.

The projector is shared by every modality: whatever a vector's origin, the same map reads it,
which is what lets a decoder trained on images answer about sounds (their vectors share the
space). The placeholders' own embeddings are overwritten; soft tokens fill them in row-major
order (row 0's items left to right, then row 1's ...), as torchtune's early fusion does.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from encoders.attention import KVCacheLike
from encoders.linear import Linear
from mmembed.decoder.model import Decoder
from mmembed.decoder.whitening import Whitening


class Projector(nn.Module):
    """Shared-space vector (D) → `soft_tokens` decoder embeddings (k, C).

    `mlp` (LLaVA-1.5): LayerNorm → Linear(D, hidden) → GELU → Linear(hidden, k·C).
    `linear` (ClipCap's simplest mapping): LayerNorm → Linear(D, k·C).
    The LayerNorm puts unit vectors (components ~ 1/sqrt(D)) on the scale of token embeddings.
    """

    def __init__(self, embed_dim: int, width: int, soft_tokens: int, kind: Literal["mlp", "linear"] = "mlp",
                 hidden: int | None = None) -> None:
        super().__init__()
        if soft_tokens < 1:
            raise ValueError(f"soft_tokens must be >= 1, got {soft_tokens}")
        self.embed_dim, self.width, self.soft_tokens = embed_dim, width, soft_tokens
        out = soft_tokens * width
        if kind == "mlp":
            hidden = hidden or width * 2
            self.net = nn.Sequential(nn.LayerNorm(embed_dim), Linear(embed_dim, hidden), nn.GELU(),
                                     Linear(hidden, out))
        elif kind == "linear":
            self.net = nn.Sequential(nn.LayerNorm(embed_dim), Linear(embed_dim, out))
        else:
            raise ValueError(f"unknown projector {kind!r} (valid: mlp, linear)")
        for m in self.net:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, z: Tensor) -> Tensor:
        """z: (M, D) → (M, k, C)."""
        return self.net(z).view(z.shape[0], self.soft_tokens, self.width)


class MultimodalLM(nn.Module):
    """Projector + decoder: ids with placeholders and media vectors in, logits out.

    Args:
        projector: shared-space vectors → soft tokens.
        decoder: the causal language model.
        placeholder_id: the id marking soft-token slots in `ids`.
        whitening: applied to the vectors before the projector (None: none).
    """

    def __init__(self, projector: Projector, decoder: Decoder, placeholder_id: int,
                 whitening: Whitening | None = None) -> None:
        super().__init__()
        if projector.width != decoder.width:
            raise ValueError(f"projector width {projector.width} != decoder width {decoder.width}")
        self.projector, self.decoder, self.placeholder_id = projector, decoder, placeholder_id
        self.whitening = whitening

    @property
    def soft_tokens(self) -> int:
        return self.projector.soft_tokens

    def embed(self, ids: Tensor, media: Tensor | None) -> Tensor:
        """Token embeddings with every placeholder replaced by its soft token.

        Args:
            ids: (B, T) long; `soft_tokens` consecutive placeholder ids per media item.
            media: (M, D) shared-space vectors, in row-major order of their slots; None if M = 0.

        Returns:
            (B, T, C).
        """
        x = self.decoder.token_embedding(ids)  # (B, T, C)
        slots = ids == self.placeholder_id  # (B, T)
        n_items = 0 if media is None else media.shape[0]
        if int(slots.sum()) != n_items * self.soft_tokens:
            raise ValueError(f"{int(slots.sum())} placeholder slots for {n_items} media items × "
                             f"{self.soft_tokens} soft tokens")
        if n_items == 0:
            return x
        if self.whitening is not None:
            media = self.whitening(media.float())
        soft = self.projector(media.to(x.dtype)).to(x.dtype).reshape(-1, x.shape[-1])  # (M·k, C); bf16 under autocast
        return x.masked_scatter(slots.unsqueeze(-1), soft)

    def forward(self, ids: Tensor, media: Tensor | None, *, mask: Tensor | None = None,
                positions: Tensor | None = None, kv_caches: list[KVCacheLike] | None = None) -> Tensor:
        """Logits (B, T, V) for a fused sequence; see `Decoder.hidden` for mask/positions/caches."""
        return self.decoder(inputs_embeds=self.embed(ids, media), mask=mask, positions=positions,
                            kv_caches=kv_caches)


def freeze_language_model(lm: MultimodalLM, rows: slice) -> None:
    """Keep the decoder as loaded: only the projector, the token-embedding `rows` (the ids a
    prompt format adds after a pretrained tokenizer's) and what
    mmembed adds to the loaded blocks (short convolutions, `decoder.conv_kernel`, which start at
    zero) train.

    A gradient hook zeroes every other row of the embedding table, also when it is the tied LM
    head, so AdamW never moves them (no gradient, and the table is outside weight decay).
    """
    lm.decoder.requires_grad_(False)
    for block in lm.decoder.transformer.blocks:
        if block.conv is not None:
            block.conv.requires_grad_(True)
    table = lm.decoder.token_embedding.weight
    table.requires_grad_(True)
    keep = torch.zeros(table.shape[0], 1, dtype=table.dtype, device=table.device)  # (V, 1)
    keep[rows] = 1  # not the rows of a padded table past them: generation never writes those
    table.register_hook(lambda grad: grad * keep)


def answer_logits(lm: MultimodalLM, ids: Tensor, media: Tensor | None, targets: Tensor,
                  loss_mask: Tensor, mask: Tensor | None = None,
                  positions: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Logits and targets at the answer positions only (the loss never sees the prompt).

    Args:
        ids: (B, T) fused-sequence ids (prompt, placeholders, answer, padding).
        media: (M, D) vectors for the placeholders.
        targets: (B, T) the id each position should predict next.
        loss_mask: (B, T) bool, True where the next id is part of the answer (its end token too).
        mask, positions: for rows that pack several sequences, (B, T, T) which keys each token
            may see (causality is added) and (B, T) positions; None for one sequence per row.

    Returns:
        logits (N, V) and targets (N,) for the N masked positions. Only those N rows go through
        the LM head: with a 50k vocabulary that is most of the saving over full logits.
    """
    hidden = lm.decoder.hidden(inputs_embeds=lm.embed(ids, media), mask=mask, positions=positions)  # (B, T, C)
    return lm.decoder.lm_head(hidden[loss_mask]), targets[loss_mask]
