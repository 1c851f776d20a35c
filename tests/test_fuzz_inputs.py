"""Hostile inputs, generated: every image file, WAV file and manifest line either becomes a
finite unit embedding or is refused with an mmembed error (`UserError`: BadInput, ...); through
`ManifestDataset` a refused row is skipped and counted. Any other exception fails the test.

Hypothesis draws the inputs (QUOTA examples per kind, at least 1,000 in all; derandomized, so
every run and CI try the same ones): images encoded by Pillow in many formats, modes and shapes
(1×N and N×1 included) and then mutated, random bytes, HTML named .png and 0-byte files; WAV
files with random sample formats, channel counts and rates, NaN/Inf samples, patched headers and
truncations; JSONL manifest lines with wrong types, absolute and `..` paths, huge captions,
invalid UTF-8, emoji and combining marks. Each input goes through a tiny randomly initialised
`Model.embed` (as a path and as bytes) and through a manifest → dataset → collate → tower pass.

A memory guard (RLIMIT_AS: the process's size at the start plus 3 GiB) turns an input that
would allocate tens of gigabytes into a failing example instead of a machine that swaps.
Run with `-s` to see the number of inputs tried (`--hypothesis-show-statistics` adds how many
were embedded and refused). `test_inputs_found_by_fuzzing` pins every failure the fuzzing has
found so far, so each stays a named regression test whatever Hypothesis draws next.
"""

from __future__ import annotations

import io
import json
import logging
import struct
import sys
import zlib
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from hypothesis import HealthCheck, Phase, currently_in_test_context, event, given, settings
from hypothesis import strategies as st
from PIL import Image

import mmembed as mm
from mmembed.config import ModelConfig, from_dict
from mmembed.data import ManifestDataset, SkipCounter, collate, read_manifest
from mmembed.data.dataset import Sample, Skipped
from mmembed.errors import UserError
from mmembed.model import build_model
from tests.conftest import TINY_MODEL

QUOTA = {"image": 450, "audio": 350, "manifest": 250}  # examples per kind; 1,050 in all
TRIED: Counter[str] = Counter()  # examples actually run, per kind
DIM = TINY_MODEL["embed_dim"]
HEADROOM = 3 << 30  # bytes of address space an input may use on top of the process at start
QUIET = logging.getLogger(f"{__name__}.skips")  # the skip counter's warnings: counted, not printed
QUIET.disabled = True


def fuzz_settings(kind: str) -> settings:
    return settings(max_examples=QUOTA[kind], deadline=None, derandomize=True, database=None,
                    phases=(Phase.explicit, Phase.generate, Phase.shrink), print_blob=False,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.large_base_example, HealthCheck.filter_too_much])


# --------------------------------------------------------------------------------------------
# Fixtures: a tiny random model, a data folder with a few real files, the memory guard
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one input at a time: tiny tensors, and no thread spinning on a busy machine
    torch.manual_seed(0)
    cfg = mm.load_config("demo")
    cfg.model = from_dict(ModelConfig, TINY_MODEL, "model", "test")
    tok = mm.Tokenizer.train(["a large red circle on the left", "a small blue star"] * 20, vocab_size=300)
    model = build_model(cfg, tok)
    model.space.eval()  # the dataset pass below encodes with the towers directly: no dropout
    yield model
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """The data root manifests resolve against: one good and a few bad files to point at."""
    root = tmp_path_factory.mktemp("fuzz")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (12, 20, 3), dtype=np.uint8)).save(root / "good.png")
    sf.write(root / "good.wav", rng.uniform(-0.5, 0.5, 3000).astype(np.float32), 16000)
    (root / "page.png").write_text("<html><body>not an image</body></html>")
    (root / "empty.wav").write_bytes(b"")
    (root / "sub").mkdir()
    (root / "sub" / "half.png").write_bytes((root / "good.png").read_bytes()[:60])
    return root


@pytest.fixture(scope="module", autouse=True)
def memory_guard(model):
    if not sys.platform.startswith("linux"):
        yield
        return
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    status = Path("/proc/self/status").read_text()
    size = int(status.split("VmSize:")[1].split()[0]) * 1024
    limit = size + HEADROOM if hard == resource.RLIM_INFINITY else min(size + HEADROOM, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


# --------------------------------------------------------------------------------------------
# The allowed outcomes
# --------------------------------------------------------------------------------------------


@contextmanager
def memory_bounded(what: str) -> Iterator[None]:
    """Out-of-memory under the guard becomes one stable failure (not a flaky allocator message
    that differs with each attempt's size)."""
    try:
        yield
    except MemoryError as e:
        raise AssertionError(f"{what} needed more than the {HEADROOM >> 30} GiB guard: MemoryError {e}") from e
    except RuntimeError as e:
        if "allocate" not in str(e):
            raise
        raise AssertionError(f"{what} needed more than the {HEADROOM >> 30} GiB guard: {e}") from e


def note_outcome(what: str) -> None:
    """Tally outcomes in Hypothesis' statistics (`--hypothesis-show-statistics`)."""
    if currently_in_test_context():
        event(what)


def embed_or_refuse(model, modality: str, item) -> torch.Tensor | None:
    """(D,) unit vector, or None when the model refused the item with an mmembed error."""
    try:
        with memory_bounded(f"Model.embed({modality!r})"):
            z = model.embed(modality, [item])
    except UserError as e:
        assert str(e).strip(), "an mmembed error must say why"
        return None
    assert z.shape == (1, DIM) and z.dtype == torch.float32
    bad = int((~torch.isfinite(z)).sum())
    assert bad == 0, f"Model.embed({modality!r}) returned {bad} non-finite values of {DIM} instead of refusing"
    assert abs(float(z.norm()) - 1.0) < 1e-4, float(z.norm())
    return z[0]


def dataset_pass(model, manifest_path: Path, root: Path):
    """manifest → ManifestDataset → collate → towers. Returns (manifest, results, {modality: (N, D)})
    or None when the whole manifest was refused with an mmembed error. Every row is either a
    sample or skipped, and every skip (read time or load time) is counted."""
    try:
        manifest = read_manifest(manifest_path, root=root)
        dataset = ManifestDataset(manifest, model.preprocessors)
    except UserError as e:
        assert str(e).strip()
        return None
    with memory_bounded("ManifestDataset"):
        results = [dataset[i] for i in range(len(dataset))]
    assert all(isinstance(r, (Sample, Skipped)) for r in results)
    batch = collate(results, dataset.preprocessors)
    counter = SkipCounter(logger=QUIET, every_s=1e9)
    counter.update(manifest.skipped)
    counter.update(batch.skipped)
    n_skipped = sum(isinstance(r, Skipped) for r in results)
    assert counter.total == len(manifest.skipped) + n_skipped
    assert len(batch) == len(results) - n_skipped
    embedded = {}
    with torch.inference_mode():
        for m, x in batch.inputs.items():
            z = model.space.encode(m, x, batch.masks.get(m))  # (N_m, D)
            assert bool(torch.isfinite(z).all()), f"a {m} sample the dataset kept embeds to non-finite values"
            torch.testing.assert_close(z.norm(dim=-1), torch.ones(z.shape[0]), atol=1e-4, rtol=0)
            embedded[m] = z
    return manifest, results, embedded


def check_media(model, root: Path, modality: str, data: bytes, suffix: str) -> None:
    """One file, three ways: its path and its bytes through `Model.embed` (the same verdict and
    vector), and a one-row manifest naming it, kept exactly when the file embeds."""
    path = root / f"fuzzed{suffix}"
    path.write_bytes(data)
    by_path = embed_or_refuse(model, modality, path)
    by_bytes = embed_or_refuse(model, modality, data)
    assert (by_path is None) == (by_bytes is None)
    note_outcome(f"{modality}: {'refused' if by_path is None else 'embedded'}")
    if modality == "image" and by_path is not None:  # only the allow-listed formats are decoded
        assert Image.open(io.BytesIO(data)).format in IMAGE_FORMATS
    if by_path is not None:
        torch.testing.assert_close(by_path, by_bytes, atol=1e-5, rtol=0)
    manifest_path = root / f"{modality}.jsonl"
    manifest_path.write_text(json.dumps({modality: path.name, "text": "a small blue star"}) + "\n")
    out = dataset_pass(model, manifest_path, root)
    assert out is not None
    _, results, embedded = out
    if by_path is None:
        assert isinstance(results[0], Skipped) and results[0].reason.startswith(modality), results[0]
    else:
        assert isinstance(results[0], Sample)
        torch.testing.assert_close(embedded[modality][0], by_path, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------
# Strategies: images
# --------------------------------------------------------------------------------------------

SAVE_FORMATS = ["PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "ICO", "PPM", "TGA", "PCX", "SGI", "IM", "QOI", "DDS",
                "MSP", "XBM", "SPIDER", "BLP", "JPEG2000", "EPS", "PDF", "DIB", "PALM"]
MODES = ["RGB", "L", "1", "P", "RGBA", "LA", "PA", "CMYK", "YCbCr", "LAB", "HSV", "I", "I;16", "F", "RGBX"]
MAGIC = [b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"GIF89a", b"BM", b"RIFF\x00\x00\x00\x00WEBP", b"II*\x00",
         b"MM\x00*", b"%!PS-Adobe-3.0 EPSF-3.0\n", b"8BPS", b"\x00\x00\x01\x00", b"P6\n", b"qoif"]
IMAGE_FORMATS = {"PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP"}  # the formats the image preprocessor opens by default
SUFFIXES = [".png", ".jpg", ".gif", ".bmp", ".webp", ".tif", ".txt", ""]


@st.composite
def image_sizes(draw) -> tuple[int, int]:
    shape = draw(st.sampled_from(["small", "small", "small", "medium", "sliver", "strip"]))
    if shape == "small":
        return draw(st.integers(1, 40)), draw(st.integers(1, 40))
    if shape == "medium":
        return draw(st.integers(41, 400)), draw(st.integers(41, 400))
    if shape == "strip":  # a few pixels wide, 50 to 5,000 times as long
        side = draw(st.integers(2, 8))
        w, h = side, side * draw(st.integers(50, 5000))
    else:  # 1×N and N×1, up to extreme aspect ratios
        w, h = 1, draw(st.sampled_from([2, 3, 51, 16384, 16385, 65536, 200_000, 3_000_000]) | st.integers(2, 3_000_000))
    return (w, h) if draw(st.booleans()) else (h, w)


def _pixels(mode: str, size: tuple[int, int], seed: int, special: str) -> Image.Image:
    w, h = size
    rng = np.random.default_rng(seed)
    small = w * h <= 1 << 16  # big images are one colour: cheap to make, cheap to encode
    if mode in ("I;16", "I", "F"):
        dtype = {"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode]
        a = rng.integers(0, 65536, (h, w)).astype(dtype) if small else np.full((h, w), 7, dtype)
        if mode == "F" and special != "none":
            a.flat[rng.integers(0, a.size)] = {"nan": np.nan, "inf": np.inf, "big": 1e30}[special]
        return Image.fromarray(a)  # uint16 → I;16, int32 → I, float32 → F
    rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8) if small else np.full((h, w, 3), 90, np.uint8)
    im = Image.fromarray(rgb)
    try:
        im = im.convert(mode)
    except (ValueError, OSError):
        return im
    im.info.pop("icc_profile", None)  # LAB conversion attaches one with a creation time: not reproducible
    return im


def _encode(im: Image.Image, fmt: str) -> tuple[bytes, str]:
    """Save in `fmt`, falling back to RGB, then to PNG, when Pillow cannot write that combination."""
    for name, to_rgb in ((fmt, False), (fmt, True), ("PNG", False), ("PNG", True)):
        buf = io.BytesIO()
        try:
            image = im.convert("RGB") if to_rgb else im
            image.save(buf, format=name)
        except MemoryError:
            raise
        except Exception:  # noqa: BLE001 - any combination Pillow cannot write: try the next
            continue
        return buf.getvalue(), f"{name}/{image.mode}"
    raise AssertionError(f"Pillow could not write {im.mode} {im.size} at all")


@st.composite
def mutated(draw, data: bytes) -> bytes:
    how = draw(st.sampled_from(["none"] * 4 + ["truncate", "flip", "insert", "zero", "poke", "append"]))
    n = len(data)
    if how == "none" or n == 0:
        return data
    at = draw(st.integers(0, n - 1))
    if how == "truncate":
        return data[:at]
    if how == "flip":
        out = bytearray(data)
        for _ in range(draw(st.integers(1, 8))):
            out[draw(st.integers(0, n - 1))] ^= draw(st.integers(1, 255))
        return bytes(out)
    if how == "insert":
        return data[:at] + draw(st.binary(min_size=1, max_size=64)) + data[at:]
    if how == "zero":
        return data[:at] + bytes(min(n - at, draw(st.integers(1, 256)))) + data[at + 256:]
    if how == "poke":  # a header field (sizes, offsets, counts) set to an arbitrary 32-bit value
        at = draw(st.integers(0, min(n, 64) - 1))
        value = struct.pack(draw(st.sampled_from(["<i", ">i", "<I", ">I"])), draw(st.integers(0, 2**31 - 1)))
        return data[:at] + value + data[at + 4:]
    return data + draw(st.binary(min_size=1, max_size=512))


def _png_claiming(width: int, height: int) -> bytes:
    """A valid 2×2 PNG whose IHDR (with a correct CRC) claims width × height."""
    buf = io.BytesIO()
    Image.new("RGB", (2, 2), (200, 10, 10)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    ihdr = bytearray(data[12:29])  # b"IHDR" + 13 bytes of fields
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(data)


@st.composite
def image_files(draw) -> tuple[str, bytes, str]:
    """(description, file bytes, file suffix)."""
    kind = draw(st.sampled_from(["pillow"] * 6 + ["random", "magic", "html", "empty", "claims"]))
    suffix = draw(st.sampled_from(SUFFIXES))
    if kind == "random":
        return kind, draw(st.binary(max_size=512)), suffix
    if kind == "magic":
        return kind, draw(st.sampled_from(MAGIC)) + draw(st.binary(max_size=256)), suffix
    if kind == "html":
        return kind, b"<!DOCTYPE html><html><body><img src='x.png'></body></html>\n", ".png"
    if kind == "empty":
        return kind, b"", suffix
    if kind == "claims":  # decompression bombs and absurd headers
        w = draw(st.sampled_from([1, 2, 30000, 65535, 2**31 - 1]) | st.integers(1, 2**31 - 1))
        h = draw(st.sampled_from([1, 2, 30000, 65535, 2**31 - 1]) | st.integers(1, 2**31 - 1))
        return f"png claiming {w}x{h}", draw(mutated(_png_claiming(w, h))), ".png"
    size = draw(image_sizes())
    mode = draw(st.sampled_from(MODES))
    special = draw(st.sampled_from(["none", "none", "nan", "inf", "big"]))
    im = _pixels(mode, size, draw(st.integers(0, 2**16)), special)
    # the allowed formats get most of the draws; the others must be refused whatever they hold
    fmt = draw(st.sampled_from(sorted(IMAGE_FORMATS) * 3 + SAVE_FORMATS)) if max(size) <= 16383 else "PNG"
    data, written = _encode(im, fmt)
    return f"{written} {size[0]}x{size[1]} {special}", draw(mutated(data)), suffix


# --------------------------------------------------------------------------------------------
# Strategies: WAV files
# --------------------------------------------------------------------------------------------

SUBTYPES = ["PCM_16", "PCM_24", "PCM_32", "PCM_U8", "FLOAT", "DOUBLE", "ULAW", "ALAW", "IMA_ADPCM", "MS_ADPCM",
            "GSM610"]
RATES = [8000, 11025, 16000, 22050, 44100, 48000, 96000]
ODD_RATES = [0, 1, 2, 3, 7, 100, 4000, 11024, 44101, 192000, 999_983, 2**31 - 1, 2**32 - 1]


def _chunk_offset(data: bytes, tag: bytes) -> int | None:
    at = data.find(tag, 12)
    return None if at < 0 else at


@st.composite
def wav_files(draw) -> tuple[str, bytes, str]:
    """(description, file bytes, file suffix)."""
    kind = draw(st.sampled_from(["soundfile"] * 6 + ["random", "riff", "text", "empty"]))
    if kind == "random":
        return kind, draw(st.binary(max_size=512)), ".wav"
    if kind == "riff":
        size, body = draw(st.binary(min_size=4, max_size=4)), draw(st.binary(max_size=256))
        return kind, b"RIFF" + size + b"WAVEfmt " + body, ".wav"
    if kind == "text":
        return kind, ("definitely not audio " * draw(st.integers(1, 50))).encode(), ".wav"
    if kind == "empty":
        return kind, b"", ".wav"
    frames = draw(st.sampled_from([0, 1, 2, 400, 3000]) | st.integers(0, 6000))
    channels = draw(st.sampled_from([1, 1, 2]) | st.integers(1, 64))
    rate = draw(st.sampled_from(RATES) | st.integers(1, 400_000))
    subtype = draw(st.sampled_from(SUBTYPES))
    amplitude = draw(st.sampled_from([0.0, 1e-6, 0.5, 0.5, 1.0, 2.0, 1e6, 1e20, 3e38]))  # float files keep them all
    special = draw(st.sampled_from(["none", "none", "nan", "inf", "-inf", "all_nan"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    samples = rng.uniform(-1, 1, (frames, channels)) * amplitude
    if frames and special != "none":
        value = {"nan": np.nan, "inf": np.inf, "-inf": -np.inf, "all_nan": np.nan}[special]
        if special == "all_nan":
            samples[:] = value
        else:
            samples[rng.integers(0, frames), rng.integers(0, channels)] = value
    data, written = None, ""
    for sub, sr in ((subtype, rate), ("FLOAT", rate), ("FLOAT", 16000)):
        buf = io.BytesIO()
        # only float files can hold NaN/Inf or values past full scale (libsndfile's u-law and
        # A-law encoders crash the writer on them)
        values = samples if sub in ("FLOAT", "DOUBLE") else np.nan_to_num(np.clip(samples, -1, 1))
        try:
            sf.write(buf, values, sr, subtype=sub, format="WAV")
        except MemoryError:
            raise
        except Exception:  # noqa: BLE001 - libsndfile refuses some combinations: try the next
            continue
        data, written = buf.getvalue(), f"{sub} {sr} Hz {channels} ch {frames} frames {special} x{amplitude:g}"
        break
    assert data is not None
    patch = draw(st.sampled_from(["none"] * 5 + ["rate", "channels", "bits", "data_size"]))
    fmt = _chunk_offset(data, b"fmt ")
    if patch != "none" and fmt is not None:
        out = bytearray(data)
        if patch == "rate":  # the fmt chunk's sample rate, byte rate kept consistent where it fits
            value = draw(st.sampled_from(ODD_RATES) | st.integers(0, 2**32 - 1))
            out[fmt + 12:fmt + 16] = struct.pack("<I", value)
            block = struct.unpack("<H", out[fmt + 20:fmt + 22])[0]
            out[fmt + 16:fmt + 20] = struct.pack("<I", (value * block) & 0xFFFFFFFF)
        elif patch == "channels":
            value = draw(st.sampled_from([0, 3, 255, 1024, 65535]) | st.integers(0, 65535))
            out[fmt + 10:fmt + 12] = struct.pack("<H", value)
        elif patch == "bits":
            value = draw(st.sampled_from([0, 1, 7, 12, 33, 64, 65535]))
            out[fmt + 22:fmt + 24] = struct.pack("<H", value)
        else:
            at = _chunk_offset(data, b"data")
            value = draw(st.sampled_from([0, 1, 2**31, 2**32 - 1]) | st.integers(0, 2**32 - 1))
            if at is not None:
                out[at + 4:at + 8] = struct.pack("<I", value)
        data, written = bytes(out), f"{written}, header {patch}={value}"
    return written, draw(mutated(data)), ".wav"


# --------------------------------------------------------------------------------------------
# Strategies: manifest lines
# --------------------------------------------------------------------------------------------

PATHS = ["good.png", "good.wav", "page.png", "empty.wav", "sub/half.png", "missing.png", "sub/../good.png",
         "/etc/passwd", "/tmp/x.png", "../good.png", "sub/../../good.wav", "./good.png", "good.png/..", ".", "",
         " ", "~/good.png", "C:\\x.png", "file:///etc/passwd", "\x00.png", "a\x00b.wav", "\ud800.wav", "good.png\n",
         "sub", "sub/"]
ODD_TEXT = ["🔴🟦⭐ a red circle", "e\u0301\u0301\u0301", "a\u200b\u200d\ufeffb", "مرحبا بالعالم", "\U0001f468\u200d"
            "\U0001f469\u200d\U0001f467", "\x00\x01\x7f", "\ud800", "\n\t  ", "Z̷̢̛a̴l̶g̵o̸", "\u202etxt.exe"]
CAPTIONS = (st.text(max_size=40) | st.sampled_from(ODD_TEXT)
            | st.builds(lambda piece, n: piece * n, st.sampled_from(["a red circle ", "🔴", "e\u0301", "x"]),
                        st.sampled_from([1000, 20_000, 80_000])))  # up to ~1 MB
SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10)
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                                          max_size=3), max_leaves=8)
KEYS = st.sampled_from(["image", "audio", "text", "label", "id", "Image", " text", "text "]) | st.text(max_size=6)
VALUES = st.sampled_from(PATHS) | CAPTIONS | JSON


@st.composite
def manifest_lines(draw) -> bytes:
    kind = draw(st.sampled_from(["usable"] * 3 + ["row"] * 3 + ["json", "binary", "cut", "bad_utf8", "blank"]))
    if kind == "usable":  # modality columns with string values: rows the reader keeps, unless a path is refused
        row = draw(st.fixed_dictionaries({}, optional={"image": st.sampled_from(PATHS), "audio": st.sampled_from(PATHS),
                                                       "text": CAPTIONS, "label": SCALARS}))
        return json.dumps(row, ensure_ascii=draw(st.booleans())).encode("utf-8", "surrogatepass")
    if kind in ("row", "cut", "bad_utf8"):
        row = draw(st.dictionaries(KEYS, VALUES, max_size=5))
        line = json.dumps(row, ensure_ascii=draw(st.booleans())).encode("utf-8", "surrogatepass")
        if kind == "cut":
            return line[:draw(st.integers(0, max(0, len(line) - 1)))]
        if kind == "bad_utf8":
            at = draw(st.integers(0, len(line)))
            junk = draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80"]))
            return line[:at] + junk + line[at:]
        return line
    if kind == "json":
        return json.dumps(draw(JSON)).encode()
    if kind == "binary":
        return draw(st.binary(max_size=200)).replace(b"\n", b" ")
    return draw(st.sampled_from([b"", b"   ", b"\t", b"\r"]))


def _nonblank_lines(data: bytes) -> set[int]:
    """Line numbers a manifest reader must account for: everything but whitespace-only lines."""
    out = set()
    for number, raw in enumerate(io.BytesIO(data), start=1):
        try:
            text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError:
            out.add(number)
            continue
        if text.strip():
            out.add(number)
    return out


# --------------------------------------------------------------------------------------------
# The tests
# --------------------------------------------------------------------------------------------


@fuzz_settings("image")
@given(item=image_files())
def test_fuzz_image_files(model, root, item):
    TRIED["image"] += 1
    _, data, suffix = item
    check_media(model, root, "image", data, suffix)


@fuzz_settings("audio")
@given(item=wav_files())
def test_fuzz_wav_files(model, root, item):
    TRIED["audio"] += 1
    _, data, suffix = item
    check_media(model, root, "audio", data, suffix)


def check_manifest(model, root: Path, lines: list[bytes], crlf: bool = False, bom: bool = False) -> None:
    """A JSONL manifest of these lines: read, loaded, batched and embedded (see `dataset_pass`),
    every line accounted for, no path outside the root; each line is also a caption."""
    data = (b"\xef\xbb\xbf" if bom else b"") + b"".join(line + (b"\r\n" if crlf else b"\n") for line in lines)
    path = root / "fuzzed.jsonl"
    path.write_bytes(data)
    out = dataset_pass(model, path, root)
    note_outcome("manifest: refused as a whole" if out is None else f"manifest: {min(len(out[0].rows), 2)}+ rows read")
    if out is not None:
        manifest, results, _ = out
        kept = {row.line for row in manifest.rows}
        refused = {line for line, _ in manifest.skipped}
        assert not kept & refused and kept | refused == _nonblank_lines(data)
        for row in manifest.rows:  # nothing outside the data root gets through
            for value in row.items.values():
                assert not isinstance(value, Path) or value.is_relative_to(root), value
        assert [r.line for r in results] == [row.line for row in manifest.rows]
    for line in lines:  # every raw line is also a caption, as bytes (invalid UTF-8 included)
        embed_or_refuse(model, "text", line)


@fuzz_settings("manifest")
@given(lines=st.lists(manifest_lines(), min_size=1, max_size=6), crlf=st.booleans(), bom=st.booleans())
def test_fuzz_manifest_lines(model, root, lines, crlf, bom):
    TRIED["manifest"] += 1
    check_manifest(model, root, lines, crlf, bom)


def test_fuzz_input_count():
    """Runs after the three fuzz tests (file order) and checks they tried their quota."""
    if set(TRIED) != set(QUOTA):
        pytest.skip("run the whole file: the count covers the three fuzz tests")
    print(f"\nfuzz: {sum(TRIED.values())} inputs ({', '.join(f'{k} {n}' for k, n in TRIED.items())})")
    assert sum(TRIED.values()) >= 1000
    for kind, quota in QUOTA.items():
        assert TRIED[kind] >= quota, kind


# --------------------------------------------------------------------------------------------
# What the fuzzing found, pinned: each input as found (shrunk), under the same checks
# --------------------------------------------------------------------------------------------


def _png(size: tuple[int, int], fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (90, 90, 90)).save(buf, format=fmt)
    return buf.getvalue()


def _wav(samples: list[float], rate: int = 16000, subtype: str = "FLOAT", header_rate: int | None = None) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, np.asarray(samples, np.float32), rate, subtype=subtype, format="WAV")
    data = bytearray(buf.getvalue())
    if header_rate is not None:  # the fmt chunk's sample rate field
        data[24:28] = struct.pack("<I", header_rate)
    return bytes(data)


FOUND = {
    # a 1×3,000,000 strip: resizing its short side to 32 px allocates ~9 GB
    "image-aspect-1x3000000": ("image", lambda: _png((1, 3_000_000)), ".png"),
    # a format outside the allow-list (Pillow would also open EPS via Ghostscript, TGA by guessing)
    "image-ico-named-png": ("image", lambda: _png((16, 16), "ICO"), ".png"),
    # 44,101 Hz shares no factor with 16,000: torchaudio's kernel is 16000 x 44135 (2.8 GB)
    "audio-rate-44101": ("audio", lambda: _wav([0.0, 0.0], 8000, "PCM_16", header_rate=44101), ".wav"),
    # a finite float sample of 1e20: the power spectrum overflows to inf, the embedding is NaN
    "audio-float-sample-1e20": ("audio", lambda: _wav([1e20]), ".wav"),
    # manifest paths that make os.stat raise ValueError rather than OSError
    "manifest-audio-nul-in-path": ("manifest", lambda: [b'{"audio": "\\u0000.wav"}'], None),
    "manifest-image-nul-in-path": ("manifest", lambda: [b'{"image": "\\u0000.png"}'], None),
    "manifest-audio-lone-surrogate-in-path": ("manifest", lambda: [b'{"audio": "\\ud800.wav"}'], None),
    "manifest-image-lone-surrogate-in-path": ("manifest", lambda: [b'{"image": "\\ud800.png"}'], None),
}


@pytest.mark.parametrize("case", sorted(FOUND))
def test_inputs_found_by_fuzzing(model, root, case):
    kind, make, suffix = FOUND[case]
    if kind == "manifest":
        check_manifest(model, root, make())
    else:
        check_media(model, root, kind, make(), suffix)
