"""The JSON API through FastAPI's TestClient, on an untrained tiny model: every answer equals the
Python API's for the same pieces, and every bad request is a one-line 4xx that leaves the server up."""

from __future__ import annotations

import json
import shutil
import struct
import threading
import time
import zlib
from pathlib import Path
from urllib.parse import urlencode

import pytest
import torch

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

import mmembed as mm  # noqa: E402
from mmembed.errors import UserError  # noqa: E402
from mmembed.serve import Limits, ServeState, create_app, open_state  # noqa: E402
from mmembed.serve.indexing import IndexBuild  # noqa: E402
from mmembed.serve.safety import Refusal  # noqa: E402
from tests.serve.conftest import aiff_of, manifest_rows, untrained_model  # noqa: E402

URLENCODED = {"content-type": "application/x-www-form-urlencoded"}
LIMITS = Limits(max_file_bytes=64 * 1024, max_files=4, max_new_tokens=16)


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width × height (its pixel data is a few bytes)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def model(tiny_world):
    return untrained_model(tiny_world)


@pytest.fixture(scope="module")
def client(model, tiny_world, tmp_path_factory):
    state = open_state(model, run="tiny", memory=tmp_path_factory.mktemp("serve-memory") / "memory.db", limits=LIMITS)
    with TestClient(create_app(state)) as client:
        wait_ready(client)
        yield client
    state.memory.close()


def wait_ready(client) -> dict:
    for _ in range(600):
        status = client.get("/api/status").json()
        if status["index"]["state"] != "building":
            return status
        time.sleep(0.05)
    raise AssertionError("the index was not built in 30 s")


def files(*pieces: tuple[str, object]) -> list:
    """Ordered multipart fields: ("text", "words") or ("file", (name, bytes))."""
    return [(key, (None, value) if isinstance(value, str) else value) for key, value in pieces]


def first(world, modality: str) -> tuple[str, bytes]:
    row = manifest_rows(world)[0]
    path = world / row[modality]
    return path.name, path.read_bytes()


# ---- status, index, search ------------------------------------------------------------------------


def test_the_test_manifest_is_indexed_on_start(client, tiny_world):
    status = wait_ready(client)
    n = len(manifest_rows(tiny_world))
    assert status["index"]["state"] == "ready" and status["index"]["done"] == status["index"]["total"] == 3 * n
    assert status["index"]["counts"] == {"text": n, "image": n, "audio": n}
    assert status["decoder"] and status["memory"] and status["limits"]["max_files"] == 4
    assert status["no_decoder"] is None and status["context"] == 64  # the untrained decoder's


def test_search_equals_the_python_api(client, model, tiny_world):
    index = mm.Index.build(model, tiny_world / "test.jsonl", progress=False)
    out = client.post("/api/search", files=files(("text", "a small red circle on the left")),
                      data={"target": "image", "k": "3"}).json()
    expected = index.search(mm.Query(text="a small red circle on the left"), target="image", k=3)
    assert [h["id"] for h in out["hits"]] == [h.id for h in expected]
    assert [h["score"] for h in out["hits"]] == pytest.approx([h.score for h in expected], abs=1e-4)
    tag = client.app.state.serve.media_tag
    assert all(h["modality"] == "image" and h["media"] == f"/api/media/{h['id']}?g={tag}" for h in out["hits"])
    assert all("item" not in h["metadata"] and "/" not in h["name"] for h in out["hits"])  # no server paths


def test_composed_weights_reach_the_query_in_piece_order(client, model, tiny_world):
    index = mm.Index.build(model, tiny_world / "test.jsonl", progress=False)
    rows = manifest_rows(tiny_world)
    img, wav0, wav1 = (tiny_world / rows[0]["image"], tiny_world / rows[0]["audio"], tiny_world / rows[1]["audio"])
    for weights in ([1.0, 1.0, -1.0], [0.5, -2.0, 1.0]):
        out = client.post("/api/search", data={"weights": ",".join(map(str, weights)), "k": "5"},
                          files=files(("file", ("a.wav", wav0.read_bytes())), ("file", ("b.png", img.read_bytes())),
                                      ("file", ("c.wav", wav1.read_bytes())))).json()
        query = mm.Query(audio=[str(wav0), str(wav1)], image=str(img),
                         weights={"audio": [weights[0], weights[2]], "image": weights[1]})
        assert [h["id"] for h in out["hits"]] == [h.id for h in index.search(query, k=5)]


def test_a_typed_path_is_text_never_a_file(client, model, tiny_world):
    index = mm.Index.build(model, tiny_world / "test.jsonl", progress=False)
    path = str(tiny_world / manifest_rows(tiny_world)[0]["image"])
    out = client.post("/api/search", files=files(("text", path)), data={"target": "image", "k": "3"}).json()
    assert [h["id"] for h in out["hits"]] == [h.id for h in index.search(mm.Query(text=path), target="image", k=3)]


def test_media_are_served_from_the_index_only(client, tiny_world):
    out = client.post("/api/search", files=files(("text", "a red star")), data={"target": "any", "k": "50"}).json()
    image = next(h for h in out["hits"] if h["modality"] == "image")
    text = next(h for h in out["hits"] if h["modality"] == "text")
    served = client.get(image["media"])
    assert served.status_code == 200 and served.headers["content-type"] == "image/png"
    assert served.content == (tiny_world / "images" / image["name"]).read_bytes()
    assert text["media"] is None and client.get(f"/api/media/{text['id']}").status_code == 404
    assert client.get("/api/media/987654").json() == {"error": "no item 987654 in the index"}
    assert client.get("/api/media/..%2F..%2Fetc%2Fpasswd").status_code in (400, 404)
    assert client.get("/static/../state.py").status_code == 404


def test_media_urls_are_answered_and_cached_only_by_the_server_that_gave_them(client, model, tiny_world):
    """Ids restart at 0 in every index (at 1 in every memory file) and a media URL was the id alone,
    cached an hour: a server restarted on the same port with another index showed the first one's pictures."""
    hit = client.post("/api/search", files=files(("text", "a red star")), data={"target": "image", "k": "1"}).json()
    name, data = first(tiny_world, "image")
    stored = client.post("/api/memory/remember", files=files(("user", "cy"), ("file", (name, data)))).json()
    item = client.get("/api/memory", params={"user": "cy"}).json()["items"][0]
    assert item["id"] == stored["ids"][0]
    state = client.app.state.serve
    for url in (hit["hits"][0]["media"], item["media"]):
        assert url.endswith(f"g={state.media_tag}")
        served = client.get(url)
        assert served.status_code == 200 and served.headers["cache-control"] == "private, max-age=3600"
        bare = client.get(url.replace(f"g={state.media_tag}", ""))  # no tag: the bytes, never cached
        assert bare.content == served.content and bare.headers["cache-control"] == "no-store"
        restarted = ServeState(model, state.index, state.memory, LIMITS, "tiny")  # the same ids, another server
        with TestClient(create_app(restarted)) as other:
            response = other.get(url)
            assert response.status_code == 404 and "another server's index or memory" in response.json()["error"]


# ---- bad requests ---------------------------------------------------------------------------------


@pytest.mark.parametrize("pieces, data, status, message", [
    ([], {}, 400, "nothing to search for"),
    ([("text", "x")], {"target": "smell"}, 400, "target must be one of"),
    ([("text", "x")], {"k": "0"}, 400, "k must be between 1 and 50"),
    ([("text", "x")], {"k": "many"}, 400, "k must be an integer"),
    ([("text", "x")], {"weights": "1,2"}, 400, "2 weights for 1 pieces"),
    ([("text", "x")], {"weights": "nan"}, 400, "weights must be finite"),
    ([("text", "x" * 2001)], {}, 413, "at most 2,000"),
    ([("text", "x" * 9000)], {}, 413, "at most 2,000"),  # past the form's part limit: it was a 400
    ([("file", ("notes.png", b"<html><script>alert(1)</script></html>"))], {}, 415,
     "notes.png is not a file this server reads, whatever its name says"),
    ([("file", ("bomb.png", png_header(30000, 30000)))], {}, 400, "bomb.png (PNG) cannot be used: decompression bomb"),
    ([("file", ("wide.png", png_header(20000, 100)))], {}, 400, "wide.png (PNG) cannot be used: image too large"),
    ([("file", ("big.png", b"\x89PNG\r\n\x1a\n" + bytes(70 * 1024)))], {}, 413,
     "big.png is too large (71,688 bytes; at most 65,536 bytes a file)"),
    ([("file", ("empty.wav", b""))], {}, 400, "empty.wav is empty"),
    ([("file", ("../../etc/passwd", b"root:x:0:0"))], {}, 415, "passwd is not a file"),
    ([("file", ("cut.png", png_header(32, 32)[:40]))], {}, 400, "cut.png (PNG) cannot be used"),
    ([("file", ("x.wav", b"RIFF\x00\x00\x00\x00WAVEfmt garbage"))], {}, 400, "x.wav (WAV) cannot be used"),
])
def test_bad_search_requests_get_one_line(client, pieces, data, status, message):
    response = client.post("/api/search", files=files(*pieces) or None, data=data or None)
    body = response.json()
    assert response.status_code == status and message in body["error"] and "\n" not in body["error"], body
    assert client.get("/api/status").status_code == 200  # still serving


def test_too_many_files_and_too_large_bodies_are_refused(client, tiny_world):
    name, data = first(tiny_world, "image")
    response = client.post("/api/search", files=files(*[("file", (name, data))] * 5))
    assert response.status_code == 400 and "Too many files" in response.json()["error"]
    huge = b"\x89PNG" + bytes(LIMITS.max_request_bytes)
    response = client.post("/api/search", content=huge, headers={"content-type": "multipart/form-data; boundary=x"})
    assert response.status_code == 413 and "request too large" in response.json()["error"]

    def chunks():  # no Content-Length: the body is counted as it arrives and cut off at the limit
        yield b"--x\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.png\"\r\n\r\n"
        for _ in range(LIMITS.max_request_bytes // 65536 + 2):
            yield bytes(65536)

    response = client.post("/api/search", content=chunks(), headers={"content-type": "multipart/form-data; boundary=x"})
    assert response.status_code == 413 and response.json()["error"].startswith("request too large (over ")
    # the unread rest of the body cannot carry another request: a raw client waited 30 s for the close
    assert response.headers["connection"] == "close"
    # a body without a Content-Type was ignored: "nothing to search for"
    response = client.post("/api/search", content=b"text=red")
    assert response.status_code == 415 and "has no Content-Type" in response.json()["error"]
    response = client.post("/api/search", json={"text": "a red star"})
    assert response.status_code == 415 and "send a form" in response.json()["error"]
    assert client.get("/api/status").status_code == 200


def test_every_response_carries_the_security_headers(client):
    for response in (client.get("/"), client.get("/api/status"), client.post("/api/search")):
        assert "default-src 'self'" in response.headers["content-security-policy"]
        assert response.headers["x-content-type-options"] == "nosniff"
    page = client.get("/")
    assert page.headers["content-type"].startswith("text/html") and "/static/app.js" in page.text
    assert client.get("/static/app.js").status_code == 200


# ---- generation -----------------------------------------------------------------------------------


def test_generate_equals_the_python_api_in_piece_order(client, model, tiny_world):
    name, data = first(tiny_world, "image")
    for order in (["Describe", "IMG", "please"], ["IMG", "Describe", "please"]):
        pieces = [("file", (name, data)) if p == "IMG" else ("text", p) for p in order]
        out = client.post("/api/generate", files=files(*pieces), data={"max_new_tokens": "6", "temperature": "0.9",
                                                                      "seed": "3"}).json()
        prompt = [mm.Image(data) if p == "IMG" else p for p in order]
        expected = model.generate(prompt, max_new_tokens=6, temperature=0.9, seed=3)
        assert [t["id"] for t in out["tokens"]] == expected.token_ids and out["text"] == expected.text
        assert [t["entropy"] for t in out["tokens"]] == pytest.approx(expected.entropy, abs=1e-4)
        own = model.token_entropy(prompt, expected).model
        assert out["model_entropy"] == pytest.approx(own, abs=1e-4)


def test_the_stream_sends_each_token_then_done(client, tiny_world):
    name, data = first(tiny_world, "audio")
    body = files(("text", "What do you hear in"), ("file", (name, data)), ("text", "?"))
    settings = {"max_new_tokens": "8", "temperature": "1.0", "top_p": "0.9", "seed": "7"}
    whole = client.post("/api/generate", files=body, data=settings).json()
    with client.stream("POST", "/api/generate/stream", files=body, data=settings) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [block for block in response.read().decode().split("\n\n") if block]
    parsed = [(b.split("\n")[0].removeprefix("event: "), json.loads(b.split("\n")[1].removeprefix("data: ")))
              for b in events]
    assert [kind for kind, _ in parsed] == ["token"] * len(whole["tokens"]) + ["done"]
    assert [data for _, data in parsed[:-1]] == whole["tokens"]
    assert parsed[-1][1] == {k: v for k, v in whole.items() if k != "tokens"}


def test_with_a_stop_string_each_token_keeps_its_own_text(client):
    """With a stop string the stream holds text back while one could begin, so token i carried
    text of token i+1 ("a s" under the id of "a"); /api/generate reported those released texts, and
    the page coloured the wrong characters. Now /api/generate's tokens and `done`'s `token_texts`
    give each token the text it wrote: the answer without the stop, cut where the stop begins."""
    settings = {"max_new_tokens": "16", "temperature": "1.0", "seed": "5"}
    free = client.post("/api/generate", files=files(("text", "describe this")), data=settings).json()
    assert len(free["text"]) >= 8, free  # enough text to stop inside
    assert [t["text"] for t in free["tokens"]] == free["token_texts"]
    stop = free["text"][5:8]
    cut = free["text"].find(stop)
    body = files(("text", "describe this"), ("stop", stop))
    stopped = client.post("/api/generate", files=body, data=settings).json()
    assert stopped["text"] == free["text"][:cut] and stopped["finish_reason"] == "stop"
    texts = [t["text"] for t in stopped["tokens"]]
    assert "".join(texts) == stopped["text"] and texts == stopped["token_texts"]
    used = 0
    for own, unstopped in zip(texts, free["token_texts"]):  # the same draws up to the stop
        assert own == unstopped[:max(cut - used, 0)], (texts, free["token_texts"])
        used += len(own)
    with client.stream("POST", "/api/generate/stream", files=body, data=settings) as response:
        blocks = [b for b in response.read().decode().split("\n\n") if b]
    events = [json.loads(b.split("\n")[1].removeprefix("data: ")) for b in blocks]
    assert events[-1]["token_texts"] == texts
    released = [e["text"] for e in events[:-1]]
    assert "".join(released) == stopped["text"] and released != texts  # the stream held text back


def test_an_answer_cut_by_the_context_says_so(client, model):
    """max_new_tokens up to the server's limit was accepted and the answer silently cut where the
    decoder's context ends (only the server's log said so): `context_cut` names the context."""
    fmt = model.prompt_model.fmt
    words = "describe this " * 40
    prompt = next(words[:n] for n in range(len(words), 0, -1) if fmt.length([words[:n]]) <= 60)
    assert client.get("/api/status").json()["context"] == 64
    out = client.post("/api/generate", files=files(("text", prompt)), data={"max_new_tokens": "16"}).json()
    room = 64 + 1 - fmt.length([prompt])
    assert out["finish_reason"] == "length" and len(out["tokens"]) == room < 16, out
    assert out["context_cut"] == 64
    short = client.post("/api/generate", files=files(("text", "hi")), data={"max_new_tokens": "3"}).json()
    assert short["context_cut"] is None and len(short["tokens"]) <= 3


def test_the_stream_holds_the_model_lock_only_while_it_computes(client, model):
    """A client that stops reading after `done` (or never reads it) must not keep the model locked
    from every other request: the generator is suspended at each event with the lock free."""
    from mmembed.serve.api import _events

    import anyio

    state = client.app.state.serve
    tokens = model.stream_tokens(["describe this"], max_new_tokens=3)
    first = next(tokens)

    async def read() -> list[str]:
        events = _events(state, ["describe this"], {"id": first.id, "text": first.text, "entropy": first.entropy,
                                                     "logprob": first.logprob}, tokens,
                         {"stop": None, "max_new_tokens": 3})
        kinds = []
        async for event in events:
            kinds.append(event.split("\n")[0])
            assert not state.lock.locked(), kinds
            if kinds[-1] == "event: done":
                break  # the client reads no further: the generator stays suspended here
        await events.aclose()
        return kinds

    assert anyio.run(read)[-1] == "event: done"


def test_a_client_that_leaves_mid_stream_ends_its_generation_at_once(client, model, monkeypatch):
    """The abandoned stream's generator (its caches and tensors) waited for the garbage collector."""
    closed = []
    real = model.stream_tokens

    def watched(*args, **kwargs):
        tokens = real(*args, **kwargs)
        try:
            yield from tokens
        finally:
            closed.append(True)

    monkeypatch.setattr(model, "stream_tokens", watched)
    with client.stream("POST", "/api/generate/stream", files=files(("text", "describe")),
                       data={"max_new_tokens": "16", "temperature": "1.0", "seed": "1"}) as response:
        next(response.iter_lines())  # one event, then the client goes away
    for _ in range(100):
        if closed:
            break
        time.sleep(0.05)
    assert closed == [True]


def test_requests_queued_for_the_model_leave_the_other_routes_answering(client):
    """Requests waiting for the model each held a worker thread (waiting on its lock): forty of them
    took every thread, and /api/status, the page and media stopped answering."""
    state = client.app.state.serve
    answers: list[int] = []
    with state.lock:  # the model is busy
        waiting = [threading.Thread(target=lambda: answers.append(
            client.post("/api/search", files=files(("text", "a red star"))).status_code)) for _ in range(48)]
        for t in waiting:
            t.start()
        time.sleep(0.5)  # let them queue
        status = []
        asker = threading.Thread(target=lambda: status.append(client.get("/api/status").status_code))
        asker.start()
        asker.join(timeout=30)
        assert status == [200]  # answered while 48 requests wait for the model
    for t in waiting:
        t.join(timeout=60)
    assert answers == [200] * 48


@pytest.mark.parametrize("path,fields,error", [
    ("/api/search", [("text", "red"), ("k", "1"), ("k", "3")], "field 'k' is sent 2 times; it takes one value"),
    ("/api/search", [("text", "red"), ("k", "1"), ("k", "")], "field 'k' is sent 2 times"),  # an empty k reset it
    ("/api/search", [("text", "red"), ("target", "image"), ("target", "audio")], "field 'target' is sent 2 times"),
    ("/api/generate", [("text", "hi"), ("max_new_tokens", "2"), ("max_new_tokens", "5")],
     "field 'max_new_tokens' is sent 2 times"),
    ("/api/memory/remember", [("user", "ada"), ("user", "bob"), ("text", "two users")],
     "field 'user' is sent 2 times"),
])
def test_a_field_that_takes_one_value_sent_twice_is_a_400(client, path, fields, error):
    """The last value won: user=ada&user=bob stored the item under bob, k=1&k=3 gave 3 hits."""
    response = client.post(path, content=urlencode(fields), headers=URLENCODED)
    assert response.status_code == 400 and response.json()["error"].startswith(error), response.text
    assert client.app.state.serve.memory.count("bob") == 0


def test_pieces_and_stop_strings_repeat_and_a_query_parameter_does_not(client):
    body = urlencode([("text", "a red"), ("text", "star"), ("k", "2")])
    assert len(client.post("/api/search", content=body, headers=URLENCODED).json()["hits"]) == 2
    body = urlencode([("text", "hi"), ("stop", "x"), ("stop", "y"), ("max_new_tokens", "2")])
    assert client.post("/api/generate", content=body, headers=URLENCODED).status_code == 200
    response = client.get("/api/memory?user=ada&user=bob")
    assert response.status_code == 400 and response.json()["error"] == ("query parameter 'user' is sent 2 times; "
                                                                        "it takes one value")
    assert client.delete("/api/memory/items/1?user=ada&user=bob").status_code == 400


@pytest.mark.parametrize("value", ["\u0663", "1_0", "\uff13", "3e0"])
def test_a_number_is_written_in_ascii_digits(client, value):
    """Python's int() read the Arabic-Indic "٣" as 3 and "1_0" as 10: k accepted them."""
    response = client.post("/api/search", data={"text": "red", "k": value})
    assert response.status_code == 400 and response.json()["error"].startswith("k must be an integer")
    if value != "3e0":  # a number, not an integer
        response = client.post("/api/generate", data={"text": "hi", "temperature": value})
        assert response.status_code == 400 and "temperature must be a number" in response.json()["error"]


def test_a_user_name_with_a_control_character_says_so(client):
    """A 3-letter name with a NUL was told "a user name is at most 64 printable characters"."""
    response = client.get("/api/memory", params={"user": "a\x00b"})
    assert response.json()["error"] == "a user name must be printable characters, got 'a\\x00b'"
    response = client.get("/api/memory", params={"user": "x" * 65})
    assert response.json()["error"] == "a user name is at most 64 characters, got 65"


def test_a_number_too_large_for_a_float_is_a_400(client):
    huge = "1" + "0" * 400
    for path, field in (("/api/search", "k"), ("/api/generate", "max_new_tokens"), ("/api/generate", "seed")):
        response = client.post(path, files=files(("text", "hello")), data={field: huge})
        assert response.status_code == 400 and "must be between" in response.json()["error"], response.text


def test_fields_at_their_edges(client):
    """Each was refused although valid, or refused with a misleading message."""
    # an url-encoded form (README's httpx example) percent-encodes a CJK character into 9 bytes:
    # 950 of them passed the form's byte limit and came back "at most 2,000 characters"
    assert client.post("/api/search", data={"text": "中" * 1000}).status_code == 200
    response = client.post("/api/search", data={"text": "中" * 2001})
    assert response.status_code == 413 and "text 1 has 2,001 characters" in response.json()["error"]
    # a large finite weight is finite (it was checked in float32, where 3.5e38 is inf)
    assert client.post("/api/search", files=files(("text", "a red star")), data={"weights": "3.5e38"}).status_code == 200
    # a number sent as a file said "got 'UploadFile(filename=...'"
    response = client.post("/api/search", files=files(("text", "x"), ("k", ("k.txt", b"5"))))
    assert response.status_code == 400 and response.json()["error"] == "k must be a text field, not a file"
    # the largest seed generation takes is accepted, one more is refused with the bound in full
    from mmembed.decoder.generate import MAX_SEED

    assert client.post("/api/generate", files=files(("text", "hi")), data={"seed": str(MAX_SEED)}).status_code == 200
    response = client.post("/api/generate", files=files(("text", "hi")), data={"seed": str(MAX_SEED + 1)})
    assert response.json()["error"] == f"seed must be between 0 and {MAX_SEED}, got {MAX_SEED + 1}"
    # a value just past a bound was printed rounded, inside it ("got 1"); top_p=0 got the Python API's words
    response = client.post("/api/generate", data={"text": "hi", "temperature": "0.7", "top_p": "1.0000001"})
    assert response.json()["error"] == "top_p must be between 0 and 1, got 1.0000001"
    response = client.post("/api/generate", data={"text": "hi", "temperature": "0.7", "top_p": "0"})
    assert response.status_code == 400 and response.json()["error"] == "top_p must be above 0 and at most 1, got 0"


def test_user_names_of_undecodable_bytes_are_refused(client):
    """%FE and %FF both became the user '\ufffd': one memory for two names."""
    response = client.post("/api/memory/remember", content=b"user=%FE&text=secret",
                           headers={"content-type": "application/x-www-form-urlencoded"})
    assert response.status_code == 400
    assert response.json()["error"] == "bad form: the field 'user' is not utf-8 text (send text as UTF-8)"
    assert client.get("/api/memory", params={"user": "\ufffd"}).status_code == 400


def multipart(fields: list[tuple[str, bytes]], charset: str | None = None) -> dict:
    """A multipart body of raw field bytes (httpx would encode str fields as UTF-8), as `post` kwargs."""
    body = b"".join(b'--B\r\nContent-Disposition: form-data; name="' + name.encode() + b'"\r\n\r\n' + value + b"\r\n"
                    for name, value in fields) + b"--B--\r\n"
    kind = "multipart/form-data; boundary=B" + (f"; charset={charset}" if charset else "")
    return {"content": body, "headers": {"content-type": kind}}


def test_multipart_text_of_undecodable_bytes_is_refused(client):
    """Starlette decodes a multipart field that is not UTF-8 as Latin-1: b"caf\\xe9 \\xff" was stored
    as "café ÿ", and the user b"\\xfe" became the user "þ"."""
    memory = client.app.state.serve.memory
    for user, text in ((b"dee", b"caf\xe9 \xff"), (b"\xfe", b"hello"), (b"dee", b"\xff")):
        response = client.post("/api/memory/remember", **multipart([("user", user), ("text", text)]))
        field = "user" if user == b"\xfe" else "text"
        assert response.status_code == 400, response.text
        assert response.json()["error"] == f"bad form: the field {field!r} is not utf-8 text (send text as UTF-8)"
    assert memory.count("dee") == memory.count("þ") == 0
    # real UTF-8 (whose characters all fit in Latin-1 too) is kept as sent, and so is a declared charset
    ok = client.post("/api/memory/remember", **multipart([("user", "dée".encode()), ("text", "café".encode())]))
    assert ok.status_code == 200 and [h.text for h in memory.recent("dée")] == ["café"]
    latin = client.post("/api/memory/remember", **multipart([("user", b"ed"), ("text", b"caf\xe9")], "latin-1"))
    assert latin.status_code == 200 and [h.text for h in memory.recent("ed")] == ["café"]
    search = client.post("/api/search", **multipart([("text", b"a red \xff star")]))
    assert search.status_code == 400 and "'text' is not utf-8 text" in search.json()["error"]
    # a part's own charset (RFC 7578 4.4; curl -F 'text=...;type=text/plain;charset=latin1') counts too
    body = (b'--B\r\nContent-Disposition: form-data; name="user"\r\n\r\nfi\r\n--B\r\nContent-Disposition: '
            b'form-data; name="text"\r\nContent-Type: text/plain; charset=iso-8859-1\r\n\r\ncaf\xe9\r\n--B--\r\n')
    own = client.post("/api/memory/remember", content=body, headers={"content-type": "multipart/form-data; boundary=B"})
    assert own.status_code == 200 and [h.text for h in memory.recent("fi")] == ["café"]


def test_url_encoded_text_of_undecodable_bytes_is_refused(client):
    """An url-encoded form's bytes were decoded as UTF-8 with errors="replace" whatever charset it
    named: "caf%E9" was stored as "caf\\ufffd", with `charset=latin-1` too, and %FF%FE was searched for."""
    memory = client.app.state.serve.memory

    def post(path: str, body: bytes, charset: str = "") -> dict:
        kind = "application/x-www-form-urlencoded" + (f"; charset={charset}" if charset else "")
        return client.post(path, content=body, headers={"content-type": kind})

    response = post("/api/memory/remember", b"user=hal&text=caf%E9%20au%20lait")
    assert response.status_code == 400
    assert response.json()["error"] == "bad form: the field 'text' is not utf-8 text (send text as UTF-8)"
    response = post("/api/search", b"text=%FF%FE&k=1")
    assert response.status_code == 400 and "'text' is not utf-8 text" in response.json()["error"]
    response = post("/api/memory/remember", b"user=hal&text=hi", charset="no-such-charset")
    assert response.status_code == 400 and "'user' is not no-such-charset text" in response.json()["error"]
    assert memory.count("hal") == 0
    # the charset the form names is used, and UTF-8 (escaped, raw, "+" for a space) is kept as sent
    assert post("/api/memory/remember", b"user=hal&text=caf%E9%20au%20lait", charset="latin-1").status_code == 200
    assert post("/api/memory/remember", "user=hal&text=caf%C3%A9+noir+ou+thé".encode()).status_code == 200
    assert [h.text for h in memory.recent("hal")] == ["café au lait", "café noir ou thé"]


def test_a_wrong_method_names_the_allowed_ones_and_head_gets_the_page(client):
    """A 405 came without its Allow header (the error handler dropped it), and HEAD / was a 405."""
    response = client.delete("/api/status")
    assert response.status_code == 405 and response.headers["allow"] == "GET"
    assert response.json() == {"error": "Method Not Allowed"}
    head = client.head("/")
    assert head.status_code == 200 and head.content == b"" and head.headers["content-type"].startswith("text/html")
    assert int(head.headers["content-length"]) > 0


def test_an_unreadable_sound_is_named_without_a_memory_address(client):
    response = client.post("/api/search", files=files(("file", ("junk.ogg", b"OggS" + bytes(range(256)) * 4))))
    error = response.json()["error"]
    assert response.status_code == 400 and error.startswith("junk.ogg (OGG) cannot be used") and " at 0x" not in error


def test_a_client_that_leaves_mid_request_is_not_a_server_error(caplog):
    """A tab closed during an upload: Starlette raises ClientDisconnect while reading the form; it
    was logged as a crash with its traceback (56 lines each time) and answered with a 500."""
    import asyncio

    from starlette.requests import ClientDisconnect

    from mmembed.serve.app import CrashGuard

    async def leaves(scope, receive, send):
        raise ClientDisconnect

    sent = []

    async def send(message):
        sent.append(message)

    asyncio.run(CrashGuard(leaves)({"type": "http", "method": "POST", "path": "/api/search"}, None, send))
    assert sent == [] and "failed" not in caplog.text


def test_best_of_equals_the_python_api_with_its_candidates(client, model, tiny_world):
    name, data = first(tiny_world, "image")
    settings = {"max_new_tokens": "6", "temperature": "1.2", "seed": "3", "best_of": "6"}
    out = client.post("/api/generate", files=files(("text", "Describe"), ("file", (name, data))), data=settings).json()
    prompt = ["Describe", mm.Image(data)]
    expected = model.generate(prompt, max_new_tokens=6, temperature=1.2, seed=3, best_of=6)
    assert [t["id"] for t in out["tokens"]] == expected.token_ids and out["text"] == expected.text
    assert "".join(t["text"] for t in out["tokens"]) == expected.text
    assert [c["text"] for c in out["candidates"]] == [c.text for c in expected.candidates]
    assert [c["score"] for c in out["candidates"]] == pytest.approx([c.score for c in expected.candidates], abs=1e-3)
    assert len(out["candidates"]) > 1 and out["candidates"][0]["text"] == out["text"]
    assert "candidates" not in client.post("/api/generate", files=files(("text", "hi")), data={"seed": "1"}).json()


def test_best_of_is_refused_on_the_stream_and_outside_its_bounds(client):
    for data, message in [({"best_of": "4", "temperature": "1"}, "POST it to /api/generate"),
                          ({"best_of": "33", "temperature": "1"}, "best_of must be between 1 and 32"),
                          ({"best_of": "0", "temperature": "1"}, "best_of must be between 1 and 32"),
                          ({"best_of": "2", "temperature": "1", "rerank_weight": "-1"}, "rerank_weight must be between")]:
        response = client.post("/api/generate/stream", files=files(("text", "hello")), data=data)
        assert response.status_code == 400 and message in response.json()["error"], response.json()
    response = client.post("/api/generate", files=files(("text", "hello")), data={"best_of": "4"})  # greedy
    assert response.status_code == 400 and "give a temperature > 0" in response.json()["error"]


@pytest.mark.parametrize("data, message", [
    ({"temperature": "-1"}, "temperature must be between 0 and 100"),
    ({"top_p": "0"}, "top_p must be above 0 and at most 1"),
    ({"max_new_tokens": "17"}, "max_new_tokens must be between 1 and 16"),
    ({"seed": "1.5"}, "seed must be an integer"),
])
def test_bad_sampling_settings_are_400_before_streaming(client, data, message):
    for path in ("/api/generate", "/api/generate/stream"):
        response = client.post(path, files=files(("text", "hello")), data=data)
        assert response.status_code == 400 and message in response.json()["error"]


def test_a_run_without_decoder_says_so(model, tiny_world, tmp_path):
    """A run whose decoder stage had not finished was told "this run has no decoder: prompting needs
    a run trained with a `decoder:` section", though its config had one (`mmembed generate` said
    how to finish it); /api/status now carries the reason, which the page shows."""
    model = untrained_model(tiny_world)
    model.prompt_model = None
    for config_decoder, run_dir, expected in [
            (None, None, "this run has no decoder stage, so it cannot answer prompts: train one with a config"),
            (model.config.decoder, tmp_path, f"the decoder stage of {tmp_path} has not finished (no "
                                             "decoder.safetensors), so it cannot answer prompts: continue it with")]:
        model.config.decoder, model.run_dir = config_decoder, run_dir
        state = open_state(model, run="no-decoder", index=None)
        with TestClient(create_app(state)) as client:
            for path in ("/api/generate", "/api/generate/stream"):
                response = client.post(path, files=files(("text", "hi")))
                assert response.status_code == 400 and response.json()["error"].startswith(expected)
            status = client.get("/api/status").json()
            assert not status["decoder"] and status["no_decoder"].startswith(expected) and status["context"] is None
            assert client.get("/api/memory", params={"user": "ada"}).json() == {
                "error": "this server has no memory: start it with --memory FILE"}


# ---- memory -------------------------------------------------------------------------------------


def test_memory_remember_ask_show_and_forget(client, tiny_world):
    name, data = first(tiny_world, "image")
    stored = client.post("/api/memory/remember", files=files(("user", "ada"), ("text", "my red bike"),
                                                             ("file", (name, data)))).json()
    assert len(stored["ids"]) == 2
    listed = client.get("/api/memory", params={"user": "ada"}).json()
    assert {i["id"] for i in listed["items"]} >= set(stored["ids"])
    image = next(i for i in listed["items"] if i["modality"] == "image")
    assert client.get(image["media"]).content == data
    asked = client.post("/api/memory/ask", files=files(("user", "ada"), ("text", "what colour is my bike?"),
                                                       ("file", (name, data))), data={"max_new_tokens": "4"})
    assert asked.status_code == 200, asked.text
    assert image["id"] in {h["id"] for h in asked.json()["recalled"]}  # the same picture: similarity 1
    # another user sees, reads and deletes nothing of ada's
    assert client.get("/api/memory", params={"user": "bob"}).json()["items"] == []
    assert client.get(image["media"].replace("user=ada", "user=bob")).status_code == 404
    assert client.delete(f"/api/memory/items/{image['id']}", params={"user": "bob"}).status_code == 404
    gone = client.delete(f"/api/memory/items/{image['id']}", params={"user": "ada"}).json()
    assert gone["deleted"] == image["id"]
    assert image["id"] not in {i["id"] for i in client.get("/api/memory", params={"user": "ada"}).json()["items"]}
    assert client.post("/api/memory/remember", files=files(("text", "x"))).json() == {
        "error": "give a user name (whose memory)"}


def test_state_refuses_an_index_of_another_model(model, tiny_world, tmp_path):
    other = untrained_model(tiny_world)
    with torch.no_grad():
        next(other.space.parameters()).add_(1.0)
    other._fingerprint = None
    mm.Index.build(other, tiny_world / "test.jsonl", progress=False).save(tmp_path / "index")
    with pytest.raises(UserError, match="index was built with"):
        open_state(model, run="x", index=tmp_path / "index")


def test_an_index_built_from_a_relative_manifest_serves_its_media_from_any_folder(model, tiny_world, tmp_path,
                                                                                  monkeypatch):
    monkeypatch.chdir(tiny_world)
    mm.Index.build(model, "test.jsonl", progress=False).save(tmp_path / "index")
    monkeypatch.chdir(tmp_path)  # `mmembed serve RUN --index index`, from another folder
    build = IndexBuild.load(tmp_path / "index", model)
    image = next(i for i, m in build._modality.items() if str(m) == "image")
    assert build.media_path(image).is_relative_to(tiny_world.resolve())


def test_a_media_file_gone_since_indexing_is_named_missing(model, tiny_world, tmp_path):
    """A deleted or moved file was a 404 saying it "is not inside the index's data folder"."""
    world = shutil.copytree(tiny_world, tmp_path / "world")
    mm.Index.build(model, world / "test.jsonl", progress=False).save(tmp_path / "index")
    build = IndexBuild.load(tmp_path / "index", model)
    image = next(i for i, m in build._modality.items() if str(m) == "image")
    path = build.media_path(image)
    path.unlink()
    with pytest.raises(Refusal) as missing:
        build.media_path(image)
    assert (missing.value.status, missing.value.message) == (404, f"item {image}'s file is missing ({path.name})")
    (tmp_path / "outside.png").write_bytes(png_header(4, 4))
    path.symlink_to(tmp_path / "outside.png")  # a file that leads out of the data folder is still refused as such
    with pytest.raises(Refusal, match="is not inside the index's data folder"):
        build.media_path(image)


def test_a_memory_file_under_a_file_names_the_file(model, tmp_path):
    """`serve --memory afile/mem.db` said its folder did not exist."""
    (tmp_path / "afile").write_text("x")
    with pytest.raises(UserError, match=r"afile is a file, not a folder$"):
        open_state(model, run="x", memory=tmp_path / "afile" / "mem.db")
    with pytest.raises(UserError, match=r"nope does not exist$"):
        open_state(model, run="x", memory=tmp_path / "nope" / "mem.db")


def test_no_index_and_no_test_manifest_is_a_user_error(tiny_world, tmp_path):
    model = untrained_model(tiny_world)
    model.config.data.root = str(tmp_path)
    with pytest.raises(UserError, match="pass --index DIR"):
        open_state(model, run="x")


def test_indexing_reports_progress_and_searches_wait_for_it(tiny_world):
    model = untrained_model(tiny_world)
    lock = threading.Lock()
    n = 3 * len(manifest_rows(tiny_world))
    with lock:  # the build embeds under this lock: held here, it cannot advance
        build = IndexBuild.start(model, tiny_world / "test.jsonl", lock)
        time.sleep(0.2)
        assert build.status() == {"state": "building", "done": 0, "total": n, "source": "test.jsonl"}
        state = ServeState(model, build, None, LIMITS, "tiny", lock)
        with TestClient(create_app(state)) as client:
            response = client.post("/api/search", files=files(("text", "a red star")))
            assert response.status_code == 503
            assert response.json() == {"error": "the index is still being built (0%): try again in a moment"}
    for _ in range(600):
        if build.state != "building":
            break
        time.sleep(0.05)
    assert build.state == "ready" and build.done == build.total == n


def test_an_internal_error_is_a_one_line_500_with_the_security_headers(client, monkeypatch, caplog):
    """Starlette answers an `Exception` handler outside every middleware: the 500 left without the
    Content-Security-Policy and the other headers every other answer carries."""
    import mmembed.serve.api as api

    def broken(*args):
        raise RuntimeError("boom")

    monkeypatch.setattr(api, "_search", broken)
    response = client.post("/api/search", files=files(("text", "a red star")))
    assert response.status_code == 500
    assert response.json() == {"error": "internal error (RuntimeError); the server log has the details"}
    assert "content-security-policy" in response.headers and response.headers["x-content-type-options"] == "nosniff"
    assert "boom" in caplog.text  # the details are in the log
    assert client.get("/api/status").status_code == 200  # and the server is up


def test_other_sites_may_not_drive_the_server(client, model):
    """A page of another site posted a form to /api/memory/remember (no CORS preflight for a form)
    and the item was stored; a DNS name rebound to 127.0.0.1 read every user's memory."""
    hostile = client.post("/api/search", files=files(("text", "a red star")), headers={"origin": "https://evil.example"})
    assert hostile.status_code == 403 and "another site" in hostile.json()["error"]
    own = client.post("/api/search", files=files(("text", "a red star")), headers={"origin": "http://testserver"})
    assert own.status_code == 200  # the page's own requests carry its origin
    assert client.get("/api/status", headers={"origin": "https://evil.example"}).status_code == 200
    # on a connection to a loopback address (whatever name --host gave it, or the Python API's
    # BackgroundServer), a Host that is not localhost or a loopback address is refused
    from mmembed.serve.safety import SameSite

    async def ok(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    def status(host: str, server: str) -> int:
        import asyncio

        sent = []

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "method": "GET", "server": (server, 8000), "headers": [(b"host", host.encode())]}
        asyncio.run(SameSite(ok)(scope, None, send))
        return sent[0]["status"]

    assert status("127.0.0.1:8000", "127.0.0.1") == status("localhost:8000", "127.0.0.1") == 200
    assert status("[::1]:8000", "::1") == 200
    assert status("evil.example:8000", "127.0.0.1") == status("evil.example", "::1") == 403
    assert status("my-laptop.lan:8000", "192.168.1.5") == 200  # served to the network: names are the user's


# ---- fixes: user names, playable media, form fields, bounds ----------------------------------------


def test_a_user_name_with_a_space_at_either_end_is_refused_never_trimmed(client):
    """" zed" was trimmed to "zed" (Memory keeps them apart): it listed and deleted zed's items."""
    memory = client.app.state.serve.memory
    zed = memory.add("zed", "zed's own note")
    spaced = memory.add(" zed", "a note of ' zed'")
    error = "a user name must not start or end with a space, got ' zed'"
    for user in (" zed", "zed "):
        listed = client.get("/api/memory", params={"user": user})
        assert listed.status_code == 400 and listed.json()["error"] == error.replace("' zed'", repr(user))
        for item in (zed, spaced):
            assert client.delete(f"/api/memory/items/{item}", params={"user": user}).status_code == 400
            assert client.get(f"/api/memory/items/{item}/media", params={"user": user}).status_code == 400
        stored = client.post("/api/memory/remember", files=files(("user", user), ("text", "hello")))
        assert stored.status_code == 400 and "must not start or end with a space" in stored.json()["error"]
    assert [h.id for h in memory.recent("zed")] == [zed] and [h.id for h in memory.recent(" zed")] == [spaced]
    assert [i["id"] for i in client.get("/api/memory", params={"user": "zed"}).json()["items"]] == [zed]
    assert client.get("/api/memory", params={"user": "   "}).json() == {"error": "give a user name (whose memory)"}


def test_only_media_the_page_plays_get_a_url_and_the_others_say_why(client, tiny_world):
    """A sound stored as AIFF was listed with a `media` URL, which then said the item did not exist."""
    memory = client.app.state.serve.memory
    name, wav = first(tiny_world, "audio")
    played = memory.add("dora", mm.Audio(wav))
    aiff = memory.add("dora", mm.Audio(aiff_of(wav)))
    items = {i["id"]: i for i in client.get("/api/memory", params={"user": "dora"}).json()["items"]}
    assert items[aiff]["media"] is None and items[played]["media"] is not None
    assert client.get(items[played]["media"]).content == wav
    response = client.get(f"/api/memory/items/{aiff}/media", params={"user": "dora"})
    assert response.status_code == 404
    assert response.json()["error"] == f"item {aiff}'s audio is AIFF, which the page does not play (it plays WAV, FLAC, OGG)"
    assert client.get(f"/api/memory/items/{aiff}/media", params={"user": "bob"}).json()["error"] == (
        f"user 'bob' has no item {aiff} with a picture or sound")


def test_index_hits_get_a_media_url_only_for_files_the_page_plays(model, tiny_world, tmp_path):
    """A hit on an indexed AIFF sound had a `media` URL that answered 404."""
    world = shutil.copytree(tiny_world, tmp_path / "world")
    rows = manifest_rows(world)
    wav = world / rows[0]["audio"]
    wav.with_suffix(".aiff").write_bytes(aiff_of(wav.read_bytes()))
    rows[0]["audio"] = rows[0]["audio"].removesuffix(".wav") + ".aiff"
    (world / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    mm.Index.build(model, world / "test.jsonl", progress=False).save(tmp_path / "index")
    state = open_state(model, run="aiff", index=tmp_path / "index")
    with TestClient(create_app(state)) as client:
        hits = client.post("/api/search", files=files(("text", "a red star")), data={"target": "audio", "k": "50"})
        by_name = {h["name"]: h for h in hits.json()["hits"]}
        assert len(by_name) == len(rows)
        aiff = by_name.pop(Path(rows[0]["audio"]).name)
        assert aiff["media"] is None and all(h["media"] is not None for h in by_name.values())
        assert all(client.get(h["media"]).status_code == 200 for h in by_name.values())
        response = client.get(f"/api/media/{aiff['id']}")
        assert response.status_code == 404 and response.json()["error"] == (
            f"item {aiff['id']}'s audio is AIFF, which the page does not play (it plays WAV, FLAC, OGG)")


def test_stop_strings_end_the_answer_as_the_python_api_does(client, model):
    """`stop` was ignored: the server wrote the whole answer where `generate(stop=[...])` stopped."""
    settings = {"max_new_tokens": "16", "temperature": "1.0", "seed": "5"}
    whole = model.generate("Describe", max_new_tokens=16, temperature=1.0, seed=5)
    assert len(whole.text) > 4, whole.text
    stops = [whole.text[2:4], "never written \u2603"]  # a stop string is kept as sent, spaces included
    expected = model.generate("Describe", max_new_tokens=16, temperature=1.0, seed=5, stop=stops)
    assert expected.finish_reason == "stop" and expected.text == whole.text[:2]
    body = files(("text", "Describe"), *[("stop", s) for s in stops])
    out = client.post("/api/generate", files=body, data=settings).json()
    assert (out["text"], out["finish_reason"]) == (expected.text, "stop")
    assert [t["id"] for t in out["tokens"]] == expected.token_ids
    with client.stream("POST", "/api/generate/stream", files=body, data=settings) as response:
        done = response.read().decode().split("event: done\ndata: ")[1]
    assert json.loads(done)["text"] == expected.text and json.loads(done)["finish_reason"] == "stop"
    best = client.post("/api/generate", files=body, data={**settings, "best_of": "3"}).json()
    chosen = model.generate("Describe", max_new_tokens=16, temperature=1.0, seed=5, stop=stops, best_of=3)
    assert (best["text"], best["finish_reason"]) == (chosen.text, chosen.finish_reason)
    asked = client.post("/api/memory/ask", files=files(("user", "sam"), ("text", "Describe"), ("stop", "e")))
    assert asked.status_code == 200 and "e" not in asked.json()["text"]
    too_many = client.post("/api/generate", files=files(("text", "hi"), *[("stop", str(i)) for i in range(9)]))
    assert too_many.status_code == 400 and too_many.json()["error"] == "9 stop strings; at most 8"
    as_file = client.post("/api/generate", files=files(("text", "hi"), ("stop", ("s.txt", b"on"))))
    assert as_file.json()["error"] == "stop must be a text field, not a file"


@pytest.mark.parametrize("path, fields", [
    ("/api/generate", [("text", "hi")]), ("/api/generate/stream", [("text", "hi")]),
    ("/api/memory/ask", [("user", "ula"), ("text", "hi")]), ("/api/memory/remember", [("user", "ula"), ("text", "hi")]),
    ("/api/search", [("text", "hi")]),
])
def test_a_field_the_endpoint_does_not_read_is_refused(client, path, fields):
    """`temprature=1.5` was dropped: the answer came back greedy, with a 200."""
    response = client.post(path, files=files(*fields, ("temprature", "1.5")))
    assert response.status_code == 400 and response.json()["error"].startswith("unknown field 'temprature'; known: ")
    known = response.json()["error"].split("known: ")[1].split(", ")
    assert {"text", "file"} <= set(known) and ("temperature" in known) == ("generate" in path or "ask" in path)
    assert client.app.state.serve.memory.count("ula") == 0


def test_top_k_past_the_vocabulary_is_all_of_it_and_status_lists_the_bounds(client, model):
    """top_k above 1,000,000 was a 400 where Python keeps the whole vocabulary."""
    response = client.post("/api/generate", files=files(("text", "hi")),
                           data={"top_k": "5000000", "temperature": "1", "seed": "2", "max_new_tokens": "6"})
    assert response.status_code == 200, response.text
    assert response.json()["text"] == model.generate("hi", top_k=5_000_000, temperature=1.0, seed=2, max_new_tokens=6).text
    response = client.post("/api/generate", files=files(("text", "hi")), data={"top_k": "0"})
    assert response.json()["error"] == "top_k must be at least 1, got 0"
    response = client.post("/api/generate", files=files(("text", "hi")), data={"temperature": "100.5"})
    assert response.json()["error"] == "temperature must be between 0 and 100, got 100.5"
    limits = client.get("/api/status").json()["limits"]
    assert (limits["max_temperature"], limits["max_stops"]) == (100, 8)


# ---- fixes: cut-off forms, Origin and Host guards, size and text messages, status paths -------------


CUT = "bad form: the form ends before its closing boundary (was the upload cut off?)"


def part(name: str, value: bytes, filename: str | None = None) -> bytes:
    disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
    return f"--B\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + value


def test_a_form_cut_off_before_its_closing_boundary_is_a_400(client, tiny_world):
    """Starlette dropped a part that never ended: the text was stored and the picture lost (a 200),
    an unterminated temperature=1.5 answered greedily, a cut-off k=3 gave 12 hits."""
    name, data = first(tiny_world, "image")
    memory = client.app.state.serve.memory
    kind = {"content-type": "multipart/form-data; boundary=B"}
    user, text = part("user", b"cut") + b"\r\n", part("text", b"my picture:") + b"\r\n"
    for body, path in [(user + text + part("file", data, name), "/api/memory/remember"),
                       (user + text + part("file", data, name) + b"\r\n--B-", "/api/memory/remember"),
                       (part("text", b"hi") + b"\r\n" + part("temperature", b"1.5"), "/api/generate"),
                       (part("text", b"a red star") + b"\r\n" + part("k", b"3"), "/api/search"),
                       (b"", "/api/search")]:
        response = client.post(path, content=body, headers=kind)
        assert response.status_code == 400 and response.json() == {"error": CUT}, (body[-40:], response.text)
    assert memory.count("cut") == 0
    # the same form with its closing boundary is read whole
    whole = user + text + part("file", data, name) + b"\r\n--B--\r\n"
    assert client.post("/api/memory/remember", content=whole, headers=kind).status_code == 200
    assert sorted(h.modality for h in memory.recent("cut")) == ["image", "text"]
    closed = part("text", b"a red star") + b"\r\n" + part("k", b"3") + b"\r\n--B--"
    assert len(client.post("/api/search", content=closed, headers=kind).json()["hits"]) == 3


def test_a_malformed_origin_is_a_json_403_through_the_app(client):
    """Origin: http://[ made urlsplit raise outside the crash guard: a plain-text 500 and a traceback."""
    for origin in ("http://[", "http://[::1", "http://a:b@[x]"):
        response = client.post("/api/search", files=files(("text", "a red star")), headers={"origin": origin})
        assert response.status_code == 403 and response.json() == {"error": f"refused: Origin {origin!r} is not a URL"}
        assert "content-security-policy" in response.headers
    assert client.get("/api/status").status_code == 200


def test_the_host_check_holds_on_a_dual_stack_socket(model):
    """Under --host :: an IPv4 loopback connection reports ::ffff:127.0.0.1, which did not count as
    loopback: Host: evil.example (a DNS name rebound to 127.0.0.1) got a 200 from /api/status."""
    import httpx

    from mmembed.serve import BackgroundServer

    state = ServeState(model, IndexBuild(), None, LIMITS, "tiny", threading.Lock())
    try:
        server = BackgroundServer(create_app(state), host="::")
        url = server.__enter__()
    except (UserError, RuntimeError) as e:
        pytest.skip(f"no IPv6 socket here ({e})")
    try:
        port = url.rstrip("/").rsplit(":", 1)[1]
        v4 = f"http://127.0.0.1:{port}/api/status"
        refused = httpx.get(v4, headers={"host": "evil.example"}, timeout=10)
        assert refused.status_code == 403 and "evil.example" in refused.json()["error"]
        assert httpx.get(v4, timeout=10).status_code == 200
        assert httpx.get(v4, headers={"host": f"[::ffff:127.0.0.1]:{port}"}, timeout=10).status_code == 200
    finally:
        server.__exit__(None, None, None)


@pytest.mark.parametrize("host", ["0.0.0.0", "::"])
def test_a_server_on_every_address_prints_a_url_that_opens(model, host):
    """`--host 0.0.0.0` printed http://0.0.0.0:PORT/, which reaches this computer's loopback with
    Host: 0.0.0.0:PORT, and that Host was a 403 (`--host ::` the same with [::])."""
    import httpx

    from mmembed.serve import BackgroundServer

    state = ServeState(model, IndexBuild(), None, LIMITS, "tiny", threading.Lock())
    try:
        server = BackgroundServer(create_app(state), host=host)
        url = server.__enter__()
    except (UserError, RuntimeError) as e:
        pytest.skip(f"no socket on {host} here ({e})")
    try:
        port = url.rstrip("/").rsplit(":", 1)[1]
        assert url == (f"http://127.0.0.1:{port}/" if host == "0.0.0.0" else f"http://[::1]:{port}/")
        assert httpx.get(url + "api/status", timeout=10).status_code == 200
        wildcard = f"{'[::]' if ':' in host else host}:{port}"
        assert httpx.get(url + "api/status", headers={"host": wildcard}, timeout=10).status_code == 200
        refused = httpx.get(url + "api/status", headers={"host": "evil.example"}, timeout=10)
        assert refused.status_code == 403
    finally:
        server.__exit__(None, None, None)


def test_a_file_just_over_its_limit_does_not_read_as_the_limit(client):
    """A file of the limit and a byte was "too large (0.1 MB; at most 0.1 MB a file)" (10.0 and 10.0
    at the default 10 MB)."""
    big = b"\x89PNG\r\n\x1a\n" + bytes(LIMITS.max_file_bytes - 7)
    response = client.post("/api/search", files=files(("file", ("big.png", big))))
    assert response.status_code == 413
    assert response.json()["error"] == "big.png is too large (65,537 bytes; at most 65,536 bytes a file)"


def test_a_text_too_long_is_named_by_its_place_among_the_texts(client, tiny_world):
    """A too-long text after a file was "text 2 has 2,001 characters", though it was the only text."""
    name, data = first(tiny_world, "image")
    response = client.post("/api/search", files=files(("file", (name, data)), ("text", "x" * 2001)))
    assert response.status_code == 413 and response.json()["error"] == "text 1 has 2,001 characters; at most 2,000"
    response = client.post("/api/search", files=files(("text", "red"), ("file", (name, data)), ("text", "x" * 2001)))
    assert response.json()["error"] == "text 2 has 2,001 characters; at most 2,000"


def test_status_shows_the_index_by_name_never_its_path(client, model, tiny_world, tmp_path, monkeypatch):
    """/api/status gave every client the server's path of the index ("/tmp/review-serve/idx")."""
    assert client.get("/api/status").json()["index"]["source"] == "test.jsonl"
    mm.Index.build(model, tiny_world / "test.jsonl", progress=False).save(tmp_path / "my-index")
    monkeypatch.chdir(tmp_path / "my-index")
    for given in (tmp_path / "my-index", f"{tmp_path}/my-index/", "."):  # `--index .` is the folder's name too
        assert IndexBuild.load(given, model).status()["source"] == "my-index"
