"""Attention maps: what each head of the decoder reads in a multimodal prompt.

    prompt ─► embeds (soft tokens in place) ─► one prefill forward, a hook on every attention layer
           ─► the hook recomputes softmax(Q Kᵀ / sqrt(d_head)) from the layer's own input ─► (L, H, T, T)

The decoder's attention runs through fused SDPA kernels, which never materialise the weights. Rather
than change that path (generation must not pay for inspection), forward hooks are attached for one
forward pass and removed afterwards: each recomputes the weights from the layer's input with the
layer's own q/k projection, rotary positions, causal mask and sliding window. `weights @ v`
reproduces the layer's output before its projection (tested to 1e-5). The layers are shared with
any other thread that runs the decoder meanwhile (a `generate`): the hooks record only the forward
calls of the thread that attached them and return at once for the others, so their computation is
untouched and never lands in the maps.
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from encoders.attention import MultiHeadAttention, build_attention_mask
from mmembed.decoder.generate import prepare_inputs
from mmembed.decoder.prompt import Resolved
from mmembed.insight.plotting import pyplot, save_png, spread, token_labels

if TYPE_CHECKING:
    from mmembed.decoder import PromptModel

MAX_DEFAULT_LAYERS, MAX_DEFAULT_HEADS = 4, 4  # a larger decoder draws a spread of layers, heads averaged
_MEDIA_LABEL = re.compile(r"^<\w+ \d+>$")


@dataclass
class AttentionMaps:
    """The decoder's attention over one prompt.

    Attributes:
        weights: (layers, heads, T, T) float32 on the CPU; row i is what position i attends to
            (sums to 1; zero above the diagonal and, with a window W, W or more positions back).
        labels: T strings: each token's text, `<image 1>`-style markers on the soft tokens of
            the first image (every soft token of an item carries its label), special tokens by name.
        window: the decoder's sliding-window span, or None.
    """

    weights: Tensor
    labels: list[str]
    window: int | None = None

    def plot(self, out_png: str | Path, layers: Sequence[int] | None = None,
             heads: Sequence[int] | None = None) -> Path:
        """Draw heatmaps, one row per layer: the mean over heads, then each chosen head.

        Args:
            out_png: the PNG to write (parent folders are created).
            layers: layer indices (default: every layer when there are at most 4, else 4 spread
                from the first to the last).
            heads: head indices drawn beside the mean (default: all of them when there are at most
                4, else none).

        Returns:
            The PNG's path.
        """
        plt = pyplot()
        from matplotlib.colors import PowerNorm

        L, H, T, _ = self.weights.shape
        layers = spread(L, MAX_DEFAULT_LAYERS) if layers is None else list(layers)
        heads = (list(range(H)) if H <= MAX_DEFAULT_HEADS else []) if heads is None else list(heads)
        for name, chosen, n in (("layer", layers, L), ("head", heads, H)):
            if any(not 0 <= i < n for i in chosen):
                raise ValueError(f"{name} indices must be in [0, {n}), got {chosen}")
        cols = [("mean over heads", None)] + [(f"head {h}", h) for h in heads]
        cell = min(8.0, max(3.0, 0.16 * T))
        fig, axes = plt.subplots(len(layers), len(cols), figsize=(cell * len(cols) + 1, cell * len(layers) + 0.5),
                                 squeeze=False, layout="constrained")
        size = max(4.0, min(9.0, 360 / max(T, 1)))
        norm = PowerNorm(gamma=0.5, vmin=0.0, vmax=1.0)  # one scale for every cell; sqrt lifts small weights
        for r, layer in enumerate(layers):
            for c, (title, head) in enumerate(cols):
                ax = axes[r][c]
                w = self.weights[layer].mean(0) if head is None else self.weights[layer, head]  # (T, T)
                ax.imshow(w.numpy(), cmap="viridis", norm=norm, interpolation="nearest")
                ax.set_title(f"layer {layer} · {title}", fontsize=9)
                # token labels on the outer edge only (ticks are what drawing the grid spends most on)
                if r == len(layers) - 1:
                    ax.set_xticks(range(T), self.labels, rotation=90, fontsize=size)
                else:
                    ax.set_xticks([])
                if c == 0:
                    ax.set_yticks(range(T), self.labels, fontsize=size)
                else:
                    ax.set_yticks([])
                for tick in [*ax.get_xticklabels(), *ax.get_yticklabels()]:
                    if _MEDIA_LABEL.match(tick.get_text()):
                        tick.set_color("tab:red")
        window = f", window {self.window}" if self.window is not None else ""
        fig.suptitle(f"decoder attention (rows: queries, columns: keys{window}; colour: sqrt of the weight)",
                     fontsize=10)
        return save_png(fig, out_png)


def head_weights(attn: MultiHeadAttention, x: Tensor, mask: Tensor | None = None, *, is_causal: bool = False,
                 positions: Tensor | None = None) -> Tensor:
    """Attention weights of one layer, recomputed explicitly (what its fused kernel never stores).

    Args:
        attn: the layer.
        x: (B, T, C) the layer's input; mask, is_causal, positions: as the layer was called
            (without a KV cache: all T positions are queries and keys).

    Returns:
        (B, H, T, T) float32: softmax(q kᵀ / sqrt(d_head)) under the layer's mask and window; a
        query with no key allowed gets a zero row, as the layer returns zeros for it.
    """
    B, T, C = x.shape
    q, k, _ = attn.qkv(x).view(B, T, 3, attn.heads, attn.head_dim).permute(2, 0, 3, 1, 4)  # 3 × (B, H, T, hd)
    if attn.positional is not None:
        q, k = attn.positional(q, positions), attn.positional(k, positions)
    window = attn.window if attn.window is not None and T > attn.window else None  # as the layer decides
    allowed = build_attention_mask(mask, is_causal, T, T, x.device, window)
    scores = q.float() @ k.float().transpose(-2, -1) / math.sqrt(attn.head_dim)  # (B, H, T, T)
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    return scores.softmax(dim=-1).nan_to_num(0.0)  # an all -inf row is NaN: that query reads nothing


@torch.inference_mode()
def attention_maps(pm: PromptModel, prompt: Resolved, device: torch.device) -> AttentionMaps:
    """Per-layer, per-head attention of the decoder over one prompt (one prefill forward).

    Args:
        pm: the run's decoder stage.
        prompt: a resolved prompt (`Model.attention_maps` resolves text and media).
        device: where the model lives.

    Returns:
        `AttentionMaps` with weights (layers, heads, T, T) for the T ids of the prompt, <bos> to
        <answer>. Raises BadInput for a prompt longer than a window-less decoder's context.
    """
    lm = pm.lm
    layers = [m for m in lm.decoder.transformer.modules() if isinstance(m, MultiHeadAttention)]
    found: dict[int, Tensor] = {}
    owner = threading.get_ident()

    def record(module: MultiHeadAttention, args: tuple, *rest: Any) -> None:
        # `rest` is (kwargs, output); a thread that snapshotted the hooks just before they were
        # removed calls it as a plain hook, (output,): the thread test comes first for that too
        if threading.get_ident() != owner:
            return  # another thread's forward (a generate): neither recorded nor changed
        kwargs = rest[0]
        mask = args[1] if len(args) > 1 else kwargs.get("mask")
        found[id(module)] = head_weights(module, args[0], mask, is_causal=kwargs.get("is_causal", False),
                                         positions=kwargs.get("positions"))[0].cpu()

    was_training = lm.training
    lm.eval()
    hooks = [m.register_forward_hook(record, with_kwargs=True) for m in layers]
    try:
        embeds, mask, _, _ = prepare_inputs(lm, pm.fmt, [prompt], 1, device)  # (1, T, C); mask None: one row
        lm.decoder.hidden(inputs_embeds=embeds, mask=mask)
    finally:
        for h in hooks:
            h.remove()
        lm.train(was_training)
    weights = torch.stack([found[id(m)] for m in layers])  # (L, H, T, T)
    return AttentionMaps(weights, token_labels(pm.fmt, pm.fmt.encode(prompt.parts), prompt.parts),
                         lm.decoder.window)
