"""The memory file: reopen equality, cache sync across connections, refusals, export, fork."""

from __future__ import annotations

import multiprocessing
import os
import re
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import torch

import mmembed as mm
from mmembed.data.manifest import read_manifest
from mmembed.errors import UserError
from mmembed.memory import SCHEMA_VERSION, Memory, MemoryFileError
from mmembed.modality import Modality
from tests.memory.conftest import picture, sound


def fill(mem: Memory) -> list[int]:
    ids = [mem.add("ada", mm.Image(picture(i)), text=f"picture {i}", session="s1", turn=i, meta={"i": i})
           for i in range(3)]
    ids.append(mem.add("ada", mm.Audio(sound(0)), session="s2", role="assistant", time=1_700_000_000.5))
    ids += mem.add_many("ada", ["a small blue star", "a large red circle"], metas=[{"x": "ü"}, None])
    ids.append(mem.add("bob", "a small blue star"))
    return ids


def results(mem: Memory) -> list:
    queries = ["a blue star", mm.Image(picture(1)), mm.Audio(sound(0))]
    return [[(h.id, h.score) for h in mem.search(user, q, k=10)] for user in ("ada", "bob") for q in queries]


def test_reopen_gives_the_same_items_and_results(db, model):
    with Memory(db, model=model) as mem:
        ids = fill(mem)
        before, items = results(mem), mem.get(ids)
    with Memory(db, model=model) as mem:
        after = results(mem)
        assert mem.get(ids) == items
        assert mem.integrity_check() == "ok"
    assert [[i for i, _ in r] for r in after] == [[i for i, _ in r] for r in before]
    assert np.allclose([s for r in after for _, s in r], [s for r in before for _, s in r], atol=1e-6)


def test_cache_follows_other_connections_writes(db, model):
    a, b = Memory(db, model=model), Memory(db, model=model)
    x = a.add("ada", "a small blue star")
    assert [h.id for h in a.search("ada", "star", k=10)] == [x]  # vectors now cached in `a`
    y = b.add("ada", "a large red circle")
    assert {h.id for h in a.search("ada", "star", k=10)} == {x, y}  # data_version changed: refreshed
    z = a.add("ada", "a green square")  # own write: appended to the cache
    assert {h.id for h in a.search("ada", "star", k=10)} == {x, y, z}
    assert b.delete([x]) == 1
    assert {h.id for h in a.search("ada", "star", k=10)} == {y, z}  # a deletion elsewhere: reloaded
    assert b.forget("ada") == 2 and a.search("ada", "star") == []
    w = b.add("ada", mm.Image(picture(0)))
    assert [h.id for h in a.search("ada", "star", k=10)] == [w]
    a.close()
    b.close()


def test_a_file_of_another_model_is_refused_in_one_line(db, model, other_model):
    Memory(db, model=model).close()
    with pytest.raises(MemoryFileError) as info:
        Memory(db, model=other_model)
    message = str(info.value)
    assert f"was written by model {model.fingerprint}" in message
    assert f"this model is {other_model.fingerprint}" in message
    assert "open it with that run, or use another memory file" in message and "\n" not in message
    assert isinstance(info.value, UserError)
    Memory(db).close()  # without a model: the file's own model is accepted


def test_another_schema_version_is_refused(db, model):
    Memory(db, model=model).close()
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    with pytest.raises(MemoryFileError, match=f"schema version 99; this mmembed reads version {SCHEMA_VERSION}"):
        Memory(db, model=model)


def test_files_that_are_not_memory_files_are_refused(tmp_path, model):
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not a database at all " * 200)
    with pytest.raises(MemoryFileError, match=r"junk.db is not an mmembed memory file \(not an SQLite database\)$"):
        Memory(junk, model=model)
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE notes (x)")
    with pytest.raises(MemoryFileError, match="an SQLite database but not an mmembed memory file"):
        Memory(other)
    with pytest.raises(MemoryFileError, match="is a folder"):
        Memory(tmp_path)
    with pytest.raises(MemoryFileError, match="does not exist"):
        Memory(tmp_path / "no" / "memory.db")


def test_a_refused_database_is_left_as_it_was(tmp_path):
    """Opening another program's SQLite file switched it to WAL for good (its header changed) before the
    file was refused: a mistyped --memory rewrote someone else's database."""
    other = tmp_path / "app.db"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE notes (x)")
    conn.close()
    before = other.read_bytes()
    with pytest.raises(MemoryFileError, match="an SQLite database but not an mmembed memory file"):
        Memory(other)
    assert other.read_bytes() == before
    check = sqlite3.connect(other)
    assert check.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    check.close()


@pytest.mark.parametrize("column, value", [("turn", "x"), ("time", "soon")])
def test_a_stored_value_of_the_wrong_type_is_the_corrupt_file_error(db, model, column, value):
    """SQLite keeps any type in any column: a damaged turn number or time was a TypeError or ValueError
    traceback (in Session.ask and in a search) instead of the file's one-line error."""
    with Memory(db, model=model) as mem:
        mem.add_turn("ada", "s", [mem.prepare(["a red star?"]), mem.prepare(["yes"], role="assistant")])
    with sqlite3.connect(db) as conn:
        conn.execute(f"UPDATE items SET {column} = ?", (value,))
    conn.close()
    with Memory(db, model=model) as mem:
        with pytest.raises(MemoryFileError, match=rf"is corrupt \(.*{value!r}"):
            if column == "turn":
                mem.last_turn("ada", "s")
            else:
                mem.search("ada", "a red star")
        if column == "turn":  # and the next turn, numbered after it
            with pytest.raises(MemoryFileError, match=rf"is corrupt \(.*{value!r}"):
                mem.add_turn("ada", "s", [mem.prepare(["and now?"])])


def test_a_corrupt_file_is_one_clear_error(db, model):
    with Memory(db, model=model) as mem:
        mem.add_many("ada", [f"item {i}" for i in range(200)])
    data = bytearray(db.read_bytes())
    data[100:4096] = b"\xff" * (4096 - 100)  # the schema page
    db.write_bytes(bytes(data))
    with pytest.raises(MemoryFileError, match="corrupt|not an mmembed memory file") as info:
        Memory(db, model=model)
    assert "\n" not in str(info.value)


def test_export_round_trip(db, model, tmp_path):
    with Memory(db, model=model) as mem:
        ids = fill(mem)
        manifest_path = mem.export(tmp_path / "out")
        stored = {h.id: h for h in mem.get(ids)}
        with pytest.raises(UserError, match="not empty"):
            mem.export(tmp_path / "out")
        with pytest.raises(UserError, match="nothing to export: memory.db holds no items of user 'carol'"):
            mem.export(tmp_path / "carol", user="carol")
        ada_only = mem.export(tmp_path / "ada", user="ada")
        manifest = read_manifest(manifest_path, strict=True)
        assert [r.meta["id"] for r in manifest] == ids and len(read_manifest(ada_only)) == len(ids) - 1
        for row in manifest:
            hit = stored[row.meta["id"]]
            assert {k: row.meta[k] for k in ("user", "session", "turn", "role", "time", "modality", "meta")} == \
                {"user": hit.user, "session": hit.session, "turn": hit.turn, "role": hit.role, "time": hit.time,
                 "modality": str(hit.modality), "meta": hit.meta}
            assert row.items.get(Modality.TEXT) == hit.text
            if hit.media is not None:
                assert row.items[hit.modality].read_bytes() == hit.media
            else:
                assert set(row.items) == {Modality.TEXT}
        # an exported file embeds to the stored vector
        image_row = next(r for r in manifest if Modality.IMAGE in r.items)
        top = mem.search("ada", mm.Image(image_row.items[Modality.IMAGE]), k=1)[0]
        assert top.id == image_row.meta["id"] and top.score == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(UserError, match="is a file"):
        Memory(db).export(manifest_path)


def test_an_export_that_fails_half_way_leaves_the_file_writable(db, model, tmp_path, monkeypatch):
    """The items are read from one snapshot; a failure while writing them (a full disk) ends that
    read even while the exception, and the traceback holding the reader, are still alive."""
    import mmembed.memory.export as export

    written = export._row

    def full_disk(item, folder):
        if item.id == ids[1]:
            raise OSError(28, "No space left on device")
        return written(item, folder)

    with Memory(db, model=model) as mem:
        ids = fill(mem)
        monkeypatch.setattr(export, "_row", full_disk)
        with pytest.raises(UserError, match="No space") as failed:
            mem.export(tmp_path / "out")
        assert failed.value is not None  # the exception (and its traceback) alive while we write
        assert mem.get([mem.add("ada", "a tiny green cross")])[0].text == "a tiny green cross"
        assert not (tmp_path / "out").exists()  # no half export left: the export made the folder
        monkeypatch.setattr(export, "_row", written)
        assert mem.export(tmp_path / "out").is_file()
        # a killed export (no exception handler ran) left its temporary manifest and media: a retry
        # was refused ("not empty") for good; a folder of the user's own media/ stays refused
        killed = tmp_path / "killed"
        (killed / "media").mkdir(parents=True)
        (killed / "media" / "1.png").write_bytes(b"half")
        (killed / ".memory.jsonl.tmp").write_text('{"id": 1}\n')
        assert mem.export(killed).is_file() and not (killed / ".memory.jsonl.tmp").exists()
        mine = tmp_path / "mine"
        (mine / "media").mkdir(parents=True)
        (mine / "media" / "holiday.png").write_bytes(b"mine")
        with pytest.raises(UserError, match="not empty"):
            mem.export(mine)
        assert (mine / "media" / "holiday.png").read_bytes() == b"mine"


def test_a_failed_export_is_one_line_and_leaves_the_folders_as_they_were(db, model, tmp_path, monkeypatch):
    """A full disk was a raw OSError that left the folders the export made (new/deeper/media);
    a path under a file was a NotADirectoryError."""
    from mmembed.memory import export

    def full_disk(item, folder):
        raise OSError(28, "No space left on device")

    where = tmp_path / "exports"
    (where / "empty").mkdir(parents=True)
    (where / "notes.txt").write_text("x")
    with Memory(db, model=model) as mem:
        fill(mem)
        with pytest.raises(UserError, match="notes.txt is a file, not a folder$"):
            mem.export(where / "notes.txt" / "sub", user="ada")
        monkeypatch.setattr(export, "_row", full_disk)
        for target in (where / "new" / "deeper", where / "empty"):
            with pytest.raises(UserError, match=f"^cannot export to {re.escape(str(target))}: No space left on device$"):
                mem.export(target, user="ada")
    assert sorted(p.name for p in where.iterdir()) == ["empty", "notes.txt"]
    assert list((where / "empty").iterdir()) == []  # a folder that was there stays, empty


def _child(mem: Memory, queue) -> None:
    torch.set_num_threads(1)
    try:
        parent_conn = mem._store._conn
        own = mem._store.conn
        new = mem.add("ada", "written by the child")
        hits = mem.search("ada", "written by the child", k=10)
        queue.put(("ok", own is not parent_conn, new, [h.id for h in hits], mem.count("ada")))
    except BaseException as e:  # noqa: BLE001 - report anything to the parent
        queue.put(("error", repr(e)))


def test_a_forked_child_opens_its_own_connection(db, model):
    mem = Memory(db, model=model)
    first = mem.add("ada", "written by the parent")
    assert [h.id for h in mem.search("ada", "parent", k=10)] == [first]  # connection and cache in use
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_child, args=(mem, queue))
    child.start()
    child.join(60)
    if child.is_alive():
        child.kill()
        pytest.fail("the forked child hung")
    result = queue.get(timeout=5)
    assert result[0] == "ok", result
    _, new_connection, new, seen, count = result
    assert new_connection and seen[0] == new and set(seen) == {first, new} and count == 2
    assert {h.id for h in mem.search("ada", "child", k=10)} == {first, new}  # the parent sees the child's write
    assert mem.add("ada", "parent again") == new + 1 and mem.integrity_check() == "ok"
    mem.close()


def _writing_child(mem: Memory, go, queue) -> None:
    torch.set_num_threads(1)
    try:
        first = mem.add("ada", "written by the child before the parent closes")
        queue.put(first)
        go.wait(30)  # the parent has closed its Memory
        queue.put([mem.add("ada", f"written by the child afterwards {i}") for i in range(3)])
    except BaseException as e:  # noqa: BLE001 - report anything to the parent
        queue.put(repr(e))


def test_a_forked_childs_writes_survive_the_parent_closing_the_file(db, model):
    """SQLite's per-process lock table crossed fork() with the open connection: the child's own
    connection took no locks, the parent's close deleted the WAL as the file's last user, and the
    child's next acknowledged items went to a deleted file (a fresh open counted 2 of 5)."""
    mem = Memory(db, model=model)
    mem.add("ada", "written by the parent")
    ctx = multiprocessing.get_context("fork")
    go, queue = ctx.Event(), ctx.Queue()
    child = ctx.Process(target=_writing_child, args=(mem, go, queue))
    child.start()
    assert isinstance(queue.get(timeout=60), int)
    mem.close()
    go.set()
    later = queue.get(timeout=60)
    child.join(60)
    assert isinstance(later, list) and len(later) == 3, later
    with Memory(db) as fresh:
        assert fresh.count("ada") == 5 and fresh.integrity_check() == "ok"


def test_writers_on_separate_connections_queue_instead_of_failing(db, model):
    """Two connections writing at once contend for SQLite's write lock: BEGIN IMMEDIATE plus the
    busy timeout make the second wait (sqlite releases the GIL, so the threads truly overlap)."""
    import threading

    errors: list[BaseException] = []
    ids: list[int] = []

    def write(name: str) -> None:
        try:
            with Memory(db, model=model) as mem:
                for i in range(40):
                    ids.extend(mem.add_many("ada", [f"{name} {i} {j}" for j in range(4)]))
                    mem.search("ada", torch.ones(32), k=3)
        except BaseException as e:  # noqa: BLE001 - collected and asserted below
            errors.append(e)

    Memory(db, model=model).close()
    threads = [threading.Thread(target=write, args=(f"writer{t}",)) for t in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    with Memory(db) as mem:
        assert sorted(ids) == list(range(1, 481)) and mem.count("ada") == 480


def test_bench_memory_runs_at_a_tiny_size():
    from benchmarks.bench_memory import run

    report = run(sizes=(300,))
    insert, query = report["results"]
    assert insert["id"] == "B-memory insert N=300" and insert["unit"] == "items/s" and insert["ratio"] > 0
    assert query["id"] == "B-memory query N=300 k=10" and query["backend"] == "exact"
    assert {"first_query_ms", "filtered_query_ms", "query_after_other_write_ms", "meets_goal"} <= set(query)


def test_a_memory_file_in_a_folder_it_cannot_write_to_says_so(db, model, monkeypatch):
    """SQLite needs -wal and -shm beside the file even to read it; it said "attempt to write a
    readonly database" about a writable file in a read-only folder."""
    from mmembed.memory import store as store_module

    with Memory(db, model=model) as mem:
        mem.add("ada", "a red star")
    monkeypatch.setattr(store_module.os, "access", lambda path, mode: False)
    with pytest.raises(MemoryFileError, match="is not writable, and a memory file needs its -wal and -shm"):
        Memory(db)


def test_a_memory_opened_by_a_relative_path_stays_with_its_file_when_the_process_moves(tmp_path, model,
                                                                                          other_model, monkeypatch):
    """Every new connection (after close() or a fork) opened the relative path in the process's new folder:
    the other model's file there took this model's vectors (a 128-wide row in a 32-wide file)."""
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    monkeypatch.chdir(tmp_path / "b")
    Memory("memory.db", model=other_model).close()
    monkeypatch.chdir(tmp_path / "a")
    mem = Memory("memory.db", model=model)
    first = mem.add("ada", "first, in a")
    monkeypatch.chdir(tmp_path / "b")
    mem.close()  # as a fork does
    second = mem.add("ada", "second")
    assert [h.id for h in mem.recent("ada")] == [first, second]
    mem.close()
    with Memory(tmp_path / "b" / "memory.db") as there:
        assert there.count("ada") == 0


def test_a_file_replaced_by_another_models_between_connections_is_refused(tmp_path, model, other_model):
    """A reconnect checked only the table names: vectors of one model were written into another's file."""
    path = tmp_path / "memory.db"
    mem = Memory(path, model=model)
    mem.add("ada", "one")
    mem.close()
    for suffix in ("", "-wal", "-shm"):
        (tmp_path / f"memory.db{suffix}").unlink(missing_ok=True)
    Memory(path, model=other_model).close()
    with pytest.raises(MemoryFileError, match=f"was written by model {other_model.fingerprint}"):
        mem.add("ada", "two")


@pytest.mark.parametrize("meta", ["key TEXT PRIMARY KEY, value TEXT", "a, b"])
def test_another_programs_meta_and_items_tables_are_refused_and_left_as_they_were(db, model, meta):
    """A database of another program with tables named meta and items was switched to WAL mode, then
    said 'memory schema version None' (or 'no such column: key')."""
    with sqlite3.connect(db) as conn:
        conn.execute(f"CREATE TABLE meta ({meta})")
        conn.execute("CREATE TABLE items (id INTEGER PRIMARY KEY, body TEXT)")
    before = db.read_bytes()
    with pytest.raises(MemoryFileError, match=r"is an SQLite database but not an mmembed memory file$"):
        Memory(db, model=model)
    assert db.read_bytes() == before
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    conn.close()


@pytest.mark.parametrize("column", ["text", "session", "media_path"])
def test_a_row_whose_text_columns_hold_bytes_is_a_corrupt_file_in_one_line(db, model, column, tmp_path):
    """A text column holding a BLOB (a damaged file) reached export as a TypeError, /history as a
    traceback, and a Session's prompt as the user's own bad segment."""
    with Memory(db, model=model) as mem:
        mem.add("ada", "a note", session="s", turn=1)
    with sqlite3.connect(db) as conn:
        conn.execute(f"UPDATE items SET {column} = x'ff00'")
    with Memory(db) as mem:
        for read in (lambda: mem.recent("ada"), lambda: mem.export(tmp_path / "out", user="ada")):
            with pytest.raises(MemoryFileError, match=rf"is corrupt \(item 1: its {column} is bytes, not text\)"):
                read()


def test_a_memory_file_reached_through_a_link_is_judged_by_the_folder_it_leads_to(model, tmp_path, monkeypatch):
    """The link's own folder was checked: a link in a read-only folder to a writable file was refused
    with a false reason, and a link to a file in a read-only folder got SQLite's vague error."""
    from mmembed.memory import store as store_module

    tmp_path = tmp_path.resolve()  # the folders as realpath names them
    for name in ("links", "files"):
        (tmp_path / name).mkdir()
    with Memory(tmp_path / "files" / "m.db", model=model) as mem:
        mem.add("ada", "a red star")
    (tmp_path / "links" / "m.db").symlink_to(tmp_path / "files" / "m.db")
    real_access = os.access  # root passes every os.access: the read-only folder is simulated

    def read_only(folder):
        return lambda path, mode: Path(path) != folder and real_access(path, mode)

    monkeypatch.setattr(store_module.os, "access", read_only(tmp_path / "links"))
    with Memory(tmp_path / "links" / "m.db") as mem:  # was "its folder links is not writable"
        assert [h.text for h in mem.recent("ada")] == ["a red star"]
    monkeypatch.setattr(store_module.os, "access", read_only(tmp_path / "files"))
    with pytest.raises(MemoryFileError, match=rf"m\.db: its folder {re.escape(str(tmp_path / 'files'))} is not "):
        Memory(tmp_path / "links" / "m.db")


def test_a_link_to_a_missing_folder_says_it_does_not_exist(model, tmp_path):
    """It said "its folder ... is not writable"."""
    (tmp_path / "m.db").symlink_to(tmp_path / "nowhere" / "m.db")
    with pytest.raises(MemoryFileError, match=rf"its folder {re.escape(str(tmp_path.resolve() / 'nowhere'))} does "
                                              r"not exist \(where its link leads\)$"):
        Memory(tmp_path / "m.db", model=model)


def test_ids_are_right_when_the_id_counter_row_is_gone(db, model):
    """A file whose sqlite_sequence row was deleted (it passes PRAGMA integrity_check, and SQLite
    numbers new rows after the largest id) failed an assert with a traceback on every add."""
    with Memory(db, model=model) as mem:
        first = mem.add_many("ada", ["one", "two", "three"])
    with sqlite3.connect(db) as conn:
        conn.execute("DELETE FROM sqlite_sequence")
    conn.close()
    with Memory(db, model=model) as mem:
        ids = mem.add_many("ada", ["four", "five"])
        assert ids == [first[-1] + 1, first[-1] + 2]
        assert [h.text for h in mem.get(ids, user="ada")] == ["four", "five"]


def test_unreadable_meta_rows_are_a_corrupt_file_not_a_foreign_one(db, model):
    """Damaged pages of the meta table read back as NULL or undecodable rows: the file was called "an SQLite
    database but not an mmembed memory file", though its items were all there."""
    with Memory(db, model=model) as mem:
        mem.add("ada", "a red star")
    saved = db.read_bytes()
    for garbled in ("zeroblob(rowid)", "x'ff' || rowid"):  # bytes where text was; text that is not UTF-8
        db.write_bytes(saved)
        with sqlite3.connect(db) as conn:
            conn.execute(f"UPDATE meta SET key = {garbled}")
        conn.close()
        with pytest.raises(MemoryFileError, match=r"is corrupt \(its meta table holds unreadable rows\); restore"):
            Memory(db, model=model)
