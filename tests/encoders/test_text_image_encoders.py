"""Text and image encoders: shapes, padding invariance, batched = single, registry and weights files."""

from __future__ import annotations

import inspect
import typing

import pytest
import torch

from encoders import ENCODERS, EncoderOutput, ResNet, TextTransformer, ViT, WeightsFileError, build_encoder
from mmembed.config import check_kwargs
from mmembed.errors import ConfigError


def test_registry_names_and_unknown_name():
    assert set(ENCODERS) == {
        "text_transformer", "vit", "resnet", "audio_transformer", "audio_cnn", "open_clip_image", "open_clip_text",
    }
    with pytest.raises(ValueError, match="valid: text_transformer, vit, resnet"):
        build_encoder("bert")


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_every_builder_argument_is_typed(name):
    fn = ENCODERS[name]
    params = [p for p in inspect.signature(fn).parameters.values() if p.name != "self"]
    hints = typing.get_type_hints(fn.__init__ if inspect.isclass(fn) else fn)
    assert params and all(p.name in hints for p in params), name


def test_builder_kwargs_validate_from_yaml_values():
    block = {"channels": [8, 16], "time_strides": [2, 1]}  # as YAML gives it: lists, not tuples
    kwargs = check_kwargs(ENCODERS["audio_cnn"], block, "model.towers.audio.encoder_args")
    assert kwargs == {"channels": (8, 16), "time_strides": (2, 1)}
    assert build_encoder("audio_cnn", n_mels=16, groups=4, **kwargs).width == 16
    with pytest.raises(ConfigError, match="unknown key 'x.patch'"):
        check_kwargs(ENCODERS["vit"], {"patch": 8}, "x")
    with pytest.raises(ConfigError, match="pool must be one of"):
        check_kwargs(ENCODERS["text_transformer"], {"pool": "max"}, "x")


def _text(**kw) -> TextTransformer:
    torch.manual_seed(0)
    args = dict(vocab_size=50, width=32, layers=2, heads=4, max_len=16)
    return TextTransformer(**(args | kw)).eval()


TEXT_CASES = [  # every positional encoding, every pool, causal and not
    ("sinusoidal", "mean", False),
    ("learned", "last", False),
    ("learned", "cls", False),
    ("rotary", "mean", False),
    ("rotary", "last", True),
    ("sinusoidal", "cls", False),
]


@pytest.mark.parametrize("positional,pool,causal", TEXT_CASES)
def test_text_padding_batching_and_shapes(positional, pool, causal):
    model = _text(positional=positional, pool=pool, causal=causal)
    torch.manual_seed(1)
    lengths = [9, 4, 1]
    ids = torch.randint(0, 50, (3, 9))
    mask = torch.arange(9)[None] < torch.tensor(lengths)[:, None]
    garbage = ids.masked_fill(~mask, 7)
    with torch.no_grad():
        out = model(ids, mask)
        out_garbage = model(garbage, mask)
        singles = [model(ids[i : i + 1, :n]).pooled[0] for i, n in enumerate(lengths)]
        left = model(torch.cat([ids.new_zeros(1, 5), ids[1:2, :4]], 1), torch.arange(9)[None] >= 5)
    assert isinstance(out, EncoderOutput)
    assert out.tokens.shape == (3, 9, 32) and out.mask.shape == (3, 9) and out.pooled.shape == (3, 32)
    assert out.mask.dtype == torch.bool and torch.equal(out.mask, mask)
    torch.testing.assert_close(out.pooled, out_garbage.pooled, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.pooled, torch.stack(singles), atol=1e-5, rtol=0)
    torch.testing.assert_close(left.pooled[0], singles[1], atol=1e-5, rtol=0)  # left padding too


def test_text_fully_padded_row_is_finite():
    for pool in ("mean", "last", "cls"):
        model = _text(pool=pool)
        out = model(torch.randint(0, 50, (2, 5)), torch.tensor([[True] * 5, [False] * 5]))
        assert torch.isfinite(out.tokens).all() and torch.isfinite(out.pooled).all()


def test_text_pools_differ_and_errors():
    ids = torch.randint(0, 50, (2, 6))
    assert not torch.allclose(_text(pool="mean")(ids).pooled, _text(pool="last")(ids).pooled)
    with pytest.raises(ValueError, match="max_len=16"):
        _text()(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="causal"):
        _text(pool="cls", causal=True)


@pytest.mark.parametrize("size", ["vocab_size", "width", "layers", "heads", "max_len"])
@pytest.mark.parametrize("value", [-1, 0])
def test_text_sizes_out_of_range_are_one_line(size, value):
    # width=-1 was a RuntimeError ("negative dimension -1") from nn.Embedding, not a ValueError
    args = {"vocab_size": 50, "width": 32, "layers": 1, "heads": 4, "max_len": 16, size: value}
    with pytest.raises(ValueError, match=f"^{size} must be an integer >= 1, got {value}$"):
        TextTransformer(**args)


@pytest.mark.parametrize(
    "positional,pool,stem",
    [("learned", "cls", "patch"), ("sinusoidal", "mean", "patch"), ("sinusoidal_2d", "cls", "patch"),
     ("rotary", "mean", "patch"), ("none", "cls", "patch"), ("learned", "mean", "conv"),
     ("learned", "flatten", "conv")],
)
def test_vit_shapes_and_batched_equals_single(positional, pool, stem):
    torch.manual_seed(0)
    model = ViT(image_size=32, patch_size=8, width=32, layers=2, heads=4, positional=positional, pool=pool,
                stem=stem).eval()
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        out = model(images)
        single = torch.cat([model(images[i : i + 1]).pooled for i in range(3)])
    assert out.tokens.shape == (3, 16, 32) and out.mask.shape == (3, 16) and out.mask.all()
    assert out.pooled.shape == (3, 32) and model.width == 32
    torch.testing.assert_close(out.pooled, single, atol=1e-5, rtol=0)
    if pool == "mean":
        torch.testing.assert_close(out.pooled, out.tokens.mean(1))
    if pool == "flatten":  # one linear map of the tokens in grid order
        torch.testing.assert_close(out.pooled, model.flatten(out.tokens.reshape(3, -1)))


def test_vit_flatten_pool_knows_where_each_token_was():
    """A mean is blind to which grid cell holds which token; `flatten` is not: the same tokens
    in another order give another vector, and each cell's weights are its own."""
    torch.manual_seed(0)
    model = ViT(image_size=32, patch_size=8, width=32, layers=1, heads=4, pool="flatten").eval()
    assert model.flatten.in_features == 16 * 32 and model.flatten.out_features == 32
    tokens = torch.randn(1, 16, 32)
    swapped = tokens[:, torch.tensor([15] + list(range(1, 15)) + [0])]  # first and last cell exchanged
    assert torch.allclose(tokens.mean(1), swapped.mean(1), atol=1e-6)
    assert (model.flatten(tokens.flatten(1)) - model.flatten(swapped.flatten(1))).abs().max() > 1e-2
    with pytest.raises(ValueError, match="valid: cls, mean, flatten"):
        ViT(image_size=32, patch_size=8, width=32, layers=1, heads=4, pool="max")


def test_vit_errors():
    model = ViT(image_size=32, patch_size=8, width=32, layers=1, heads=4)
    with pytest.raises(ValueError, match="expected 32x32"):
        model(torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match="multiple of patch_size"):
        ViT(image_size=30, patch_size=8)
    with pytest.raises(ValueError, match="unknown positional encoding"):
        ViT(image_size=32, patch_size=8, width=32, layers=1, heads=4, positional="alibi")
    with pytest.raises(ValueError, match="power-of-2 patch_size"):
        ViT(image_size=36, patch_size=12, stem="conv")
    with pytest.raises(ValueError, match=r"one depth >= 1 per stage \(3 stages"):
        ViT(image_size=32, patch_size=8, stem="conv", stem_depth=(1, 2))
    # sizes out of range fail at construction, not as a shape error in the first forward pass
    for kwargs, message in [({"width": 0}, "width must be an integer >= 1, got 0"),
                            ({"patch_size": 0}, "patch_size must be an integer >= 1, got 0"),
                            ({"layers": 0}, "layers must be an integer >= 1, got 0"),
                            ({"heads": 0}, "heads must be an integer >= 1, got 0"),
                            ({"dropout": 1.0}, r"dropout must be in \[0, 1\), got 1.0"),
                            ({"mlp_ratio": 0.0}, "mlp_ratio must be > 0")]:
        with pytest.raises(ValueError, match=message):
            ViT(**{"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "heads": 4, **kwargs})
    with pytest.raises(ValueError, match="layers must be an integer >= 1, got 0"):
        TextTransformer(vocab_size=50, width=32, layers=0, heads=4)


def test_vit_conv_stem_depth_per_stage():
    """stem_depth (1, 2, 2) drops the full-resolution stage's second conv and nothing else."""
    def convs(depth):
        model = ViT(image_size=32, patch_size=8, width=32, layers=1, heads=4, stem="conv", stem_depth=depth)
        return [(m.in_channels, m.out_channels, m.stride[0]) for m in model.patchify if isinstance(m, torch.nn.Conv2d)]

    assert convs(2) == [(3, 32, 2), (32, 32, 1), (32, 32, 2), (32, 32, 1), (32, 32, 2), (32, 32, 1), (32, 32, 1)]
    assert convs((1, 2, 2)) == [c for i, c in enumerate(convs(2)) if i != 1]
    kwargs = check_kwargs(ENCODERS["vit"], {"stem_depth": [1, 2, 2]}, "x")  # a YAML list
    assert kwargs == {"stem_depth": (1, 2, 2)}


def test_resnet_tokens_pooled_and_local_weights(tmp_path):
    import torchvision

    torch.manual_seed(0)
    reference = torchvision.models.resnet18(weights=None).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so loading them is checked too
        for m in reference.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    torch.save(reference.state_dict(), tmp_path / "resnet18.pth")
    model = ResNet("resnet18", weights=str(tmp_path / "resnet18.pth")).eval()
    reference.fc = torch.nn.Identity()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = model(images)
        expected = reference(images)
    assert model.width == 512 and out.tokens.shape == (2, 4, 512) and out.mask.shape == (2, 4)
    torch.testing.assert_close(out.pooled, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.pooled, out.tokens.mean(1))


def test_resnet_weights_without_batchnorm_step_counters_load(tmp_path):
    """Files saved before BatchNorm kept `num_batches_tracked` load, as torch's strict load takes them."""
    import torchvision

    state = torchvision.models.resnet18(weights=None).state_dict()
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / "old.pth")
    model = ResNet("resnet18", weights=str(tmp_path / "old.pth"))
    torch.testing.assert_close(model.net.conv1.weight, state["conv1.weight"], atol=0, rtol=0)


def test_conv_stems_of_any_width_build():
    """GroupNorm's group count divides the stage's channels: widths of 4 or 100 build and run."""
    for width, heads, stem_channels in [(4, 1, 2), (100, 4, 32)]:
        model = ViT(image_size=32, patch_size=8, width=width, layers=1, heads=heads, stem="conv",
                    stem_channels=stem_channels)
        assert model(torch.randn(2, 3, 32, 32)).pooled.shape == (2, width)


def test_resnet_weights_that_do_not_fit_are_named(tmp_path):
    import torchvision

    state = torchvision.models.resnet18(weights=None).state_dict()
    state["layer5.weight"] = state.pop("layer4.1.conv2.weight")
    state["conv1.weight"] = torch.zeros(64, 3, 3, 3)
    torch.save(state, tmp_path / "bad.pt")
    expected = r"missing 1 \(e.g. layer4.1.conv2.weight\); unexpected 1 \(e.g. layer5.weight\); wrong shape 1"
    with pytest.raises(WeightsFileError, match=expected):
        ResNet("resnet18", weights=str(tmp_path / "bad.pt"))
    with pytest.raises(WeightsFileError, match="not found"):
        ResNet("resnet18", weights=str(tmp_path / "missing.pt"))
    with pytest.raises(WeightsFileError, match="is a folder, not a weights file"):
        ResNet("resnet18", weights=str(tmp_path))
    with pytest.raises(ValueError, match="valid: resnet18, resnet34, resnet50"):
        ResNet("resnet101")
