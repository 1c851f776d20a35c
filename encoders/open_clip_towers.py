"""open_clip image and text towers as encoders.

Any open_clip architecture (`open_clip.list_models()`, or `local-dir:` / `hf-hub:` names) is
built with `open_clip.create_model`, then only one tower's modules are kept. `pretrained` is:

- None: random initialisation (offline), even for a `local-dir:` folder or `hf-hub:` repo that
  holds weights (name its weights file to load them).
- a local file: `.safetensors`, or `.pt`/`.pth`/`.bin` read with `torch.load(weights_only=True)`
  — a full open_clip CLIP state dict, as `model.state_dict()` or open_clip's trainer writes it.
- an open_clip pretrained tag (`laion2b_s34b_b79k`, ...): open_clip downloads it, so it only
  works on a machine that can reach the hub.

`pooled` is exactly open_clip's `encode_image` / `encode_text` (before normalisation). `tokens`
are the tower's per-patch / per-token features passed through the same final projection, when
the tower exposes them (open_clip ViTs and text transformers); other towers (ModifiedResNet,
timm, Hugging Face text models) return `pooled` as a single token (T = 1).

`pooled` (what a `Tower` calls: embedding and training need only the pooled vector) skips the
per-token projection, and computes nothing whose result the pooled vector cannot depend on:

- a causal CLIP text tower that pools one token (EOT) runs only the positions up to the last
  pooled one (the later ones cannot change it), so a caption of 12 tokens costs 12 positions,
  not the 77 of the context;
- a ViT pooling its class token runs its last block at that token only (keys and values still
  come from every patch): the block's outputs at the patches would be thrown away.

Those vectors equal `encode_text` / `encode_image` within float rounding (~1e-7, as a different
batch size would), not bit for bit; other towers' `pooled` is exactly `forward(...).pooled`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor, nn

from encoders.linear import use_linear_
from encoders.output import EncoderOutput
from encoders.weights import (PICKLE_SUFFIXES, SAFETENSORS_SUFFIXES, WeightsFileError, check_weights_path, load_into,
                              load_state_dict_file)

log = logging.getLogger(__name__)


def create_open_clip_model(
    name: str, pretrained: str | None = None, cache_dir: str | None = None
) -> tuple[nn.Module, dict]:
    """Build open_clip model `name` with weights from `pretrained`; return it and its config. The
    model's `pretrained_tag` is the open_clip tag its weights came from (None: random or a file).

    Raises:
        ValueError: unknown architecture, or `pretrained` neither a file nor a known tag.
        WeightsFileError: a weights file that is missing, unsafe, unreadable or does not fit,
            or a tag whose download failed.
    """
    import open_clip  # deferred: importing it costs seconds, and most configs never use it

    try:
        cfg = open_clip.get_model_config(name)
    except OSError as e:  # a local-dir: or hf-hub: name whose open_clip_config.json cannot be read
        raise ValueError(f"unknown open_clip architecture {name!r} ({e})") from None
    if cfg is None:
        raise ValueError(f"unknown open_clip architecture {name!r} (valid: {', '.join(open_clip.list_models())})")
    path, tag = _resolve_pretrained(name, pretrained)
    # pretrained_image/text=False: never fetch base tower weights behind the user's back; and
    # load_weights only for a tag: a local-dir: folder's (or hf-hub: repo's) own weights were read
    # when pretrained was None, which promises random initialisation.
    with _quiet_random_init_warning():
        try:
            model = open_clip.create_model(
                name, pretrained=tag, load_weights=tag is not None, pretrained_image=False, pretrained_text=False,
                cache_dir=cache_dir
            )
        except RuntimeError as e:
            if tag is None:
                raise
            raise WeightsFileError(
                f"could not fetch open_clip weights {name}/{tag} ({e}); without internet access, "
                "download them elsewhere and pass the local file as `pretrained`"
            ) from None
    if path is not None:
        _load_open_clip_file(model, path)
    # open_clip's preprocess_cfg holds the tag's mean and std only when a tag was loaded: otherwise
    # its defaults (CLIP's), which a random tower or a file's weights (SigLIP's: 0.5) need not take
    model.pretrained_tag = tag
    use_linear_(model)  # oneDNN on the CPU (encoders/linear.py); attention's fused in-projections stay torch's
    return model, cfg


def _resolve_pretrained(name: str, pretrained: str | None) -> tuple[Path | None, str | None]:
    """Split `pretrained` into (local weights file, open_clip tag); at most one is set."""
    import open_clip

    if pretrained is None:
        return None, None
    path = Path(pretrained)
    if path.is_file():
        return path, None
    if path.suffix in SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES or len(path.parts) > 1 or path.is_dir():
        check_weights_path(path)
    tags = open_clip.list_pretrained_tags_by_model(name)
    if pretrained not in tags:
        raise ValueError(
            f"pretrained={pretrained!r} is neither a weights file nor an open_clip tag for {name} "
            f"(tags: {', '.join(tags) or 'none'})"
        )
    return None, pretrained


@contextlib.contextmanager
def _quiet_random_init_warning() -> Iterator[None]:
    """Drop open_clip's "initialized randomly" warning: random is what pretrained=None asks for,
    and otherwise weights load right after (a file here, a run's own in `mm.load`)."""

    def keep(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded")

    root = logging.getLogger()  # open_clip logs through the root logger
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def _load_open_clip_file(model: nn.Module, path: Path) -> None:
    """Load a local CLIP state dict with the fix-ups of `open_clip.load_checkpoint`, but our safe reader."""
    from open_clip.convert import convert_state_dict
    from open_clip.model import convert_to_custom_text_state_dict, resize_pos_embed, resize_text_pos_embed

    state = load_state_dict_file(path)
    try:  # open_clip's fix-ups assume a CLIP state dict: a different file fails inside them
        state = convert_state_dict(model, state)  # third-party layouts (MobileCLIP)
        if "positional_embedding" in state and not hasattr(model, "positional_embedding"):
            state = convert_to_custom_text_state_dict(state)  # CLIP layout into a CustomTextCLIP
        for key in ("logit_scale", "logit_bias"):
            param = getattr(model, key, None)
            if key in state and param is not None and state[key].ndim != param.ndim:
                state[key] = state[key].reshape(param.shape)
        if "logit_bias" not in state and getattr(model, "logit_bias", None) is not None:
            state["logit_bias"] = torch.zeros_like(model.logit_bias)
        if fault := _pos_embed_width_fault(model, state):
            raise WeightsFileError(f"{path}: not a CLIP state dict this architecture can read ({fault})")
        resize_pos_embed(state, model)
        resize_text_pos_embed(state, model)
    # AssertionError: open_clip's resizes assert what they cannot resize (a width checked above)
    except (RuntimeError, KeyError, IndexError, TypeError, AttributeError, AssertionError) as e:
        raise WeightsFileError(f"{path}: not a CLIP state dict this architecture can read "
                               f"({type(e).__name__}: {str(e)[:200]})") from None
    load_into(model, state, path)
    log.info("loaded open_clip weights from %s", path)


def _pos_embed_width_fault(model: nn.Module, state: dict[str, Tensor]) -> str | None:
    """"KEY is N wide, ..." when the file's positional embeddings are not as wide as the model's:
    weights of another architecture (open_clip resizes only their length, and asserts the width)."""
    own = model.state_dict()
    for key in ("visual.positional_embedding", "positional_embedding", "text.positional_embedding"):
        if key in state and key in own and state[key].ndim == own[key].ndim == 2:
            theirs, ours = state[key].shape[-1], own[key].shape[-1]
            if theirs != ours:
                return (f"{key} is {theirs} wide, this architecture's is {ours}: weights of another open_clip "
                        "architecture? name the one they were saved from")
    return None


def _text_pad_id(text_cfg: dict) -> int:
    """The id open_clip's tokenizer pads this tower's text with, which a tower pooling the last
    position reads: the config's `pad_id`; else 1 for SigLIP's T5 vocabularies (big_vision pads
    with </s>, and so do their Hugging Face tokenizers); else 0 (CLIP, SigLIP 2's Gemma vocabulary)."""
    if "pad_id" in text_cfg:
        return int(text_cfg["pad_id"])
    name = str(text_cfg.get("hf_tokenizer_name", "")).lower()
    return 1 if "siglip" in name and "siglip2" not in name else 0


class OpenClipImage(nn.Module):
    """open_clip's visual tower. forward(images (B, 3, H, W)) → EncoderOutput.

    Shapes: tokens (B, N, E) projected patch tokens (T = 1 for non-ViT towers), mask all True,
    pooled (B, E) = `encode_image`; E = open_clip's embed_dim. `preprocess_cfg` holds what the
    images must be prepared with: the size the tower is built for, and with `from_tag` (weights of
    an open_clip pretrained tag) the tag's mean, std and the rest; a random tower or one loaded
    from a file takes any mean and std.
    """

    def __init__(self, visual: nn.Module, width: int, from_tag: bool = False) -> None:
        from open_clip.transformer import VisionTransformer as OpenClipVisionTransformer

        super().__init__()
        self.visual, self.width = visual, width
        cfg = dict(getattr(visual, "preprocess_cfg", {}))
        self.preprocess_cfg: dict = cfg if from_tag else {k: cfg[k] for k in ("size",) if k in cfg}
        self.has_tokens = (
            isinstance(visual, OpenClipVisionTransformer) and visual.attn_pool is None and visual.proj is not None
        )
        if hasattr(visual, "output_tokens"):  # True: forward returns (pooled, tokens), pooled unchanged;
            visual.output_tokens = self.has_tokens  # CoCa's config sets it for an attention pooler's tokens
        self.class_token_last_block = _class_token_last_block(visual)

    def forward(self, images: Tensor, mask: Tensor | None = None) -> EncoderOutput:
        if mask is not None:
            raise ValueError("image encoders take no mask: every patch is real")
        if self.has_tokens:
            pooled, tokens = self.visual(images)  # (B, E), (B, N, width_v)
            if self.visual.final_ln_after_pool:  # open_clip normalises only the pooled vector then
                tokens = self.visual.ln_post(tokens)
            tokens = tokens @ self.visual.proj  # (B, N, E)
        else:
            pooled = self.visual(images)
            tokens = pooled[:, None]  # (B, 1, E)
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=images.device)
        return EncoderOutput(tokens=tokens, mask=mask, pooled=pooled)

    def pooled(self, images: Tensor, mask: Tensor | None = None) -> Tensor:
        """`forward(images).pooled` alone, (B, E): no per-patch projection, and for a class-token ViT
        the last block at the class token only (see the module docstring)."""
        if mask is not None:
            raise ValueError("image encoders take no mask: every patch is real")
        if self.class_token_last_block and not self.visual.transformer.grad_checkpointing:
            return self._pool_class_token(images)
        out = self.visual(images)
        return out[0] if self.has_tokens else out

    def _pool_class_token(self, images: Tensor) -> Tensor:
        """open_clip's `VisionTransformer.forward` with the last block computed at the class token only."""
        v = self.visual
        x = v._embeds(images)  # (B, 1 + N, w): class token first
        *blocks, last = v.transformer.resblocks
        for block in blocks:
            x = block(x)
        h = last.ln_1(x)
        cls = x[:, :1] + last.ls_1(last.attention(h[:, :1], h, h))  # (B, 1, w): one query, every key
        cls = cls + last.ls_2(last.mlp(last.ln_2(cls)))
        pooled = v.ln_post(cls[:, 0])  # (B, w): LayerNorm is per row, before or after pooling alike
        return pooled if v.proj is None else pooled @ v.proj  # (B, E)


class OpenClipText(nn.Module):
    """open_clip's text tower. forward(ids (B, T) CLIP token ids, mask (B, T)) → EncoderOutput.

    Ids are padded with the tower's pad id to its context length (77 for CLIP) as open_clip's
    tokenizer does, and positions outside `mask` are reset to it. Without a mask, positions up
    to the pooled (EOT) token are valid.

    Shapes: tokens (B, T, E) projected token features (T = 1 for Hugging Face text towers),
    mask (B, T), pooled (B, E) = `encode_text`.
    """

    def __init__(self, model: nn.Module, cfg: dict, width: int) -> None:
        from open_clip.transformer import TextTransformer as OpenClipTextTransformer

        super().__init__()
        self.width = width
        text_cfg = cfg.get("text_cfg", {})
        self.pad_id = _text_pad_id(text_cfg)
        if hasattr(model, "text"):  # CustomTextCLIP: a self-contained text module
            self.text = model.text
            self.context_length = int(model.context_length)
            self.pool_type = getattr(self.text, "pool_type", None)
            self.eos_id = getattr(self.text, "eos_id", None)
            self.has_tokens = isinstance(self.text, OpenClipTextTransformer) and self.text.cls_emb is None
            if hasattr(self.text, "output_tokens"):  # as for the image tower (CoCa sets it with a cls token)
                self.text.output_tokens = self.has_tokens
        else:  # CLIP: the text tower lives on the model itself; keep just its parts
            self.text = None
            for part in ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection"):
                setattr(self, part, getattr(model, part))
            self.register_buffer("attn_mask", model.attn_mask, persistent=False)
            self.context_length = int(model.context_length)
            self.pool_type, self.eos_id = model.text_pool_type, getattr(model, "text_eos_id", None)
            self.has_tokens = True
        # Only the positions up to the pooled token matter when every position sees only those
        # before it and one token is pooled: then `pooled` runs just those (CLIP layout only, where
        # the causal mask and the positions are ours to slice).
        self.prefix_suffices = (self.text is None and _is_causal(self.attn_mask)
                                and self.pool_type in ("argmax", "eos", "first")
                                and (self.pool_type != "eos" or self.eos_id is not None))

    def _clip_forward(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        """open_clip `CLIP.encode_text` over the first L <= context length positions (the causal mask
        and the positional embeddings cut to L), keeping the per-token features."""
        from open_clip.transformer import text_global_pool

        L = ids.shape[1]
        cast_dtype = self.transformer.get_cast_dtype()
        x = self.token_embedding(ids).to(cast_dtype) + self.positional_embedding[:L].to(cast_dtype)  # (B, L, w)
        attn_mask = None if self.attn_mask is None else self.attn_mask[:L, :L]
        x = self.ln_final(self.transformer(x, attn_mask=attn_mask))
        pooled = text_global_pool(x, ids, self.pool_type, eos_token_id=self.eos_id)  # (B, w)
        return self._project(pooled), x

    def _project(self, x: Tensor) -> Tensor:
        proj = self.text_projection if self.text is None else self.text.text_projection
        if proj is None:
            return x
        return proj(x) if isinstance(proj, nn.Linear) else x @ proj

    def forward(self, ids: Tensor, mask: Tensor | None = None) -> EncoderOutput:
        B, T = ids.shape
        full, mask = self._pad(ids, mask)  # (B, L), (B, T)
        if self.text is None:
            pooled, tokens = self._clip_forward(full)
        elif self.has_tokens:
            pooled, tokens = self.text(full)
        else:
            pooled = self.text(full)
        if self.has_tokens:
            tokens = self._project(tokens[:, :T])  # (B, T, E)
        else:
            tokens, mask = pooled[:, None], mask.new_ones(B, 1)
        return EncoderOutput(tokens=tokens, mask=mask, pooled=pooled)

    def pooled(self, ids: Tensor, mask: Tensor | None = None) -> Tensor:
        """`forward(ids, mask).pooled` alone, (B, E): no per-token projection, and for a causal
        CLIP tower only the positions up to the last pooled token run (see the module docstring)."""
        full, _ = self._pad(ids, mask)  # (B, L)
        if self.text is None:
            return self._clip_forward(full[:, :self._positions_needed(full)])[0]
        out = self.text(full)
        return out[0] if self.has_tokens else out

    def _pad(self, ids: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """(B, T) ids → (B, L) ids as open_clip's tokenizer pads them, positions outside `mask` reset
        to the pad id; and the (B, T) mask (the default one when None)."""
        B, T = ids.shape
        if T > self.context_length:
            raise ValueError(f"text of {T} tokens exceeds the open_clip context length {self.context_length}")
        if mask is None:
            mask = self._default_mask(ids)
        full = torch.full((B, self.context_length), self.pad_id, dtype=ids.dtype, device=ids.device)
        full[:, :T] = ids.masked_fill(~mask, self.pad_id)  # (B, L)
        return full, mask

    def _positions_needed(self, full: Tensor) -> int:
        """How many leading positions of the padded (B, L) ids decide the pooled vectors."""
        if not self.prefix_suffices:
            return full.shape[1]
        if self.pool_type == "first":
            return 1
        pooled_at = full.argmax(dim=-1) if self.pool_type == "argmax" else (full == self.eos_id).int().argmax(dim=-1)
        return int(pooled_at.max()) + 1  # open_clip's own rule for the pooled position, on the same ids

    def _default_mask(self, ids: Tensor) -> Tensor:
        """Valid up to and including the token open_clip pools (EOT); everything when it pools otherwise."""
        positions = torch.arange(ids.shape[1], device=ids.device)
        if self.pool_type == "argmax":
            return positions <= ids.argmax(dim=-1, keepdim=True)
        if self.pool_type == "eos" and self.eos_id is not None:
            return positions <= (ids == self.eos_id).int().argmax(dim=-1, keepdim=True)
        return torch.ones_like(ids, dtype=torch.bool)


def _class_token_last_block(visual: nn.Module) -> bool:
    """True when `visual` is an open_clip ViT whose pooled vector is its class token after a plain
    self-attention last block: the layout `OpenClipImage._pool_class_token` reproduces."""
    from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

    if not isinstance(visual, VisionTransformer) or visual.attn_pool is not None or visual.pool_type != "tok":
        return False
    stack = visual.transformer
    last = stack.resblocks[-1] if len(stack.resblocks) else None
    return (hasattr(visual, "_embeds") and getattr(stack, "batch_first", False)
            and type(last) is ResidualAttentionBlock and not hasattr(last, "ln_1_kv"))


def _is_causal(attn_mask: Tensor | None) -> bool:
    """True for an additive (L, L) mask hiding exactly the later positions: -inf above the diagonal, 0 elsewhere."""
    if attn_mask is None or attn_mask.dim() != 2 or attn_mask.shape[0] != attn_mask.shape[1]:
        return False
    later = torch.ones(attn_mask.shape, dtype=torch.bool, device=attn_mask.device).triu(1)
    return bool(torch.isneginf(attn_mask[later]).all()) and bool((attn_mask[~later] == 0).all())


def open_clip_image(
    arch: str = "ViT-B-32", pretrained: str | None = None, cache_dir: str | None = None
) -> OpenClipImage:
    """Image tower of open_clip architecture `arch`; width = its embed_dim. See the module docstring.

    Args:
        arch: an `open_clip.list_models()` name, or `local-dir:<folder>` / `hf-hub:<repo>`.
        pretrained: None (random init), a local weights file, or an open_clip pretrained tag.
        cache_dir: where open_clip caches downloads (tags only).
    """
    model, cfg = create_open_clip_model(arch, pretrained, cache_dir)
    return OpenClipImage(model.visual, int(cfg["embed_dim"]), from_tag=model.pretrained_tag is not None)


def open_clip_text(arch: str = "ViT-B-32", pretrained: str | None = None, cache_dir: str | None = None) -> OpenClipText:
    """Text tower of open_clip architecture `arch`; input CLIP token ids (B, T <= context length).

    Args: as `open_clip_image`.
    """
    model, cfg = create_open_clip_model(arch, pretrained, cache_dir)
    return OpenClipText(model, cfg, int(cfg["embed_dim"]))
