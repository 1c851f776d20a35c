"""What the server accepts: the sniffer recognises exactly the formats the preprocessing decodes,
whatever a file is called; client file names are only ever shown, cleaned; weights parse strictly."""

from __future__ import annotations

import io
import json

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


# ---- the SameSite guard and size messages -----------------------------------------------------------


def same_site(headers: dict[str, str], server: str = "127.0.0.1", method: str = "POST") -> tuple[int, dict, dict]:
    """SameSite (inside SecurityHeaders, as in the app) over an app answering 200: status, body, headers."""
    import asyncio

    from mmembed.serve.safety import SameSite, SecurityHeaders

    async def ok(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    sent = []

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": method, "server": (server, 8000),
             "headers": [(k.encode(), v.encode()) for k, v in headers.items()]}
    asyncio.run(SecurityHeaders(SameSite(ok))(scope, None, send))
    return sent[0]["status"], json.loads(sent[1]["body"]), {k.decode(): v.decode() for k, v in sent[0]["headers"]}


@pytest.mark.parametrize("origin", ["http://[", "http://[::1", "http://a:b@[x]"])
def test_a_malformed_origin_is_a_json_403(origin):
    """An Origin urlsplit cannot read raised ValueError outside the crash guard: a plain-text 500."""
    status, body, headers = same_site({"host": "127.0.0.1:8000", "origin": origin})
    assert status == 403 and body == {"error": f"refused: Origin {origin!r} is not a URL"}
    assert headers["content-type"] == "application/json" and "content-security-policy" in headers
    assert same_site({"host": "127.0.0.1:8000", "origin": "http://127.0.0.1:8000"})[0] == 200


def test_an_ipv4_mapped_loopback_address_is_loopback():
    """Under --host :: an IPv4 connection is to ::ffff:127.0.0.1, which was not loopback: the Host
    check was skipped, and a DNS name rebound to 127.0.0.1 got every answer."""
    from mmembed.serve.safety import _local, is_loopback

    assert is_loopback("::ffff:127.0.0.1") and is_loopback("::ffff:127.8.9.10") and is_loopback("::1")
    assert not is_loopback("::ffff:10.0.0.1") and not is_loopback("::ffff:0:127.0.0.1")  # the latter: IPv4-translated
    assert _local("[::ffff:127.0.0.1]:8000") and not _local("[::ffff:192.168.1.5]:8000")
    get = {"method": "GET"}
    assert same_site({"host": "evil.example:8000"}, server="::ffff:127.0.0.1", **get)[0] == 403
    assert same_site({"host": "[::ffff:127.0.0.1]:8000"}, server="::ffff:127.0.0.1", **get)[0] == 200
    assert same_site({"host": "evil.example:8000"}, server="::ffff:192.168.1.5", **get)[0] == 200  # on the network


def test_a_size_over_a_limit_never_reads_as_the_limit():
    """10 MB and a byte was "10.0 MB; at most 10.0 MB" (both rounded to a tenth)."""
    from mmembed.serve.safety import BodyLimit, MiB, over_limit

    assert over_limit(10 * MiB + 1, 10 * MiB) == "10.1 MB; at most 10.0 MB"
    assert over_limit(11 * MiB, 10 * MiB) == "11.0 MB; at most 10.0 MB"  # the README's example
    assert over_limit(64 * 1024 + 1, 64 * 1024) == "65,537 bytes; at most 65,536 bytes"  # 0.1 MB both, rounded up
    body = BodyLimit(None, 10 * MiB)  # a declared body, and one counted until it passed the limit
    assert body._message(10 * MiB + 1) == "request too large (10.1 MB; at most 10.0 MB in one request: " \
                                          "send fewer or smaller files)"
    assert body._message(None) == "request too large (over 10.0 MB in one request: send fewer or smaller files)"
    for limit in (10 * MiB, 64 * 1024, 3 * MiB + 12345, 80 * MiB + 544768):
        for size in (limit + 1, limit + 1000, limit + MiB // 10, 2 * limit):
            shown, most = over_limit(size, limit).split("; at most ")
            assert shown != most, (size, limit)
