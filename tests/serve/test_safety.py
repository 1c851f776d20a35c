"""What the server accepts: the sniffer recognises exactly the formats the preprocessing decodes,
whatever a file is called; client file names are only ever shown, cleaned; weights parse strictly."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

pytest.importorskip("fastapi")

from mmembed.modality import Modality  # noqa: E402
from mmembed.preprocess import AudioPreprocessor, ImagePreprocessor  # noqa: E402
from mmembed.serve.pieces import parse_weights  # noqa: E402
from mmembed.serve.safety import FORMATS, Limits, Refusal, display_name, sniff  # noqa: E402

IMAGE_FORMATS = ["PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP"]
AUDIO_FORMATS = [("WAV", "PCM_16"), ("FLAC", "PCM_16"), ("OGG", "VORBIS")]


def image_bytes(fmt: str) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(out, format=fmt)
    return out.getvalue()


def audio_bytes(fmt: str, subtype: str) -> bytes:
    out = io.BytesIO()
    sf.write(out, np.sin(np.linspace(0, 400, 16000)).astype(np.float32) * 0.3, 16000, format=fmt, subtype=subtype)
    return out.getvalue()


@pytest.mark.parametrize("fmt", IMAGE_FORMATS)
def test_every_image_format_is_sniffed_and_decodes(fmt):
    data = image_bytes(fmt)
    found = sniff(data)
    assert found is not None and found.modality == Modality.IMAGE and found.mime.startswith("image/")
    assert ImagePreprocessor(size=16)(data).shape == (3, 16, 16)


@pytest.mark.parametrize("fmt, subtype", AUDIO_FORMATS)
def test_every_audio_format_is_sniffed_and_decodes(fmt, subtype):
    data = audio_bytes(fmt, subtype)
    found = sniff(data)
    assert found is not None and found.modality == Modality.AUDIO and found.mime.startswith("audio/")
    assert AudioPreprocessor(n_mels=16)(data).shape[0] == 16


def test_the_table_names_only_what_preprocessing_allows():
    from mmembed.preprocess.image_decode import DEFAULT_FORMATS

    images = {f.name.upper() for f in FORMATS if f.modality == Modality.IMAGE}
    assert images == set(DEFAULT_FORMATS)
    assert {f.modality for f in FORMATS} == {Modality.IMAGE, Modality.AUDIO}  # text is typed, never uploaded


@pytest.mark.parametrize("data", [b"", b"<html><body>hi</body></html>", b"%PDF-1.7", b"RIFF\0\0\0\0AVI LIST",
                                  b"\x00\x00\x01\x00", b"GIF", b"#!/bin/sh\nrm -rf /"])
def test_anything_else_is_not_sniffed(data):
    assert sniff(data) is None


@pytest.mark.parametrize("name, shown", [
    ("../../etc/passwd", "passwd"), ("C:\\Users\\ada\\cat.png", "cat.png"), ("a\x00b\x1b[31m.png", "a?b?[31m.png"),
    ("", "upload"), (None, "upload"), ("x" * 100 + ".png", "x" * 28 + "…" + "x" * 24 + ".png"),
])
def test_client_file_names_are_shown_cleaned(name, shown):
    assert display_name(name) == shown


def test_weights_parse_strictly():
    assert parse_weights(None, 3) == [1.0, 1.0, 1.0] and parse_weights(" 1, -0.5 ,2 ", 3) == [1.0, -0.5, 2.0]
    for text, n, message in [("1,x", 2, "numbers separated by commas"), ("1", 2, "1 weights for 2 pieces"),
                             ("inf", 1, "finite"), ("1e999", 1, "finite")]:
        with pytest.raises(Refusal, match=message) as e:
            parse_weights(text, n)
        assert e.value.status == 400


def test_a_request_within_every_other_limit_fits_the_body_limit():
    limits = Limits(max_file_bytes=1000, max_files=3)
    fields = limits.max_fields * 4 * limits.max_text_chars  # every field at its longest, 4 bytes a character
    assert limits.max_request_bytes >= limits.max_files * limits.max_file_bytes + fields
