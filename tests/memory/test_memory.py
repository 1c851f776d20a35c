"""Memory API: add → search, user scoping, filters, delete / forget, reads, and one-line input errors."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pytest
import torch

import mmembed as mm
from mmembed.errors import BadInput, UserError
from mmembed.memory import Memory
from mmembed.memory import memory as memory_module
from mmembed.modality import Modality
from tests.memory.conftest import picture, sound


@pytest.fixture
def mem(db, model):
    with Memory(db, model=model) as m:
        yield m


def test_add_then_search_finds_the_same_item_with_score_one(mem):
    ids = {
        "img": mem.add("ada", mm.Image(picture(0)), text="a noisy picture"),
        "wav": mem.add("ada", mm.Audio(sound(0))),
        "txt": mem.add("ada", "a small blue star"),
        "cap": mem.add("ada", mm.Text("a large red circle")),
        "none": mem.add("ada", None, text="a red circle on the left"),
    }
    queries = {"img": mm.Image(picture(0)), "wav": mm.Audio(sound(0)), "txt": mm.Text("a small blue star"),
               "cap": "a large red circle", "none": "a red circle on the left"}
    for key, query in queries.items():
        hits = mem.search("ada", query, k=5)
        assert hits[0].id == ids[key] and hits[0].score == pytest.approx(1.0, abs=1e-5), key
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
        assert len(hits) == 5
    assert sorted(ids.values()) == list(range(1, 6))
    z = mem.model.embed("audio", [sound(0)])  # (1, D), as embed returns one item: Index.search takes it too
    assert mem.search("ada", z, k=1)[0].id == ids["wav"]
    hit = mem.search("ada", mm.Image(picture(0)), k=1)[0]
    assert (hit.user, hit.modality, hit.text, hit.role, hit.meta) == ("ada", Modality.IMAGE, "a noisy picture",
                                                                      "user", {})


def test_users_never_see_each_others_items(mem):
    a = mem.add("ada", "a small blue star")
    b = mem.add("bob", "a small blue star")
    mem.add("bob", mm.Image(picture(1)))
    assert [h.id for h in mem.search("ada", "a small blue star", k=10)] == [a]
    assert {h.id for h in mem.search("bob", "a small blue star", k=10)} == {b, b + 1}
    assert mem.search("carol", "a small blue star") == []
    assert mem.get([a, b], user="ada")[0].id == a and len(mem.get([a, b], user="ada")) == 1
    assert mem.delete([a], user="bob") == 0 and mem.count("ada") == 1  # another user's id: untouched
    assert mem.count() == 3 and mem.count("bob") == 2


def test_filters_modality_since_session_are_exact(mem):
    t0 = 1_700_000_000.0
    img = mem.add("ada", mm.Image(picture(2)), session="s1", time=t0)
    wav = mem.add("ada", mm.Audio(sound(2)), session="s1", time=t0 + 10)
    txt = mem.add("ada", "a small blue star", session="s2", time=t0 + 20)
    loose = mem.add("ada", "a large red circle", time=t0 + 30)

    def ids(**kw):
        return {h.id for h in mem.search("ada", "a blue star", k=10, **kw)}

    assert ids() == {img, wav, txt, loose}
    assert ids(modality="image") == {img} and ids(modality=Modality.AUDIO) == {wav}
    assert ids(modality="text") == {txt, loose}
    assert ids(since=t0 + 10) == {wav, txt, loose}
    assert ids(since=dt.datetime.fromtimestamp(t0 + 20, tz=dt.timezone.utc)) == {txt, loose}
    assert ids(session="s1") == {img, wav} and ids(session="nope") == set()
    assert ids(exclude_session="s1") == {txt, loose}
    assert ids(session="s1", modality="audio", since=t0 + 5) == {wav}
    assert ids(since=t0 + 100) == set()
    assert mem.sessions("ada") == ["s1", "s2"]


def test_filtered_top_k_equals_a_brute_force_reference(mem, model):
    rng = np.random.default_rng(0)
    t0, sessions = 1_700_000_000.0, ["a", "b", None]
    texts = [f"item number {i} is a {rng.choice(['red', 'blue', 'green'])} {rng.choice(['star', 'circle'])}"
             for i in range(40)]
    rows = []  # (id, vector, modality, time, session)
    for i, text in enumerate(texts):
        when, session = t0 + int(rng.integers(0, 100)), sessions[i % 3]
        item = mm.Image(picture(i)) if i % 4 == 0 else text
        rows.append((mem.add("ada", item, session=session, time=when), item, when, session))
    mem.add_many("bob", texts[:10])  # another user's items never show up
    vectors = torch.stack([model.embed(it.modality, [it.item])[0] if isinstance(it, mm.Image) else
                           model.embed("text", [it])[0] for _, it, _, _ in rows])  # (N, D)
    modality_of = ["image" if isinstance(it, mm.Image) else "text" for _, it, _, _ in rows]
    filters = [{}, {"modality": "image"}, {"since": t0 + 50}, {"session": "a"}, {"exclude_session": "b"},
               {"modality": "text", "since": t0 + 30, "exclude_session": "a"}]
    for query in ["a red star", "a green circle"]:
        q = model.embed("text", [query])[0]
        for f in filters:
            keep = [j for j, (_, _, when, session) in enumerate(rows)
                    if f.get("modality", modality_of[j]) == modality_of[j] and when >= f.get("since", t0)
                    and f.get("session", session) == session and session != f.get("exclude_session", "-")]
            scores = vectors[keep] @ q
            expected = [rows[keep[j]][0] for j in torch.argsort(scores, descending=True)[:7].tolist()]
            hits = mem.search("ada", query, k=7, **f)
            assert [h.id for h in hits] == expected, f
            assert [h.score for h in hits] == pytest.approx(sorted(scores.tolist(), reverse=True)[:7], abs=1e-5)


def test_cached_vectors_are_bounded(mem, monkeypatch):
    monkeypatch.setattr(memory_module, "MAX_CACHED_ROWS", 5)
    for user in ("ada", "bob", "cy"):
        mem.add_many(user, [f"{user} item {i}" for i in range(3)])
        assert mem.search(user, "item", k=1)
    assert list(mem._vectors) == ["cy"]  # the one being searched always stays
    assert [len(mem.search(u, "item", k=10)) for u in ("ada", "bob", "cy")] == [3, 3, 3]


def test_delete_and_forget(mem):
    ids = mem.add_many("ada", ["one star", "two stars", "three stars", "four stars"],
                       metas=[{"n": i} for i in range(4)])
    other = mem.add("bob", "one star")
    assert len(mem.search("ada", "stars", k=10)) == 4  # vectors now cached
    assert mem.delete([ids[0], ids[2], 12345]) == 2
    assert {h.id for h in mem.search("ada", "stars", k=10)} == {ids[1], ids[3]}
    assert mem.get(ids) == mem.get([ids[1], ids[3]]) and mem.delete(ids[1]) == 1
    assert mem.forget("ada") == 1 and mem.count("ada") == 0 and mem.search("ada", "stars") == []
    assert mem.count("bob") == 1 and mem.search("bob", "one star")[0].id == other
    new = mem.add("ada", "five stars")
    assert new > other  # ids are never reused
    assert [h.id for h in mem.search("ada", "stars", k=10)] == [new]
    huge = 10**20  # past SQLite's 64-bit ids: unknown, as any absent id (it was an OverflowError)
    assert mem.delete([huge, new]) == 1 and mem.get([huge, other]) == mem.get([other])
    with pytest.raises(UserError, match=str(huge)):
        mem.vectors([other, huge])


def test_get_recent_sessions_count(mem):
    t0 = 1_700_000_000.0
    a = mem.add("ada", mm.Image(picture(3)), text="look", session="s1", turn=0, time=t0)
    b = mem.add("ada", None, text="a noisy picture", session="s1", turn=1, role="assistant", time=t0 + 1)
    c = mem.add("ada", "new topic", session="s2", turn=0, time=t0 + 2, meta={"mood": "ok", "n": [1, 2]})
    assert [h.id for h in mem.recent("ada")] == [a, b, c]
    assert [h.id for h in mem.recent("ada", limit=2)] == [b, c]
    assert [h.id for h in mem.recent("ada", session="s1")] == [a, b]
    recent = mem.recent("ada", session="s1", media=True)
    assert recent[0].media[:8] == b"\x89PNG\r\n\x1a\n" and recent[1].media is None
    assert mem.recent("ada")[0].media is None and mem.recent("ada")[0].score is None
    hit = mem.get([c])[0]
    assert (hit.session, hit.turn, hit.role, hit.time) == ("s2", 0, "user", t0 + 2)
    assert hit.meta == {"mood": "ok", "n": [1, 2]}
    assert mem.get(b)[0].role == "assistant"
    assert mem.sessions("ada") == ["s1", "s2"] and mem.sessions("bob") == []
    assert mem.count() == 3 and mem.count("ada") == 3 and mem.count("bob") == 0


def test_media_bytes_are_what_was_given_or_lossless(mem, tmp_path):
    img = picture(4)
    path = tmp_path / "x.png"
    img.save(path)
    from_file = mem.add("ada", mm.Image(path))
    from_pil = mem.add("ada", mm.Image(img))
    from_array = mem.add("ada", mm.Image(np.asarray(img)))
    from_wave = mem.add("ada", mm.Audio(sound(4)))
    from_int16 = mem.add("ada", mm.Audio(((sound(5)[0] * 32767).astype(np.int16).reshape(2, -1), 8000)))
    got = {h.id: h.media for h in mem.get([from_file, from_pil, from_array, from_wave, from_int16])}
    assert got[from_file] == path.read_bytes()
    from PIL import Image
    import io
    import soundfile as sf

    for i in (from_pil, from_array):
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(got[i]))), np.asarray(img))
    wave, rate = sf.read(io.BytesIO(got[from_wave]), dtype="float32")
    assert rate == 16000 and np.array_equal(wave, sound(4)[0])
    stereo, rate = sf.read(io.BytesIO(got[from_int16]), dtype="float32")
    assert rate == 8000 and stereo.shape == (4000, 2)
    # the same picture given three ways is one vector
    scores = [h.score for h in mem.search("ada", mm.Image(img), k=3, modality="image")]
    assert scores == pytest.approx([1.0, 1.0, 1.0], abs=1e-5)


def test_store_media_path_keeps_only_the_path(mem, tmp_path):
    path = tmp_path / "y.png"
    picture(5).save(path)
    i = mem.add("ada", mm.Image(str(path)), store_media="path")
    hit = mem.get(i)[0]
    assert hit.media is None and hit.media_path == str(path.absolute())
    assert mem.search("ada", mm.Image(path), k=1)[0].score == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(UserError, match="store_media='path' needs a file path"):
        mem.add("ada", mm.Image(picture(5)), store_media="path")


def test_raw_vector_queries_and_a_memory_without_model(db, model):
    with Memory(db, model=model) as mem:
        i = mem.add("ada", "a small blue star")
        mem.add("ada", "a large red circle")
        vector = model.embed("text", ["a small blue star"])[0]  # (D,)
        assert mem.search("ada", vector * 3.0, k=1)[0].id == i  # any length: normalised
    with Memory(db) as ro:
        assert ro.search("ada", vector.numpy(), k=1)[0].id == i
        assert ro.count() == 2 and ro.recent("ada")[0].text == "a small blue star"
        # the model was built in Python, not loaded from a run: the file names no run to load
        with pytest.raises(UserError, match=r"without a model and memory.db names no run: pass model="):
            ro.add("ada", "more")
        with pytest.raises(UserError, match=r"without a model and memory.db names no run: pass model="):
            ro.search("ada", "a star")
        assert ro.delete([i]) == 1
    with Memory(db.with_name("empty.db")) as empty:  # no model has written it yet: no dimension
        assert empty.search("ada", torch.ones(8)) == [] and empty.count() == 0


@pytest.mark.parametrize("call, error, message", [
    (lambda m: m.add("", "x"), UserError, "user must be a non-empty str"),
    (lambda m: m.add(7, "x"), UserError, "user must be a non-empty str"),
    (lambda m: m.add("ada", 42), UserError, "cannot store a int"),
    (lambda m: m.add("ada"), UserError, "add needs an item"),
    (lambda m: m.add("ada", mm.Text("x"), text="y"), UserError, "its own text"),
    (lambda m: m.add("ada", mm.Text("  ")), BadInput, "non-empty str"),
    (lambda m: m.add("ada", "x", role="system"), UserError, "role must be one of user, assistant"),
    (lambda m: m.add("ada", "x", meta={"f": object()}), BadInput, "meta must be JSON-able"),
    (lambda m: m.add("ada", "x", meta=[1]), BadInput, "meta must be a dict"),
    (lambda m: m.add("ada", "x", time=float("nan")), UserError, "time must be unix seconds"),
    (lambda m: m.add("ada", "x", turn="1"), UserError, "turn must be an int"),
    (lambda m: m.add("ada", "x", store_media="inline"), UserError, "store_media must be"),
    (lambda m: m.add("ada", mm.Image(b"<html>not an image</html>")), BadInput, "image"),
    (lambda m: m.add("ada", mm.Image("/no/such/file.png")), BadInput, "missing file"),
    (lambda m: m.add("ada", mm.Image("")), BadInput, "empty path ''"),  # was "not a file: ."
    (lambda m: m.add("ada", mm.Audio(" ")), BadInput, "empty path ' '"),
    (lambda m: m.add("ada", mm.Audio(np.zeros(100, np.float32))), BadInput, "needs its sample rate"),
    (lambda m: m.add("ada", mm.Audio((np.full(100, np.nan, np.float32), 16000))), BadInput, "NaN"),
    (lambda m: m.add_many("ada", ["a", 42]), UserError, r"^items\[1\]: cannot store a int"),
    (lambda m: m.add_many("ada", ["a", mm.Image("/no/such/file.png")]), BadInput, r"^items\[1\] \(image\): missing file"),
    (lambda m: m.add_many("ada", ["a", "b"], texts=["x"]), UserError, "2 items, 1 texts"),
    (lambda m: m.search("ada", "x", k=0), UserError, "k must be a positive int"),
    (lambda m: m.search("ada", "x", modality="video"), UserError, "unknown modality 'video'"),
    (lambda m: m.search("ada", torch.ones(5)), BadInput, r"must have shape \(32,\).*got \(5,\)"),
    (lambda m: m.search("ada", torch.ones(2, 32)), BadInput, r"must have shape \(32,\).*got \(2, 32\)"),
    (lambda m: m.search("ada", "x", k=np.True_), UserError, "k must be a positive int"),
    (lambda m: m.search("ada", torch.full((32,), float("nan"))), BadInput, "NaN"),
    (lambda m: m.search("ada", torch.zeros(32)), BadInput, "zero vector"),
    (lambda m: m.search("ada", 3.0), UserError, "cannot search with a float"),
    (lambda m: m.recent("ada", limit=0), UserError, "limit must be a positive int"),
    (lambda m: m.delete(["1"]), UserError, "ids must be ints"),
    # JSON would turn the key into "1" (and lose the entry beside a "1"): it would not come back
    (lambda m: m.add("ada", "x", meta={1: "int key", "1": "str key"}), BadInput, "key that is not a str: 1"),
    (lambda m: m.add("ada", "x", meta={"a": [{2.5: 0}]}), BadInput, "key that is not a str: 2.5"),
])
def test_bad_input_is_one_line_and_changes_nothing(mem, call, error, message):
    mem.add("ada", "kept")
    with pytest.raises(error, match=message) as info:
        call(mem)
    assert "\n" not in str(info.value)
    assert mem.count() == 1


def test_add_many_is_all_or_nothing(mem):
    with pytest.raises(BadInput):
        mem.add_many("ada", ["fine", mm.Image(b"garbage bytes"), "also fine"])
    assert mem.count() == 0
    ids = mem.add_many("ada", ["fine", mm.Image(picture(6)), mm.Audio(sound(6)), "also fine"],
                       texts=[None, "pic", "clip", None], session="s")
    assert ids == [1, 2, 3, 4]
    assert [h.modality for h in mem.get(ids)] == [Modality.TEXT, Modality.IMAGE, Modality.AUDIO, Modality.TEXT]
    assert mem.search("ada", mm.Audio(sound(6)), k=1)[0].id == 3


def test_vectors_are_the_stored_embeddings(mem, model):
    ids = mem.add_many("ada", ["a small blue star", mm.Image(picture(7))])
    other = mem.add("bob", "a large red circle")
    v = mem.vectors(ids)  # (2, D)
    assert v.shape == (2, 32) and v.dtype == torch.float32
    assert torch.allclose(v[0], model.embed("text", ["a small blue star"])[0], atol=1e-6)
    assert torch.allclose(v.norm(dim=1), torch.ones(2), atol=1e-5)
    assert torch.equal(mem.vectors(ids[1]), v[1:]) and torch.equal(mem.vectors([ids[1], ids[0]]), v.flip(0))
    assert mem.search("ada", v[1], k=1)[0].id == ids[1]
    with pytest.raises(UserError, match=f"no item of user 'ada' with id {other}"):
        mem.vectors([ids[0], other], user="ada")


def test_out_of_range_arguments_are_one_line_errors(db, model):
    """They were raw OverflowError / ValueError tracebacks (nothing was stored either way)."""
    with Memory(db, model=model) as mem:
        for call in (lambda: mem.add("ada", "x", turn=2**70), lambda: mem.recent("ada", limit=2**63),
                     lambda: mem.add("ada", "x", time=dt.datetime.min),
                     lambda: mem.search("ada", "x", since=dt.datetime.min),
                     lambda: mem.add("ada", "x", time=10**400), lambda: mem.search("ada", "x", since=-10**400)):
            with pytest.raises(UserError):
                call()
        assert mem.count() == 0


def test_a_reader_without_a_model_reads_vectors_a_writer_stored_after_it_opened(db, model):
    reader = Memory(db)  # a new file: no model has claimed it yet
    with Memory(db, model=model) as writer:
        item = writer.add("ada", "a red star")
    assert reader.vectors([item]).shape == (1, model.embed_dim)  # was a reshape ValueError
    reader.close()


@pytest.mark.parametrize("damage, column", [("meta = '{not json'", "meta"), ("modality = 'video'", "modality"),
                                            ("embedding = 'text, not bytes'", "embedding")])
def test_a_damaged_row_is_a_corrupt_file_error_not_a_traceback(db, model, damage, column):
    """Bytes that SQLite reads back fine but that do not decode (JSON, a modality, a NULL
    embedding) gave JSONDecodeError / ValueError / TypeError tracebacks from search and export."""
    import sqlite3

    from mmembed.memory import MemoryFileError

    with Memory(db, model=model) as mem:
        mem.add_many("ada", ["a red star", "a blue circle"])
    conn = sqlite3.connect(db)
    conn.execute(f"UPDATE items SET {damage} WHERE id = 2")
    conn.commit()
    conn.close()
    with Memory(db, model=model) as mem:
        calls = [lambda: mem.search("ada", "a red star", k=5), lambda: mem.recent("ada"), lambda: mem.get([1, 2])]
        for call in calls if column != "embedding" else calls[:1]:
            with pytest.raises(MemoryFileError, match=r"is corrupt \(.*\); restore it from a copy$"):
                call()


def test_a_pil_picture_is_stored_upright_and_a_rate_a_wav_cannot_hold_is_refused(tmp_path):
    """A JPEG with EXIF orientation 6, given as a PIL image, was stored unrotated (its stored
    vector and model.embed of it then disagreed: cosine 0.73); (wave, 10**12) was an OverflowError."""
    import io

    import numpy as np
    import pytest
    from PIL import Image

    from mmembed.errors import BadInput
    from mmembed.memory.items import encode_audio, encode_image

    picture = Image.new("RGB", (64, 32), "red")
    exif = picture.getexif()
    exif[0x0112] = 6  # rotate 90° clockwise to view
    picture.save(tmp_path / "turned.jpg", exif=exif)
    with Image.open(tmp_path / "turned.jpg") as pil:
        stored = Image.open(io.BytesIO(encode_image(pil)))
        assert stored.size == (32, 64)
    with pytest.raises(BadInput, match="cannot be stored in a WAV file"):
        encode_audio((np.zeros(100, dtype=np.float32), 10**12))


def test_a_damaged_embedding_width_or_embedding_is_a_memory_file_error(model, db):
    """A meta dim that is no number gave int()'s ValueError; an embedding of the wrong length
    read by `vectors` gave numpy's reshape error."""
    import sqlite3

    from mmembed.memory import MemoryFileError

    with mm.Memory(db, model=model) as mem:
        first = mem.add("ada", "hello")
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE items SET embedding = x'00010203' WHERE id = ?", (first,))
    with mm.Memory(db, model=model) as mem, pytest.raises(MemoryFileError, match=f"item {first} does not hold"):
        mem.vectors([first])
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE meta SET value = 'abc' WHERE key = 'dim'")
    with pytest.raises(MemoryFileError, match="is corrupt \\(its embedding width is 'abc'\\)"):
        mm.Memory(db, model=model)


def test_a_memory_file_under_a_file_says_so(model, tmp_path):
    """`chat --memory c.txt/m.db` with c.txt a file said "folder c.txt does not exist"."""
    from mmembed.memory import MemoryFileError

    (tmp_path / "c.txt").write_text("x")
    with pytest.raises(MemoryFileError, match=r"c.txt is a file, not a folder$"):
        mm.Memory(tmp_path / "c.txt" / "m.db", model=model)


def test_a_turn_of_nothing_is_refused(model, db):
    with mm.Memory(db, model=model) as mem, pytest.raises(UserError, match="a turn needs at least one item"):
        mem.add_turn("ada", "s", [mem.prepare([])])


def test_a_lone_item_or_part_is_refused_not_taken_apart(mem):
    """add_many / prepare given a str stored one item per character; add_turn given a str, a lone
    Pending or None, and prepare given None, were AttributeError / TypeError tracebacks."""
    one = mem.prepare(["hello"])
    calls = [(lambda: mem.add_many("ada", "hey"), r"^items must be a list of items; wrap one in \[ \], got str$"),
             (lambda: mem.add_many("ada", mm.Text("hey")), "items must be a list of items.*got Text$"),
             (lambda: mem.add_many("ada", ["a", "b"], texts="xy"), "texts must be a list of str or None.*got str$"),
             (lambda: mem.prepare("hello"), "items must be a list of items.*got str$"),
             (lambda: mem.prepare(None), "items must be a list of items.*got NoneType$"),
             (lambda: mem.add_turn("ada", "s", one), r"parts must be a list of Memory.prepare results; wrap one in \["),
             (lambda: mem.add_turn("ada", "s", None), "parts must be a list of Memory.prepare results"),
             (lambda: mem.add_turn("ada", "s", ["hello"]), "^parts must hold Memory.prepare results, got str$"),
             (lambda: mem.add_turn("ada", "s", [one, None]), "^parts must hold Memory.prepare results, got NoneType$")]
    for call, message in calls:
        with pytest.raises(UserError, match=message):
            call()
    assert mem.count() == 0
    assert mem.add_turn("ada", "s", (one,)) == (1, [1]) and mem.add_many("ada", ("a", "b")) == [2, 3]


def test_recent_and_count_check_their_arguments_as_their_siblings_do(mem):
    """recent(session=5) and count(user=5) / count(user="") answered [] and 0; recent(session=["x"])
    blamed the file (MemoryFileError "SQLite error ... binding parameter")."""
    mem.add("ada", "kept", session="s")
    for call, message in [(lambda: mem.recent("ada", session=5), "^session must be a str, got 5$"),
                          (lambda: mem.recent("ada", session=["x"]), r"^session must be a str, got \['x'\]$"),
                          (lambda: mem.count(user=5), "^user must be a non-empty str, got 5$"),
                          (lambda: mem.count(user=""), "^user must be a non-empty str, got ''$")]:
        with pytest.raises(UserError, match=message) as info:
            call()
        assert type(info.value) is UserError  # not MemoryFileError: the file is fine
    assert [h.text for h in mem.recent("ada", session="s")] == ["kept"] and mem.count(user="ada") == 1


def test_a_memory_opened_without_a_model_embeds_with_the_run_that_wrote_it(tmp_path, model, other_model):
    """Issue #16's `mm.Memory("memory.db")` then `mem.add(...)`: it was refused ("opened without a model")."""
    model.save(tmp_path / "run")
    db = tmp_path / "memory.db"
    with Memory(db, model=mm.load(tmp_path / "run")) as mem:
        star = mem.add("ada", "a small blue star")
    with Memory(db) as mem:  # the store on its own
        circle = mem.add("ada", mm.Image(picture(3)), text="my circle")
        assert mem.search("ada", "a small blue star", k=1)[0].id == star
        assert torch.allclose(mem.vectors([circle])[0], model.embed("image", [picture(3)])[0], atol=1e-5)
    other_model.save(tmp_path / "run")  # trained again over the same folder: its vectors are another space's
    with Memory(db) as mem:
        with pytest.raises(UserError, match=r"written by model .* now holds .*pass model=mm.load"):
            mem.add("ada", "more")
        assert mem.count() == 2
    with Memory(tmp_path / "new.db") as mem:  # no model has claimed it: nothing names a run
        with pytest.raises(UserError, match="names no run"):
            mem.add("ada", "x")


def test_add_turn_refuses_parts_of_another_model_or_edited_vectors(tmp_path, model, other_model):
    """A part prepared through another run's Memory was stored as it was (another space's vectors
    in this file); a wrong width or NaN locked the user out of every later search."""
    import dataclasses

    with Memory(tmp_path / "a.db", model=model) as mem, Memory(tmp_path / "b.db", model=other_model) as other:
        foreign = other.prepare(["a red star on the left"])
        with pytest.raises(UserError, match="prepared by model .* prepare it with this Memory"):
            mem.add_turn("ada", "s1", [foreign])
        own = mem.prepare(["a red star on the left"])
        for vectors, message in ((torch.randn(1, 64), "shape"), (torch.full((1, 32), float("nan")), "NaN"),
                                 (torch.randn(2, 32), "more or fewer vectors than items")):
            with pytest.raises(UserError, match=message):
                mem.add_turn("ada", "s1", [dataclasses.replace(own, vectors=vectors)])
        assert mem.count() == 0
        turn, ids = mem.add_turn("ada", "s1", [dataclasses.replace(own, vectors=own.vectors * 3)])
        assert turn == 1 and torch.allclose(mem.vectors(ids), own.vectors, atol=1e-6)  # stored as unit rows
        assert mem.search("ada", "a red star on the left", k=1)[0].id == ids[0]


def test_numpy_numbers_are_taken_where_python_numbers_are(mem):
    """np.int64 seconds were "must be unix seconds", np.int64(5) hits "must be a positive int"."""
    i = mem.add("ada", "a small blue star", time=np.float32(1.7e9), turn=np.int64(3))
    mem.add("ada", "a large red circle", time=1.8e9)
    assert mem.get([i])[0].turn == 3
    assert [h.id for h in mem.search("ada", "a small blue star", k=np.int64(5), since=np.int64(int(1.75e9)))] \
        == [i + 1]
    assert len(mem.recent("ada", limit=np.int32(1))) == 1
    with pytest.raises(UserError, match="since must be unix seconds"):
        mem.search("ada", "x", since=np.True_)



def test_a_file_without_a_recorded_run_opens_read_only_and_a_gone_run_is_replaced(tmp_path, model, monkeypatch):
    """Recording the run made opening write: a read-only file of an earlier release was refused
    ("attempt to write a readonly database"); and a recorded run that was gone (a pruned checkpoint)
    stayed recorded though the same weights reopened the file from a folder that exists."""
    import contextlib
    import shutil
    import sqlite3

    from mmembed.memory.store import Store

    model.save(tmp_path / "run")
    loaded = mm.load(tmp_path / "run")
    old = tmp_path / "old.db"
    Store(old, model.embed_dim, model.fingerprint).close()  # as written before runs were recorded
    real = Store._transaction

    @contextlib.contextmanager
    def read_only(self, write):
        with real(self, False) as conn:  # a write is what a read-only file refuses
            if write:
                with self._errors():
                    raise sqlite3.OperationalError("attempt to write a readonly database")
            yield conn

    with monkeypatch.context() as patch:
        patch.setattr(Store, "_transaction", read_only)
        with Memory(old, model=loaded) as mem:  # was a MemoryFileError
            assert mem.count() == 0 and mem._store.run is None
    with Memory(old, model=loaded) as mem:  # writable again: the run is recorded
        assert mem._store.run == str(tmp_path / "run")
    shutil.copytree(tmp_path / "run", tmp_path / "copy")
    with Memory(tmp_path / "moved.db", model=mm.load(tmp_path / "copy")) as mem:
        mem.add("ada", "a small blue star")
    shutil.rmtree(tmp_path / "copy")
    Memory(tmp_path / "moved.db", model=loaded).close()  # the same weights, from a folder that exists
    with Memory(tmp_path / "moved.db") as mem:
        assert mem.search("ada", "a small blue star", k=1)[0].text == "a small blue star"


def test_a_huge_number_in_a_message_is_never_cut_into_another(mem):
    """"got 1000…0" showed 10**39 for the 10**45 passed: the cut was invisible."""
    with pytest.raises(UserError, match=r"got 10{39}…$"):
        mem.recent("ada", limit=10**45)


def nested(depth: int) -> list:
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


def holds_itself() -> dict:
    d: dict = {}
    d["self"] = d
    return d


@pytest.mark.parametrize("meta", [holds_itself(), {"a": nested(2000)}], ids=["circular", "deep"])
def test_meta_that_holds_itself_or_nests_too_deep_is_one_line(mem, meta):
    """Such a meta ended in a RecursionError traceback (the key check recursed before JSON's)."""
    mem.add("ada", "kept")
    with pytest.raises(BadInput, match="meta must be JSON-able") as info:
        mem.add("ada", "x", meta=meta)
    assert "\n" not in str(info.value) and mem.count() == 1


@pytest.mark.parametrize("ids, named", [("12", "'12'"), (None, "None"), (1.0, "1.0"), (True, "True"),
                                        (np.array(3.0), "array"), (torch.ones(1, 1, dtype=torch.long), "tensor"),
                                        ({1: 2}, "{1: 2}")])
def test_an_id_that_is_not_an_int_or_a_list_of_them_is_named_as_given(mem, ids, named):
    """A str id was taken apart ("got '1'"), and None or a float raised a bare TypeError."""
    kept = mem.add("ada", "kept")
    for call in (mem.delete, mem.get, mem.vectors):
        with pytest.raises(UserError, match=f"ids must be an int or a list of ints, got {named}"):
            call(ids, user="ada")
    assert mem.count() == 1 and mem.get([kept]) == mem.get(np.array([kept])) == mem.get((kept,))
    # any other iterable of ids, as before the check: a set, a generator, dict keys
    assert mem.get({kept}) == mem.get(i for i in [kept]) == mem.get({kept: 0}.keys()) == mem.get([kept])


def test_ids_and_meta_take_what_an_index_takes(mem):
    """A tensor of ids (as `Index.search_ids` gives) was "ids must be ints, got tensor(1)", and a Path in
    meta "meta must be JSON-able" where an index's metadata keeps it as its str."""
    a, b = mem.add("ada", "a"), mem.add("ada", "b", meta={"p": Path("/x/a.png"), "n": np.int64(3),
                                                            "t": torch.tensor(2.5)})
    assert mem.get(torch.tensor([a, b])) == mem.get(np.array([a, b])) == mem.get([a, b])
    assert mem.get(torch.tensor(b)) == mem.get(np.array(b)) == mem.get(b)
    assert mem.get(b)[0].meta == {"p": "/x/a.png", "n": 3, "t": 2.5}
    with pytest.raises(UserError, match=r"ids must be ints, got tensor\(1\.\)"):
        mem.get(torch.tensor([1.0]))
    with pytest.raises(BadInput, match=r"meta must be JSON-able \(Tensor of shape \(3,\)"):
        mem.add("ada", "c", meta={"v": torch.arange(3)})
    assert mem.count() == 2


@pytest.mark.parametrize("given", ["runs/demo", Path("runs/demo")])
def test_a_run_folder_given_as_the_model_is_refused_by_name(db, given):
    """Memory crashed on `'str' object has no attribute 'embed_dim'`; Session said the run had no decoder."""
    for opened in (lambda: Memory(db, model=given), lambda: mm.Session(given, memory=db, user="ada")):
        with pytest.raises(UserError, match=r"model is the run folder 'runs/demo': pass model=mm.load\(RUN\)"):
            opened()
    assert not db.exists()


def test_a_reversed_numpy_query_or_item_is_read_as_its_values(mem, model):
    """A negative-stride query (a[::-1]) raised torch's "At least one stride ... is negative" ValueError."""
    first = mem.add("ada", "a small blue star")
    mem.add("ada", "a large red circle")
    vector = model.embed(Modality.TEXT, ["a small blue star"]).numpy()  # (1, D)
    for query in (vector[0, ::-1].copy()[::-1], vector[:, ::-1].copy()[:, ::-1]):
        hits = mem.search("ada", query, k=1)
        assert hits[0].id == first and hits[0].score == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(BadInput, match=r"^a query vector must have shape"):
        mem.search("ada", vector[0, ::-2])
    pixels = np.asarray(picture(5))[::-1]  # media given as reversed views are stored as they look
    image = mem.add("ada", mm.Image(pixels))
    assert mem.search("ada", mm.Image(pixels.copy()), k=1)[0].id == image
