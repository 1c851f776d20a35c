"""Audio encoders over log-mel spectrograms: an AST-style transformer and a small 2-D CNN.

Input: log-mel (B, n_mels, frames) float with a frame mask (B, frames) bool, True = real frame;
clips in a batch are right-padded to the longest. Both encoders are exactly padding-invariant:
frames outside the mask are zeroed before anything reads them, and every later stage masks what
it pools, so a clip padded with anything gives the output of the clip alone.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from encoders.blocks import Transformer, check_sizes, norm_groups
from encoders.output import EncoderOutput, downsample_mask, masked_mean


def _check_audio(x: Tensor, mask: Tensor | None, n_mels: int, max_frames: int | None) -> Tensor:
    """Validate shapes; return the frame mask (all True when None)."""
    if x.dim() != 3 or x.shape[1] != n_mels:
        raise ValueError(f"expected log-mel of shape (B, {n_mels}, frames), got {tuple(x.shape)}")
    if max_frames is not None and x.shape[2] > max_frames:
        raise ValueError(f"{x.shape[2]} frames exceed max_frames={max_frames}")
    if mask is None:
        return torch.ones(x.shape[0], x.shape[2], dtype=torch.bool, device=x.device)
    if mask.shape != (x.shape[0], x.shape[2]) or mask.dtype != torch.bool:
        expected = (x.shape[0], x.shape[2])
        raise ValueError(f"frame mask must be bool of shape {expected}, got {mask.dtype} {tuple(mask.shape)}")
    return mask


class AudioTransformer(nn.Module):
    """Audio Spectrogram Transformer (Gong et al. 2021) with non-overlapping patches.

    The spectrogram is cut into patch_freq x patch_time patches (a conv with kernel = stride),
    flattened time-major — (t0,f0), (t0,f1), ..., (t1,f0) — so padding only appends patches and
    positions do not depend on the padded length. A patch is valid if any of its frames is.

    Args:
        n_mels: mel bins; a multiple of patch_freq.
        patch_freq, patch_time: patch size in mel bins and frames.
        width: model width W.
        layers, heads, mlp_ratio, dropout: transformer shape.
        max_frames: longest clip in frames (sizes the positional encoding).
        positional: 1-D encoding over the time-major patch sequence: `sinusoidal`, `learned`,
            `rotary` or `none`.
        pool: `mean` of the valid patch tokens, or a `cls` token.
        stem: `patch` (a linear patch embedding), `conv` (masked conv stages first, see
            `_conv_stem`), with `stem_channels` channels, or `templates`: no patch embedding at
            all, each time step's token is the timbre branch's two readouts, what matched and
            where (`TimbreBranch` with a pitch map; needs timbre_channels and patch_freq = n_mels).
        timbre_channels: 0, or the channels of a pitch-invariant branch added to every patch
            token (`TimbreBranch`): on a log-frequency axis a pitch change is a shift, and this
            branch's conv along frequency, max-pooled over frequency, does not move with it.
        timbre_kernel: its kernel size in frequency bins (odd; wide enough for a few harmonics).

    Why `templates`: a linear patch embedding reads pitch and timbre in one product, so what it
    learns for a (timbre, pitch) pair says little about a pair it never heard. The template
    bank's readouts are each blind to one of the two — max over frequency forgets the pitch, max
    over templates forgets which one matched — so an unheard pair is two familiar halves. On
    the demo world's held-out (shape, colour) pairs this lifted audio recall@1 by 0.05–0.18
    (README, "What the demo reaches today").

    Shapes:
        forward(mel (B, n_mels, T), mask (B, T)) → EncoderOutput(tokens (B, P, W),
        mask (B, P), pooled (B, W)), P = ceil(T / patch_time) * n_mels / patch_freq.
    """

    def __init__(
        self,
        n_mels: int = 64,
        patch_freq: int = 16,
        patch_time: int = 16,
        width: int = 192,
        layers: int = 4,
        heads: int = 4,
        mlp_ratio: float = 4.0,
        max_frames: int = 1024,
        positional: Literal["sinusoidal", "learned", "rotary", "none"] = "sinusoidal",
        pool: Literal["mean", "cls"] = "mean",
        dropout: float = 0.0,
        stem: Literal["patch", "conv", "templates"] = "patch",
        stem_channels: int = 32,
        timbre_channels: int = 0,
        timbre_kernel: int = 33,
    ) -> None:
        super().__init__()
        check_sizes(n_mels=n_mels, patch_freq=patch_freq, patch_time=patch_time, width=width,
                    max_frames=max_frames, stem_channels=stem_channels)
        if timbre_channels:  # 0 (or None) is no timbre branch; anything else must be a size
            check_sizes(timbre_channels=timbre_channels, timbre_kernel=timbre_kernel)
        if n_mels % patch_freq:
            raise ValueError(f"n_mels={n_mels} is not a multiple of patch_freq={patch_freq}")
        if pool not in ("mean", "cls"):
            raise ValueError(f"unknown pool {pool!r} (valid: mean, cls)")
        self.width, self.pool, self.n_mels, self.max_frames = width, pool, n_mels, max_frames
        self.patch_time, self.freq_patches = patch_time, n_mels // patch_freq
        if stem == "patch":
            self.stem = None
            self.patchify = nn.Conv2d(1, width, kernel_size=(patch_freq, patch_time), stride=(patch_freq, patch_time))
        elif stem == "conv":
            self.stem, self.patchify = _conv_stem(patch_freq, patch_time, stem_channels, width)
        elif stem == "templates":
            if not timbre_channels:
                raise ValueError(f"stem='templates' builds its tokens from the timbre branch: it needs "
                                 f"timbre_channels > 0 (got {timbre_channels})")
            if patch_freq != n_mels:
                raise ValueError(f"stem='templates' makes one token per time step: it needs patch_freq = n_mels "
                                 f"(got {patch_freq} and {n_mels})")
            self.stem = self.patchify = None
        else:
            raise ValueError(f"unknown stem {stem!r} (valid: patch, conv, templates)")
        pitch_bins = n_mels if stem == "templates" else None
        self.timbre = TimbreBranch(timbre_channels, timbre_kernel, patch_time, width, pitch_bins) if timbre_channels else None
        self.cls = nn.Parameter(torch.randn(width) * 0.02) if pool == "cls" else None
        max_patches = -(-max_frames // patch_time) * self.freq_patches + (1 if pool == "cls" else 0)
        self.transformer = Transformer(
            width, layers, heads, mlp_ratio, dropout, positional=positional, max_len=max_patches
        )

    def forward(self, mel: Tensor, mask: Tensor | None = None) -> EncoderOutput:
        """Encode log-mel spectrograms; see the class docstring for shapes."""
        mask = _check_audio(mel, mask, self.n_mels, self.max_frames)
        B = mel.shape[0]
        x = mel.masked_fill(~mask[:, None, :], 0.0)  # padding never reaches a patch
        x = F.pad(x, (0, (-x.shape[2]) % self.patch_time))  # whole patches; zeros like the padding
        x = x[:, None]  # (B, 1, n_mels, T)
        timbre = self.timbre(x) if self.timbre is not None else None  # (B, W, nT)
        if self.stem is not None:
            frames = F.pad(mask, (0, x.shape[-1] - mask.shape[1]))  # (B, T padded), False on the padding
            for stage in self.stem:
                x, frames = stage(x, frames)  # (B, C, F', T'): frequency-shift-equivariant features
        if self.patchify is None:  # stem='templates': the branch's readouts are the tokens
            x = timbre[:, :, None, :]  # (B, W, 1, nT)
        else:
            x = self.patchify(x)  # (B, W, nF, nT)
            if timbre is not None:
                x = x + timbre[:, :, None, :]  # the same pitch-invariant features on every band of a time step
        x = x.permute(0, 3, 2, 1).flatten(1, 2)  # (B, nT * nF, W), time-major
        patch_mask = downsample_mask(mask, self.patch_time).repeat_interleave(self.freq_patches, dim=1)  # (B, P)
        if self.cls is not None:
            x = torch.cat([self.cls.to(x.dtype).expand(B, 1, -1), x], dim=1)  # (B, 1 + P, W)
            full_mask = torch.cat([patch_mask.new_ones(B, 1), patch_mask], dim=1)
        else:
            full_mask = patch_mask
        x = self.transformer(x, full_mask)
        if self.cls is not None:
            pooled, tokens = x[:, 0], x[:, 1:]
        else:
            tokens = x
            pooled = masked_mean(tokens, patch_mask)
        return EncoderOutput(tokens=tokens, mask=patch_mask, pooled=pooled)


class TimbreBranch(nn.Module):
    """Pitch-invariant features per patch time step: frame mean → conv along frequency → max over frequency.

    Each of the `channels` filters spans `kernel` frequency bins of one time step, so it can
    match a spectral template (a timbre: which harmonics are strong). The max over frequency
    keeps how well the template matched, not where: on a log-frequency axis, where a change of
    pitch shifts a harmonic spectrum, the features stay put when the pitch changes, so a timbre
    heard at a new pitch gives the features it gave at the old ones. A 1x1 conv maps them to
    the model width. Frames are averaged over each patch first (zero-padded like the patches),
    which keeps the branch cheap: one conv per patch time step, not per frame.

    With `pitch_bins` (= F) the same template responses are also read the other way: max over
    the templates at each frequency bin, a map of where *some* template matched whichever it
    was, then a linear map from those F bins to the width. That readout carries the pitch
    while staying blind to which template (timbre) found it.

    forward(x (B, 1, F, T) with T a multiple of patch_time) → (B, W, T / patch_time).
    """

    def __init__(self, channels: int, kernel: int, patch_time: int, width: int, pitch_bins: int | None = None) -> None:
        super().__init__()
        if kernel < 1 or kernel % 2 == 0:
            raise ValueError(f"timbre_kernel={kernel} must be a positive odd number")
        self.patch_time = patch_time
        self.conv = nn.Conv2d(1, channels, (kernel, 1), padding=(kernel // 2, 0))
        self.proj = nn.Conv1d(channels, width, 1)
        self.pitch = nn.Conv1d(pitch_bins, width, 1) if pitch_bins else None

    def forward(self, x: Tensor) -> Tensor:
        x = F.avg_pool2d(x, (1, self.patch_time))  # (B, 1, F, nT)
        responses = self.conv(x)  # (B, C, F, nT)
        # max, then ReLU (the same as ReLU first, as ReLU is monotone, on a smaller tensor);
        # `max` back-propagates through its index, 3x cheaper than `amax`'s tie-sharing
        what = self.proj(F.relu(responses.max(dim=2).values))  # (B, W, nT): where in frequency is forgotten
        if self.pitch is None:
            return what
        where = F.relu(responses.max(dim=1).values)  # (B, F, nT): which template matched is forgotten
        return what + self.pitch(where)  # (B, W, nT)


def _conv_stem(patch_freq: int, patch_time: int, channels: int, width: int) -> tuple[nn.ModuleList, nn.Conv2d]:
    """Masked conv stages halving frequency and time down to the patch grid, then a 1x1 conv.

    Convolutions slide along the mel axis, so a timbre (a pattern of harmonics) is detected by
    the same filters at every pitch: the features compose pitch and timbre instead of memorising
    their combinations — what lets the encoder recognise a (timbre, pitch) pair it never heard.
    """
    steps_f, steps_t = patch_freq.bit_length() - 1, patch_time.bit_length() - 1
    if 1 << steps_f != patch_freq or 1 << steps_t != patch_time or steps_f < steps_t:
        raise ValueError(f"stem='conv' needs power-of-2 patch sizes with patch_freq >= patch_time, "
                         f"got {patch_freq} x {patch_time}")
    groups = norm_groups(channels)
    stages, c_in = [], 1
    for i in range(steps_f):
        stages.append(_ConvStage(c_in, channels, 2 if i < steps_t else 1, "group", groups))
        c_in = channels
    return nn.ModuleList(stages), nn.Conv2d(channels, width, 1)


class MaskedGroupNorm(nn.GroupNorm):
    """GroupNorm whose statistics cover only valid frames, so padding cannot shift them.

    forward(x (B, C, F, T), mask (B, T) bool) → (B, C, F, T).
    """

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:  # type: ignore[override]
        B, C, Fq, T = x.shape
        # Statistics in float32, as nn.GroupNorm does under autocast.
        g = x.float().view(B, self.num_groups, C // self.num_groups, Fq, T)
        m = mask.float()[:, None, None, None, :]  # (B, 1, 1, 1, T)
        count = (m.sum(dim=-1, keepdim=True) * (C // self.num_groups) * Fq).clamp(min=1.0)  # (B, 1, 1, 1, 1)
        mean = (g * m).sum(dim=(2, 3, 4), keepdim=True) / count
        var = (((g - mean) * m) ** 2).sum(dim=(2, 3, 4), keepdim=True) / count
        out = ((g - mean) * torch.rsqrt(var + self.eps)).view(B, C, Fq, T)
        return (out * self.weight[:, None, None] + self.bias[:, None, None]).type_as(x)


class _ConvStage(nn.Module):
    """conv3x3 (stride freq 2, time `stride`) → norm → ReLU → conv3x3 → norm → ReLU, masked."""

    def __init__(self, c_in: int, c_out: int, stride: int, norm: str, groups: int) -> None:
        super().__init__()
        self.stride = stride
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=(2, stride), padding=1, bias=False)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        make = (lambda: MaskedGroupNorm(groups, c_out)) if norm == "group" else (lambda: nn.BatchNorm2d(c_out))
        self.norm1, self.norm2 = make(), make()

    def _norm(self, norm: nn.Module, x: Tensor, mask: Tensor) -> Tensor:
        x = norm(x, mask) if isinstance(norm, MaskedGroupNorm) else norm(x)
        # Zero the padding again: the next 3x3 conv reads one frame past the last valid one,
        # which must look like the zero padding the unpadded clip would get.
        return F.relu(x) * mask[:, None, None, :].to(x.dtype)

    def forward(self, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        mask = downsample_mask(mask, self.stride)  # a 3-tap stride-s conv centred on s*t' covers it
        x = self._norm(self.norm1, self.conv1(x), mask)
        x = self._norm(self.norm2, self.conv2(x), mask)
        return x, mask


class AudioCNN(nn.Module):
    """A small 2-D CNN over the log-mel (PANNs-like), pooled over valid time steps.

    Args:
        n_mels: mel bins.
        channels: output channels per stage; width W = channels[-1]. Each stage halves the
            mel axis.
        time_strides: time downsampling per stage (same length as channels).
        norm: `group` (statistics over valid frames only: padding-invariant in training too) or
            `batch` (padding-invariant in eval; padded zeros enter training batch statistics).
        groups: groups for `group` norm; divides every channel count.
        max_frames: longest clip accepted, or None.

    Shapes:
        forward(mel (B, n_mels, T), mask (B, T)) → EncoderOutput(tokens (B, T', W) averaged over
        mel bins, mask (B, T'), pooled (B, W) masked mean over time), T' = T / prod(time_strides)
        rounded up.
    """

    def __init__(
        self,
        n_mels: int = 64,
        channels: tuple[int, ...] = (32, 64, 128, 256),
        time_strides: tuple[int, ...] = (2, 2, 2, 1),
        norm: Literal["group", "batch"] = "group",
        groups: int = 8,
        max_frames: int | None = None,
    ) -> None:
        super().__init__()
        if not channels:
            raise ValueError("channels is empty: give one channel count per stage")
        check_sizes(n_mels=n_mels, groups=groups,
                    **{f"channels[{i}]": c for i, c in enumerate(channels)},
                    **{f"time_strides[{i}]": s for i, s in enumerate(time_strides)})
        if len(time_strides) != len(channels):
            raise ValueError(f"time_strides has {len(time_strides)} entries for {len(channels)} stages")
        if norm not in ("group", "batch"):
            raise ValueError(f"unknown norm {norm!r} (valid: group, batch)")
        if norm == "group" and any(c % groups for c in channels):
            raise ValueError(f"groups={groups} must divide every channel count {tuple(channels)}")
        self.width, self.n_mels, self.max_frames = channels[-1], n_mels, max_frames
        ins = (1, *channels[:-1])
        self.stages = nn.ModuleList(_ConvStage(i, o, s, norm, groups) for i, o, s in zip(ins, channels, time_strides))

    def forward(self, mel: Tensor, mask: Tensor | None = None) -> EncoderOutput:
        """Encode log-mel spectrograms; see the class docstring for shapes."""
        mask = _check_audio(mel, mask, self.n_mels, self.max_frames)
        x = mel.masked_fill(~mask[:, None, :], 0.0)[:, None]  # (B, 1, n_mels, T)
        for stage in self.stages:
            x, mask = stage(x, mask)  # (B, C, F', T'), (B, T')
        tokens = x.mean(dim=2).transpose(1, 2)  # (B, T', W)
        return EncoderOutput(tokens=tokens, mask=mask, pooled=masked_mean(tokens, mask))
