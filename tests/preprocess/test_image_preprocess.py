"""Image preprocessing: every PIL mode → RGB, hostile files → BadInput, path == PIL == array."""

from __future__ import annotations

import struct
import subprocess
import zlib

import numpy as np
import pytest
import torch
from PIL import EpsImagePlugin, Image

from mmembed.errors import BadInput, ConfigError
from mmembed.preprocess import build_preprocessor
from mmembed.preprocess.image import CLIP_MEAN, CLIP_STD, ImagePreprocessor
from mmembed.preprocess.image_decode import load_image

SIZE = 16


def _gradient(w: int = 40, h: int = 24) -> Image.Image:
    x = np.linspace(0, 255, w, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 255, h, dtype=np.float32)[:, None, None]
    rgb = np.concatenate([x.repeat(h, 0), y.repeat(w, 1), (x + y).repeat(1, 0) / 2], axis=2)
    return Image.fromarray(rgb.astype(np.uint8), "RGB")


def _normalised(rgb: tuple[int, int, int]) -> torch.Tensor:
    """The expected (3,) output for a uniform image of colour `rgb`."""
    return (torch.tensor(rgb, dtype=torch.float32) / 255 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)


def _uniform_colour(out: torch.Tensor) -> torch.Tensor:
    assert out.shape == (3, SIZE, SIZE) and out.dtype == torch.float32
    flat = out.flatten(1)
    assert torch.allclose(flat.min(1).values, flat.max(1).values, atol=1e-5), "image should be uniform"
    return flat[:, 0]


def _bomb_png(path, width: int = 30000, height: int = 30000) -> None:
    """A valid 1x1 PNG whose IHDR is patched to claim width x height (CRC recomputed)."""
    Image.new("RGB", (1, 1), (255, 0, 0)).save(path)
    data = bytearray(path.read_bytes())
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))


# ---------------------------------------------------------------------------- modes → RGB


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda: Image.new("L", (20, 20), 128), (128, 128, 128)),
        (lambda: Image.new("1", (20, 20), 1), (255, 255, 255)),
        (lambda: Image.new("CMYK", (20, 20), (255, 0, 0, 0)), (0, 255, 255)),  # pure cyan
        (lambda: Image.new("RGBA", (20, 20), (255, 0, 0, 0)), (255, 255, 255)),  # transparent → background
        (lambda: Image.new("RGBA", (20, 20), (255, 0, 0, 255)), (255, 0, 0)),
        (lambda: Image.new("LA", (20, 20), (0, 255)), (0, 0, 0)),
        # 16-bit values are scaled, not clipped: 32896 / 257 = 128 (Pillow's convert gives 255)
        (lambda: Image.fromarray(np.full((20, 20), 32896, np.uint16)), (128, 128, 128)),
        (lambda: Image.fromarray(np.full((20, 20), 0.5, np.float32)), (128, 128, 128)),  # "F" in [0, 1]
        (lambda: Image.new("I", (20, 20), 65535), (255, 255, 255)),
    ],
    ids=["L", "1", "CMYK", "RGBA-clear", "RGBA-opaque", "LA", "I;16", "F", "I"],
)
def test_every_mode_becomes_the_right_rgb(make, expected):
    out = ImagePreprocessor(SIZE)(make())
    assert torch.allclose(_uniform_colour(out), _normalised(expected), atol=1e-5)


def test_palette_with_transparency_composites_on_background(tmp_path):
    im = Image.new("P", (20, 20), 1)
    im.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    im.info["transparency"] = 1  # index 1 (blue) is fully transparent
    path = tmp_path / "p.png"
    im.save(path, transparency=1)
    with Image.open(path) as check:
        assert check.mode == "P"
    out = ImagePreprocessor(SIZE, background=(0, 255, 0))(path)
    assert torch.allclose(_uniform_colour(out), _normalised((0, 255, 0)), atol=1e-5)


def test_sixteen_bit_png_file_is_scaled(tmp_path):
    path = tmp_path / "deep.png"
    Image.fromarray(np.full((20, 20), 65535, np.uint16)).save(path)
    with Image.open(path) as check:
        assert check.mode.startswith("I")
    assert torch.allclose(_uniform_colour(ImagePreprocessor(SIZE)(path)), _normalised((255, 255, 255)), atol=1e-5)


# ---------------------------------------------------------------------------- same image, any form


def test_path_pil_array_and_tensor_give_identical_tensors(tmp_path):
    path = tmp_path / "g.png"
    _gradient().save(path)
    pre = ImagePreprocessor(SIZE)
    from_path = pre(path)
    assert torch.equal(from_path, pre(str(path)))
    assert torch.equal(from_path, pre(Image.open(path)))
    assert torch.equal(from_path, pre(path.read_bytes()))
    hwc = np.array(Image.open(path))
    assert torch.equal(from_path, pre(hwc))
    assert torch.equal(from_path, pre(torch.from_numpy(hwc).permute(2, 0, 1)))
    # floats in [0, 1] take the float resize path: equal up to uint8 rounding of the resize
    assert torch.allclose(from_path, pre(hwc.astype(np.float32) / 255), atol=0.05)


def test_resize_keeps_aspect_and_centre_crops():
    im = Image.new("RGB", (60, 20), (0, 0, 255))
    im.paste((255, 0, 0), (0, 0, 10, 20))  # left sixth red: the centre crop (and its filter) never sees it
    out = ImagePreprocessor(SIZE)(im)
    assert out.shape == (3, SIZE, SIZE)
    assert torch.allclose(_uniform_colour(out), _normalised((0, 0, 255)), atol=1e-5)


def test_bad_arrays_are_rejected():
    pre = ImagePreprocessor(SIZE)
    with pytest.raises(BadInput, match="shape"):
        pre(np.zeros((4, 4, 5), np.uint8))
    with pytest.raises(BadInput, match="NaN"):
        pre(torch.full((3, 4, 4), float("nan")))
    with pytest.raises(BadInput, match="unsupported image input"):
        pre(12)
    # a float image of 0..255 values was clamped to [0, 1]: all white, embedded without a word
    # (cosine 1.000 with a white picture); a normalised one went the same way
    for values, span in ((np.full((4, 4, 3), 200.0, np.float32), r"\[200, 200\]"),
                         (torch.full((3, 4, 4), -1.8), r"\[-1.8, -1.8\]")):
        with pytest.raises(BadInput, match=f"a float image's values must lie in \\[0, 1\\], these span {span}"):
            pre(values)
    pre(torch.full((3, 4, 4), 1.0005))  # rounding just past 1 is clamped, as before
    pre(torch.full((3, 4, 4), 1.07))  # and a bicubic resize's overshoot at a sharp edge (up to ~10%)
    pre(torch.full((3, 4, 4), -0.07))


# ---------------------------------------------------------------------------- hostile files


def test_hostile_files_raise_badinput_with_reason(tmp_path):
    good = tmp_path / "good.png"
    _gradient().save(good)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    html = tmp_path / "page.png"
    html.write_text("<!DOCTYPE html><html><body>404 Not Found</body></html>")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    pre = ImagePreprocessor(SIZE)
    cases = {
        truncated: "corrupt or truncated",
        html: "not a readable image",
        empty: "empty file",
        tmp_path / "missing.png": "missing file",
        tmp_path: "not a file",
    }
    for path, reason in cases.items():
        with pytest.raises(BadInput, match=reason) as info:
            pre(path)
        assert str(path) in str(info.value)


@pytest.mark.parametrize(
    "side, reason",
    [
        (30000, "decompression bomb"),  # beyond Pillow's own hard limit: Pillow refuses at open()
        (10000, "header claims 10000x10000"),  # under Pillow's limit, over ours (64 M px)
    ],
)
def test_decompression_bomb_rejected_from_header_without_decoding(tmp_path, monkeypatch, side, reason):
    bomb = tmp_path / "bomb.png"
    _bomb_png(bomb, side, side)
    assert struct.unpack(">II", bomb.read_bytes()[16:24]) == (side, side)
    assert bomb.stat().st_size < 100

    def no_decoding(self):
        raise AssertionError("the image was decoded")

    monkeypatch.setattr(Image.Image, "load", no_decoding)
    monkeypatch.setattr("PIL.ImageFile.ImageFile.load", no_decoding)
    with pytest.raises(BadInput, match=reason) as info:
        ImagePreprocessor(SIZE)(bomb)
    assert str(bomb) in str(info.value)


def test_max_pixels_is_a_real_limit(tmp_path):
    path = tmp_path / "g.png"
    _gradient(40, 24).save(path)
    assert ImagePreprocessor(SIZE, max_pixels=40 * 24)(path).shape == (3, SIZE, SIZE)
    with pytest.raises(BadInput, match="too large"):
        ImagePreprocessor(SIZE, max_pixels=40 * 24 - 1)(path)


# ---------------------------------------------------------------------------- augmentation


def test_augmentation_only_when_training_seeded_and_after_preprocessing():
    im = _gradient(64, 48)
    plain = ImagePreprocessor(SIZE)(im)
    evaluating = ImagePreprocessor(SIZE, augment=True, train=False)
    assert torch.equal(evaluating(im), plain) and not evaluating.augments
    assert torch.equal(evaluating.augment(plain, torch.Generator().manual_seed(0)), plain)
    aug = ImagePreprocessor(SIZE, augment=True, train=True, affine_degrees=10, affine_translate=0.1,
                            color_jitter=0.3, hflip=True)
    assert aug.augments and not aug.stochastic  # calls stay deterministic: cacheable
    assert torch.equal(aug(im), plain)
    a = aug.augment(plain, torch.Generator().manual_seed(0))
    assert a.shape == plain.shape and torch.equal(aug.augment(plain, torch.Generator().manual_seed(0)), a)
    outs = [aug.augment(plain, torch.Generator().manual_seed(s)) for s in range(1, 5)]
    assert all(not torch.equal(o, plain) and not torch.equal(o, a) for o in outs)
    assert torch.equal(aug(im), plain)  # the input was not modified in place


def test_default_augmentation_keeps_colour():
    """Colour is a label in the synthetic world: the default augmentation must not change it."""
    red = Image.new("RGB", (40, 30), (200, 10, 10))
    aug = ImagePreprocessor(SIZE, augment=True, train=True)
    x = aug(red)
    for seed in range(5):
        out = aug.augment(x, torch.Generator().manual_seed(seed))
        assert torch.allclose(_uniform_colour(out), _normalised((200, 10, 10)), atol=1e-5)


def test_each_augmentation_does_what_it_says():
    """A left-heavy image: a flip moves the mass right; a crop zooms; jitter changes a grey
    level; an affine shift brings in the background."""
    a = np.zeros((SIZE, SIZE, 3), dtype=np.uint8)
    a[:, : SIZE // 4] = 255
    x = ImagePreprocessor(SIZE)(a)
    g = lambda s: torch.Generator().manual_seed(s)  # noqa: E731
    flip = ImagePreprocessor(SIZE, augment=True, train=True, crop_scale=(1.0, 1.0), hflip=True)
    flipped = [flip.augment(x, g(s)) for s in range(8)]
    assert any(torch.equal(f, x.flip(-1)) for f in flipped) and any(torch.equal(f, x) for f in flipped)
    crop = ImagePreprocessor(SIZE, augment=True, train=True, crop_scale=(0.25, 0.3))
    assert not torch.allclose(crop.augment(x, g(0)), x, atol=0.1)
    grey = ImagePreprocessor(SIZE)(Image.new("RGB", (SIZE, SIZE), (100, 100, 100)))
    jitter = ImagePreprocessor(SIZE, augment=True, train=True, crop_scale=(1.0, 1.0), color_jitter=0.5)
    assert not torch.allclose(jitter.augment(grey, g(0)), grey, atol=1e-3)
    black = ImagePreprocessor(SIZE, background=(255, 255, 255))(Image.new("RGB", (SIZE, SIZE)))
    shift = ImagePreprocessor(SIZE, augment=True, train=True, crop_scale=(1.0, 1.0), affine_translate=0.3)
    moved = [shift.augment(black, g(s)) for s in range(4)]
    assert all(float(m.max()) > float(black.max()) + 1 for m in moved)  # white fill came in


def test_augmentation_settings_are_validated():
    for bad in ({"affine_degrees": -1}, {"affine_translate": 0.5}, {"color_jitter": -0.1},
                {"color_jitter": float("inf")}, {"affine_degrees": float("nan")}, {"affine_degrees": float("inf")}):
        with pytest.raises(ConfigError):
            ImagePreprocessor(SIZE, **bad)


def test_collate_stacks_without_mask():
    pre = ImagePreprocessor(SIZE)
    batch, mask = pre.collate([pre(_gradient()), pre(Image.new("L", (5, 9)))])
    assert batch.shape == (2, 3, SIZE, SIZE) and mask is None


def test_load_image_returns_uint8_rgb_for_files(tmp_path):
    path = tmp_path / "c.jpg"
    Image.new("CMYK", (8, 6), (0, 255, 0, 0)).save(path)  # CMYK JPEG
    out = load_image(path)
    assert out.shape == (3, 6, 8) and out.dtype == torch.uint8


# ---------------------------------------------------------------------------- formats (issue #13)

_EPS = (
    b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n%%EndComments\n"
    b"newpath 0 0 moveto 10 10 lineto stroke\nshowpage\n%%EOF\n"
)


@pytest.fixture
def subprocesses(monkeypatch) -> list:
    """Every attempt to start a subprocess, refused and recorded (the list must stay empty)."""
    calls: list = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise AssertionError(f"a subprocess was started: {args}")

    monkeypatch.setattr(subprocess, "Popen", refuse)
    monkeypatch.setattr(subprocess, "run", refuse)
    # Pillow caches its Ghostscript probe: clear it so decoding an EPS would really spawn `gs`
    monkeypatch.setattr(EpsImagePlugin, "gs_binary", None, raising=False)
    return calls


def test_eps_named_png_is_refused_without_starting_a_subprocess(tmp_path, subprocesses):
    path = tmp_path / "x.png"
    path.write_bytes(_EPS)
    pre = ImagePreprocessor(SIZE)
    for item, name in ((path, str(path)), (path.read_bytes(), "<bytes>")):
        with pytest.raises(BadInput, match=r"format EPS is not allowed") as info:
            pre(item)
        assert name in str(info.value) and "allowed: PNG, JPEG, GIF, BMP, TIFF, WEBP" in str(info.value)
    assert subprocesses == []


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP"])
def test_every_allowed_format_decodes(tmp_path, fmt):
    path = tmp_path / "image.bin"  # the extension plays no part
    _gradient().save(path, format=fmt)
    pre = ImagePreprocessor(SIZE)
    out = pre(path)
    assert out.shape == (3, SIZE, SIZE) and torch.isfinite(out).all()
    reference = pre(_gradient())
    if fmt in ("PNG", "BMP", "TIFF"):  # lossless
        assert torch.equal(out, reference)
    else:  # JPEG/WebP compress, GIF quantises to 256 colours
        assert (out - reference).abs().mean() < 0.1


@pytest.mark.parametrize("fmt", ["ICO", "PPM"])
def test_valid_but_disallowed_format_is_refused_by_name(tmp_path, fmt):
    path = tmp_path / "image.png"
    _gradient(32, 32).save(path, format=fmt)
    with Image.open(path) as check:
        assert check.format == fmt  # a real, valid file of that format
    with pytest.raises(BadInput, match=rf"format {fmt} is not allowed") as info:
        ImagePreprocessor(SIZE)(path)
    assert str(path) in str(info.value)
    # opting in through the config key decodes it
    assert ImagePreprocessor(SIZE, formats=("PNG", fmt))(path).shape == (3, SIZE, SIZE)


def test_formats_are_validated_and_configurable_from_yaml(tmp_path):
    with pytest.raises(ConfigError, match=r"EPS.*valid: .*PNG") as info:
        ImagePreprocessor(SIZE, formats=("PNG", "EPS"))
    assert "JPEG" in str(info.value)
    with pytest.raises(ConfigError, match="formats"):
        ImagePreprocessor(SIZE, formats=())
    path = tmp_path / "image.ppm"
    _gradient().save(path)
    pre = build_preprocessor("image", {"size": SIZE, "formats": ["png", "ppm"]})  # a YAML list, any case
    assert torch.equal(pre(path), pre(_gradient()))
    with pytest.raises(BadInput, match="format PPM"):
        build_preprocessor("image", {"size": SIZE})(path)


def test_html_and_garbage_are_still_unreadable_not_a_format(tmp_path):
    html = tmp_path / "page.png"
    html.write_text("<!DOCTYPE html><html><body>404 Not Found</body></html>")
    with pytest.raises(BadInput, match="not a readable image"):
        ImagePreprocessor(SIZE)(html)


# ---------------------------------------------------------------------------- sides and aspect (issue #13)


def test_aspect_ratio_bomb_header_refused_before_decoding(tmp_path, monkeypatch):
    """16,000,000 x 1 passes the pixel-count guard; the resize would then ask for ~10^10 pixels."""
    bomb = tmp_path / "strip.png"
    _bomb_png(bomb, 16_000_000, 1)
    wide = tmp_path / "wide.png"
    _bomb_png(wide, 10_000, 10)  # under max_side, aspect 1000

    def no_decoding(self):
        raise AssertionError("the image was decoded")

    monkeypatch.setattr(Image.Image, "load", no_decoding)
    monkeypatch.setattr("PIL.ImageFile.ImageFile.load", no_decoding)
    pre = ImagePreprocessor(SIZE)
    with pytest.raises(BadInput, match=r"16000000x1 .*max_side 16384") as info:
        pre(bomb)
    assert str(bomb) in str(info.value)
    with pytest.raises(BadInput, match=r"10000x10 .*max_aspect 50"):
        pre(wide)
    with pytest.raises(BadInput, match="max_aspect 50"):
        pre(wide.read_bytes())


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda: np.zeros((1, 60), np.uint8), "max_aspect"),
        (lambda: np.zeros((60, 1, 3), np.float32), "max_aspect"),
        (lambda: torch.zeros(3, 1, 60, dtype=torch.uint8), "max_aspect"),
        (lambda: torch.zeros(2, 200), "max_aspect"),
        (lambda: Image.new("L", (1, 60)), "max_aspect"),
        (lambda: np.zeros((400, 20000), np.uint8), "max_side"),  # aspect 50 is fine, the side is not
    ],
    ids=["numpy-HW", "numpy-HWC", "torch-CHW", "torch-HW", "PIL", "numpy-side"],
)
def test_extreme_shapes_in_memory_are_refused(make, reason):
    with pytest.raises(BadInput, match=reason):
        ImagePreprocessor(SIZE)(make())


def test_side_and_aspect_limits_are_configurable():
    assert ImagePreprocessor(SIZE)(np.zeros((1, 50), np.uint8)).shape == (3, SIZE, SIZE)  # exactly 50:1
    assert ImagePreprocessor(SIZE, max_aspect=100)(np.zeros((1, 60), np.uint8)).shape == (3, SIZE, SIZE)
    with pytest.raises(BadInput, match="max_side 32"):
        ImagePreprocessor(SIZE, max_side=32)(np.zeros((33, 33), np.uint8))
    for bad in ({"max_side": 0}, {"max_aspect": 0.5}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            ImagePreprocessor(SIZE, **bad)


def test_any_failure_inside_preprocessing_is_badinput(monkeypatch):
    import mmembed.preprocess.image as image_module

    def broken_resize(*args, **kwargs):
        raise RuntimeError("resize exploded")

    monkeypatch.setattr(image_module.F, "resize", broken_resize)
    with pytest.raises(BadInput, match="RuntimeError: resize exploded"):
        ImagePreprocessor(SIZE)(_gradient())

    def out_of_memory(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(image_module.F, "resize", out_of_memory)
    with pytest.raises(MemoryError):  # the process is in trouble, not the item: never a skipped row
        ImagePreprocessor(SIZE)(_gradient())


def test_unusable_colour_settings_are_config_errors():
    for bad in ({"std": (float("nan"), 1.0, 1.0)}, {"mean": (0.5, float("inf"), 0.5)},
                {"background": (300, -10, 0)}):
        with pytest.raises(ConfigError, match="image preprocess"):
            ImagePreprocessor(SIZE, **bad)


def test_a_sixteen_bit_grey_png_with_a_transparent_value_is_composited(tmp_path):
    pixels = np.full((4, 4), 40000, dtype=np.uint16)
    pixels[:2] = 0  # the transparent value
    path = tmp_path / "grey16.png"
    Image.fromarray(pixels).save(path, transparency=0)
    assert Image.open(path).mode == "I;16" and Image.open(path).info.get("transparency") == 0
    rgb = load_image(path, background=(10, 200, 30))
    assert rgb[:, :2].reshape(3, -1).T.unique(dim=0).tolist() == [[10, 200, 30]]  # was black
    assert rgb[:, 2:].unique().tolist() == [156]  # 40000 / 65535 of 255, as without transparency


def test_big_endian_arrays_equal_native_ones():
    native = (np.arange(64, dtype=np.uint16) * 1000).reshape(8, 8)
    assert torch.equal(load_image(native.astype(">u2")), load_image(native))


def test_a_channel_layout_mistake_is_named_before_the_shape_limits():
    for item in (torch.zeros(512, 512, 3, dtype=torch.uint8), np.zeros((3, 512, 512), dtype=np.uint8)):
        with pytest.raises(BadInput, match="C in 1, 3, 4"):  # was "image too elongated ... 171:1"
            load_image(item)


def test_a_png_cut_after_its_signature_is_named_truncated(tmp_path):
    buffer = tmp_path / "whole.png"
    _gradient().save(buffer)
    for cut in (8, 33, 40):
        with pytest.raises(BadInput, match="truncated or corrupt PNG"):
            load_image(buffer.read_bytes()[:cut])


def test_a_size_past_max_side_names_the_setting():
    """size=20000 said 'PIL image 20000x20000 has a side > max_side', blaming an image."""
    with pytest.raises(ConfigError, match="size=20000 exceeds max_side=16384"):
        ImagePreprocessor(20000)


def test_a_float_image_a_resize_overshot_is_read_as_unit_range():
    """Mode F of [0, 1.02] became 0..255 (near black); the same array as numpy read as [0, 1]."""
    a = np.linspace(0, 1.02, 64 * 64, dtype=np.float32).reshape(64, 64)
    from_pil = load_image(Image.fromarray(a, mode="F"))
    from_array = load_image(np.clip(a, 0, 1))
    assert from_pil.float().mean() > 100
    torch.testing.assert_close(from_pil[0].float(), (from_array[0] * 255).round(), atol=1, rtol=0)


def test_a_closed_or_truncated_pil_image_says_so(tmp_path):
    """It said "cannot convert image mode 'RGB' to RGB (AssertionError)"."""
    Image.new("RGB", (16, 16), "red").save(tmp_path / "ok.png")
    with Image.open(tmp_path / "ok.png") as im:
        pass
    with pytest.raises(BadInput, match="corrupt, truncated or closed image"):
        load_image(im)


def test_content_errors_of_a_file_name_it(tmp_path):
    a = np.full((16, 16), np.nan, dtype=np.float32)
    Image.fromarray(a, mode="F").save(tmp_path / "nan.tiff")
    with pytest.raises(BadInput, match=r"NaN/Inf pixels: \S*nan.tiff$"):
        load_image(tmp_path / "nan.tiff")


def test_a_palette_of_rgba_colours_composites_as_its_own_png_does():
    """rgba.convert("P") keeps its alpha in the palette, not in info["transparency"]: its clear
    pixels read black, and its own PNG (which gets a tRNS chunk) white."""
    import io

    a = np.zeros((8, 8, 4), np.uint8)
    a[..., 0], a[4:, :, 3] = 200, 255  # the top half fully transparent
    image = Image.fromarray(a, "RGBA").convert("P")
    png = io.BytesIO()
    image.save(png, "PNG")
    direct = load_image(image)
    assert torch.equal(direct, load_image(png.getvalue()))
    assert direct[:, 0, 0].tolist() == [255, 255, 255]


@pytest.mark.parametrize("values, mode", [
    (np.linspace(0, 1000, 64 * 64, dtype=np.float32), "F"),  # a float TIFF of 0..1000: 75% white
    (np.linspace(0, 898_500, 64 * 64).astype(np.int32), "I"),  # 32-bit counts: 93% white
    (np.linspace(-300, 299, 64 * 64).astype(np.int32), "I"),  # signed 16-bit: all 0 or 1
], ids=["float-0..1000", "int32-0..898500", "signed-int16"])
def test_grey_values_outside_the_usual_ranges_are_scaled_by_their_own_range(tmp_path, values, mode):
    """Such grey images were clipped to 0..255 or 0..65535: mostly white, or all black."""
    image = Image.fromarray(values.reshape(64, 64))
    assert image.mode == mode
    image.save(tmp_path / "g.tiff")
    out = load_image(tmp_path / "g.tiff")
    expected = torch.from_numpy(np.rint(np.linspace(0, 255, 64 * 64)).reshape(64, 64))
    assert out.dtype == torch.uint8 and torch.equal(out[0], out[2])
    torch.testing.assert_close(out[0].float(), expected.float(), atol=1, rtol=0)  # min → 0, max → 255, linear
    assert torch.equal(out, load_image(image))


def test_grey_values_inside_the_usual_ranges_keep_their_meaning():
    """The scaling by own range applies outside 0..1, 0..255 and 0..65535 only (a constant is black)."""
    cases = [(np.full((8, 8), 0.5, np.float32), "F", 128), (np.full((8, 8), 100.0, np.float32), "F", 100),
             (np.full((8, 8), 200, np.int32), "I", 200), (np.full((8, 8), 32896, np.int32), "I", 128),
             (np.full((8, 8), 32896, np.uint16), "I;16", 128), (np.full((8, 8), 70_000, np.int32), "I", 0)]
    for values, mode, grey in cases:
        image = Image.fromarray(values)
        assert image.mode == mode
        assert torch.equal(load_image(image), torch.full((3, 8, 8), grey, dtype=torch.uint8))


def test_a_path_with_a_nul_byte_is_named_once_and_printably(tmp_path):
    """The message named the path twice, the second time with the raw NUL in it."""
    path = str(tmp_path / "a.png") + "\x00x"
    with pytest.raises(BadInput) as caught:
        load_image(path)
    assert str(caught.value) == f"unreadable file {path!a} (ValueError: embedded null byte)"


def test_a_grey_float_image_of_0_255_a_resize_overshot_keeps_its_values():
    """A bicubic resize took 0..255 to -8..263, which was then scaled by its own range: black read 8."""
    g = np.zeros((64, 64), np.float32)
    g[:, 20:40], g[10:20, :] = 255.0, 128.0
    resized = Image.fromarray(g).resize((48, 48), Image.BICUBIC)
    a = np.asarray(resized)
    assert a.min() < -5 and a.max() > 260  # the overshoot this is about
    expected = torch.from_numpy(np.clip(np.rint(a), 0, 255).astype(np.uint8))
    assert torch.equal(load_image(resized), expected.expand(3, -1, -1))


def _rgb16_png(pixels: np.ndarray, key: tuple[int, int, int]) -> bytes:
    """A 16-bit RGB PNG (colour type 2) of `pixels` (H, W, 3) uint16 with a tRNS chunk for `key`."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    h, w, _ = pixels.shape
    rows = b"".join(b"\0" + pixels[y].astype(">u2").tobytes() for y in range(h))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
            + chunk(b"tRNS", struct.pack(">HHH", *key)) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


@pytest.mark.parametrize("key, kept", [((65535, 32768, 256), (65535, 32768, 512)), ((0, 0, 255), (0, 0, 0xFF00))],
                         ids=["key-above-255", "key-below-256"])
@pytest.mark.parametrize("as_pil", [False, True])
def test_a_sixteen_bit_rgb_png_with_a_transparent_colour_is_composited(tmp_path, key, kept, as_pil):
    """Pillow keeps a 16-bit PNG's tRNS colour at 16 bits but decodes the pixels to 8: no pixel matched."""
    pixels = np.array([[key, kept]], dtype=np.uint16)  # (1, 2, 3)
    path = tmp_path / "rgb16.png"
    path.write_bytes(_rgb16_png(pixels, key))
    rgb = load_image(Image.open(path) if as_pil else path, background=(10, 200, 30))
    assert rgb[:, 0, 0].tolist() == [10, 200, 30]  # was the colour itself
    # the other pixel keeps its high bytes (for the second key they equal the key read as 8-bit)
    assert rgb[:, 0, 1].tolist() == [v >> 8 for v in kept]


def test_an_eight_bit_rgb_png_with_a_transparent_colour_still_composites(tmp_path):
    pixels = np.array([[[255, 128, 1], [255, 128, 2]]], dtype=np.uint8)
    path = tmp_path / "rgb8.png"
    Image.fromarray(pixels).save(path, transparency=(255, 128, 1))
    assert load_image(path, background=(10, 200, 30))[:, 0].T.tolist() == [[10, 200, 30], [255, 128, 2]]
