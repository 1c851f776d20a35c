"""mmembed.losses: parity with open_clip, symmetry, gradients, missing rows, pairs, labels, SigLIP."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss, SigLipLoss

from mmembed.config_train import LossConfig
from mmembed.errors import ConfigError
from mmembed.losses import ContrastiveLoss, build_loss
from mmembed.modality import Modality

IMAGE, TEXT, AUDIO = Modality.IMAGE, Modality.TEXT, Modality.AUDIO


def unit(b: int, d: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(b, d, generator=g, dtype=dtype), dim=-1)


def all_present(b: int, *mods: Modality) -> dict[Modality, torch.Tensor]:
    return {m: torch.ones(b, dtype=torch.bool) for m in mods}


# ---------------------------------------------------------------------------------------------
# InfoNCE
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scale", [1 / 0.07, 100.0])
def test_infonce_equals_open_clip_clip_loss(dtype, scale):
    zi, zt = unit(64, 32, 0, dtype).requires_grad_(), unit(64, 32, 1, dtype).requires_grad_()
    s = torch.tensor(scale, dtype=dtype)
    ours = ContrastiveLoss()({IMAGE: zi, TEXT: zt}, all_present(64, IMAGE, TEXT), s)
    ref = ClipLoss()(zi, zt, s)
    assert ours.total.dtype == dtype
    assert abs(ours.total.item() - ref.item()) <= 1e-6
    assert ours.per_pair == {"image-text": ours.total.detach()} and ours.n_pairs == {"image-text": 64}
    g_ours = torch.autograd.grad(ours.total, (zi, zt))
    g_ref = torch.autograd.grad(ref, (zi, zt))
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kind", ["infonce", "siglip"])
def test_swapping_modalities_gives_the_same_loss(kind):
    za, zb = unit(16, 8, 0), unit(16, 8, 1)
    present = all_present(16, IMAGE, TEXT)
    present[TEXT][3] = False
    loss = ContrastiveLoss(kind)
    args = dict(logit_scale=torch.tensor(20.0), logit_bias=torch.tensor(-5.0))
    one = loss({IMAGE: za, TEXT: zb}, present, **args).total
    swapped = loss({IMAGE: zb, TEXT: za}, {IMAGE: present[TEXT], TEXT: present[IMAGE]}, **args).total
    assert one.item() > 0.1
    torch.testing.assert_close(one, swapped, atol=1e-6, rtol=1e-6)


def test_infonce_near_zero_for_perfectly_aligned_pairs():
    q, _ = torch.linalg.qr(torch.randn(32, 32, generator=torch.Generator().manual_seed(0)))
    z = q[:16]  # 16 orthonormal rows, identical across modalities
    out = ContrastiveLoss()({IMAGE: z, TEXT: z.clone()}, {}, torch.tensor(100.0))
    assert 0 <= out.total.item() < 1e-3
    # and not near zero when the pairing is shuffled
    shuffled = ContrastiveLoss()({IMAGE: z, TEXT: z.roll(1, 0)}, {}, torch.tensor(100.0))
    assert shuffled.total.item() > 10


@pytest.mark.parametrize("kind", ["infonce", "siglip"])
@pytest.mark.parametrize("label_positives", [False, True])
def test_gradcheck_float64(kind, label_positives):
    b, d = 6, 4
    emb = [unit(b, d, i, torch.float64).requires_grad_() for i in range(3)]
    scale = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-1.0, dtype=torch.float64, requires_grad=True)
    present = all_present(b, IMAGE, TEXT, AUDIO)
    present[AUDIO][1] = False  # exercises the gathered (not fast) path
    labels = torch.tensor([0, 1, 0, -1, 2, 2])
    loss = ContrastiveLoss(kind, label_positives=label_positives)

    def f(zi, zt, za, s, bb):
        out = loss({IMAGE: zi, TEXT: zt, AUDIO: za}, present, s, labels, bb if kind == "siglip" else None)
        return out.total

    assert torch.autograd.gradcheck(f, (*emb, scale, bias))


def test_missing_row_contributes_no_gradient_and_its_junk_is_ignored():
    b = 6
    zi, zt = unit(b, 8, 0), unit(b, 8, 1)
    present = all_present(b, IMAGE, TEXT)
    present[TEXT][2] = False
    scale = torch.tensor(14.0)
    loss = ContrastiveLoss()

    def run(junk: torch.Tensor):
        zt_j = zt.clone()
        zt_j[2] = junk
        zi_g, zt_g = zi.clone().requires_grad_(), zt_j.requires_grad_()
        out = loss({IMAGE: zi_g, TEXT: zt_g}, present, scale)
        out.total.backward()
        return out, zi_g.grad, zt_g.grad

    out, gi, gt = run(torch.full((8,), 7.0))
    assert out.n_pairs == {"image-text": 5}
    assert torch.equal(gt[2], torch.zeros(8)) and torch.equal(gi[2], torch.zeros(8))
    assert gt[0].abs().sum() > 0  # the other rows do get gradient
    out_nan, _, gt_nan = run(torch.full((8,), float("nan")))
    assert torch.equal(out.total, out_nan.total) and torch.equal(gt_nan[2], torch.zeros(8))
    keep = present[TEXT]
    ref = ClipLoss()(zi[keep], zt[keep], scale)
    assert abs(out.total.item() - ref.item()) <= 1e-6


# ---------------------------------------------------------------------------------------------
# Pair selection and weights
# ---------------------------------------------------------------------------------------------


def three_modalities(b: int = 8):
    emb = {IMAGE: unit(b, 16, 0), TEXT: unit(b, 16, 1), AUDIO: unit(b, 16, 2)}
    present = all_present(b, IMAGE, TEXT, AUDIO)
    present[AUDIO][:3] = False
    return emb, present


def pair_ref(emb, present, a, b, scale):
    keep = present[a] & present[b]
    return ClipLoss()(emb[a][keep], emb[b][keep], scale).item()


def test_all_pairs_weighted_mean():
    emb, present = three_modalities()
    scale = torch.tensor(10.0)
    weights = {"text-image": 2.0, ("audio", "text"): 0.5}  # audio-image: default 1
    out = ContrastiveLoss(pair_weights=weights)(emb, present, scale)
    assert sorted(out.per_pair) == ["audio-image", "audio-text", "image-text"]
    assert out.n_pairs == {"audio-image": 5, "audio-text": 5, "image-text": 8}
    ref = {
        "image-text": pair_ref(emb, present, IMAGE, TEXT, scale),
        "audio-text": pair_ref(emb, present, AUDIO, TEXT, scale),
        "audio-image": pair_ref(emb, present, AUDIO, IMAGE, scale),
    }
    for k, v in ref.items():
        assert abs(out.per_pair[k].item() - v) <= 1e-6
        assert not out.per_pair[k].requires_grad
    expected = (2.0 * ref["image-text"] + 0.5 * ref["audio-text"] + ref["audio-image"]) / 3.5
    assert abs(out.total.item() - expected) <= 1e-6


def test_anchor_mode_and_zero_weight_select_pairs():
    emb, present = three_modalities()
    scale = torch.tensor(10.0)
    anchored = ContrastiveLoss(mode="anchor", anchor="image", pair_weights={frozenset((AUDIO, IMAGE)): 3.0})
    out = anchored(emb, present, scale)
    assert sorted(out.per_pair) == ["audio-image", "image-text"]
    it, ai = pair_ref(emb, present, IMAGE, TEXT, scale), pair_ref(emb, present, AUDIO, IMAGE, scale)
    assert abs(out.total.item() - (it + 3.0 * ai) / 4.0) <= 1e-6
    off = ContrastiveLoss(pair_weights={"image-text": 0.0, "audio-text": 0.0})(emb, present, scale)
    assert list(off.per_pair) == ["audio-image"]
    assert abs(off.total.item() - ai) <= 1e-6


def test_pairs_with_fewer_than_two_rows_are_skipped():
    emb, present = three_modalities(4)
    present[AUDIO][:] = torch.tensor([False, False, False, True])  # one audio row: no negatives
    out = ContrastiveLoss()(emb, present, torch.tensor(10.0))
    assert list(out.per_pair) == ["image-text"]
    present[TEXT][:] = False
    present[AUDIO][:] = False
    empty = ContrastiveLoss()({k: v.requires_grad_() for k, v in emb.items()}, present, torch.tensor(10.0))
    assert empty.per_pair == {} and empty.total.item() == 0.0
    empty.total.backward()  # still attached to the graph: a training step can run it


# ---------------------------------------------------------------------------------------------
# Label positives
# ---------------------------------------------------------------------------------------------


def infonce_reference(zi, zt, scale, labels=None):
    """Loops over rows: -log(exp(s_ii) / sum over the columns that are negatives or i)."""
    n = zi.shape[0]
    s = [[scale * float(zi[i] @ zt[j]) for j in range(n)] for i in range(n)]

    def negatives_or_self(i, j):
        return j == i or labels is None or labels[i] < 0 or labels[i] != labels[j]

    def row(i):  # -log softmax of cell (i, i) over row i's negatives
        return -s[i][i] + math.log(sum(math.exp(s[i][j]) for j in range(n) if negatives_or_self(i, j)))

    def col(j):
        return -s[j][j] + math.log(sum(math.exp(s[i][j]) for i in range(n) if negatives_or_self(j, i)))

    return (sum(row(i) for i in range(n)) + sum(col(j) for j in range(n))) / (2 * n)


def test_label_positives_masks_same_label_negatives():
    zi, zt = unit(5, 4, 0, torch.float64), unit(5, 4, 1, torch.float64)
    labels = torch.tensor([0, 0, 1, -1, -1])
    emb, present = {IMAGE: zi, TEXT: zt}, all_present(5, IMAGE, TEXT)
    plain = ContrastiveLoss()(emb, present, torch.tensor(5.0), labels).total.item()
    masked = ContrastiveLoss(label_positives=True)(emb, present, torch.tensor(5.0), labels).total.item()
    assert abs(plain - infonce_reference(zi, zt, 5.0)) <= 1e-9
    assert abs(masked - infonce_reference(zi, zt, 5.0, labels.tolist())) <= 1e-9
    assert masked < plain - 1e-3
    # -1 means "no label": two unlabelled rows stay negatives of each other
    none = ContrastiveLoss(label_positives=True)(emb, present, torch.tensor(5.0), torch.full((5,), -1)).total
    assert abs(none.item() - plain) <= 1e-12


# ---------------------------------------------------------------------------------------------
# SigLIP
# ---------------------------------------------------------------------------------------------


def siglip_reference(zi, zt, scale, bias, labels=None):
    n, total = zi.shape[0], 0.0
    for i in range(n):
        for j in range(n):
            pos = i == j or (labels is not None and labels[i] >= 0 and labels[i] == labels[j])
            logit = scale * float(zi[i] @ zt[j]) + bias
            total += math.log1p(math.exp(-logit if pos else logit))  # -log sigmoid(+-logit)
    return total / n


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_siglip_equals_reference_and_open_clip(dtype):
    zi, zt = unit(12, 8, 0, dtype), unit(12, 8, 1, dtype)
    scale, bias = torch.tensor(10.0, dtype=dtype), torch.tensor(-10.0, dtype=dtype)
    out = ContrastiveLoss("siglip")({IMAGE: zi, TEXT: zt}, {}, scale, logit_bias=bias)
    assert abs(out.total.item() - siglip_reference(zi.double(), zt.double(), 10.0, -10.0)) <= 1e-6
    assert abs(out.total.item() - SigLipLoss()(zi, zt, scale, bias).item()) <= 1e-6


def test_siglip_label_positives_equal_reference():
    zi, zt = unit(6, 4, 0, torch.float64), unit(6, 4, 1, torch.float64)
    labels = torch.tensor([3, 3, -1, -1, 5, 5])
    out = ContrastiveLoss("siglip", label_positives=True)(
        {IMAGE: zi, TEXT: zt}, {}, torch.tensor(4.0), labels, torch.tensor(-2.0)
    )
    assert abs(out.total.item() - siglip_reference(zi, zt, 4.0, -2.0, labels.tolist())) <= 1e-9


def test_siglip_without_bias_is_an_error():
    with pytest.raises(ValueError, match="logit_bias"):
        ContrastiveLoss("siglip")({IMAGE: unit(4, 4, 0), TEXT: unit(4, 4, 1)}, {}, torch.tensor(10.0))


# ---------------------------------------------------------------------------------------------
# Config and argument errors
# ---------------------------------------------------------------------------------------------


def test_build_loss_from_config():
    loss = build_loss(LossConfig(kind="siglip", mode="anchor", anchor="image", pair_weights={"text-image": 2.0}))
    assert loss.kind == "siglip" and loss.anchor is IMAGE
    assert loss.pairs([TEXT, AUDIO, IMAGE]) == [(IMAGE, AUDIO, 1.0), (IMAGE, TEXT, 2.0)]


@pytest.mark.parametrize(
    "fields, needle",
    [
        ({"pair_weights": {"image-txt": 1.0}}, "'image-txt'"),
        ({"pair_weights": {"image-image": 1.0}}, "'image-image'"),
        ({"pair_weights": {"image-text": 1.0, "text-image": 2.0}}, "given twice"),
        ({"pair_weights": {"image-text": -1.0}}, ">= 0"),
        ({"mode": "anchor", "anchor": "imgae"}, "loss.anchor 'imgae': unknown modality"),
        ({"mode": "anchor"}, "loss.anchor: mode=anchor needs"),
        ({"anchor": "image"}, "only used with mode=anchor"),
        ({"mode": "anchor", "anchor": "image", "pair_weights": {"audio-text": 1.0}}, "'audio-text'"),
    ],
)
def test_build_loss_rejects_bad_config_naming_the_key(fields, needle):
    with pytest.raises(ConfigError, match="^loss\\.") as err:
        build_loss(LossConfig(**fields))
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_mismatched_shapes_are_rejected():
    loss = ContrastiveLoss()
    with pytest.raises(ValueError, match="embeddings"):
        loss({IMAGE: unit(4, 8, 0), TEXT: unit(5, 8, 1)}, {}, torch.tensor(10.0))
    with pytest.raises(ValueError, match="present"):
        loss({IMAGE: unit(4, 8, 0), TEXT: unit(4, 8, 1)}, {TEXT: torch.ones(4)}, torch.tensor(10.0))
