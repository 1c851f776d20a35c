"""Session: turns stored, recalled across processes as the same vectors, scoped by user, fitted to the context."""

from __future__ import annotations

import copy
import io
import subprocess
import sys
import textwrap
import unicodedata

import pytest
import torch

import mmembed as mm
from mmembed.cli import main
from mmembed.config_decoder import DecoderConfig
from mmembed.decoder import Embedded, build_prompt_model
from mmembed.errors import UserError
from mmembed.decoder.prompt import parse_inline
from mmembed.memory.chat import run_chat
from tests.conftest import tiny_model
from tests.memory.conftest import picture, sound


def with_decoder(model, context: int = 96, **overrides):
    torch.manual_seed(0)
    cfg = DecoderConfig(width=32, layers=2, heads=4, context=context, dropout=0.0, soft_tokens=2, **overrides)
    model.config.decoder = cfg
    model.prompt_model = build_prompt_model(cfg, model.tokenizer, model.embed_dim)
    model.prompt_model.lm.eval()
    return model


@pytest.fixture(scope="module")
def chat_model():
    return with_decoder(tiny_model(0))


def capture(model, monkeypatch):
    """Record the prompts the session hands to `generate`."""
    seen = []
    real = model.generate

    def spy(prompt, **kw):
        seen.append(prompt)
        return real(prompt, **kw)

    monkeypatch.setattr(model, "generate", spy)
    return seen


def test_a_turn_and_its_answer_are_stored_in_order(chat_model, db):
    with mm.Session(chat_model, memory=db, user="ada") as chat:
        out = chat.ask(["Remember this picture.", mm.Image(picture(0))], max_new_tokens=4)
        items = chat.history()
    assert [(h.turn, h.role, str(h.modality)) for h in items][:2] == [(1, "user", "text"), (1, "user", "image")]
    if out.text.strip():
        assert items[-1].role == "assistant" and items[-1].text == out.text
    assert out.recalled == []  # nothing older to recall


def test_a_memory_comes_back_as_the_vector_the_tower_gave(chat_model, db):
    """The injected soft tokens are the item's own: answering from memory equals answering with the item."""
    img = picture(1)
    with mm.Memory(db, model=chat_model) as mem:
        item = mem.add("ada", mm.Image(img))
        stored = mem.vectors([item], user="ada")[0]
    direct = chat_model.embed("image", [img])[0]
    assert torch.allclose(stored, direct, atol=1e-6)
    a = chat_model.generate([Embedded(stored, "image"), "What colour is it?"], max_new_tokens=6)
    b = chat_model.generate([mm.Image(img), "What colour is it?"], max_new_tokens=6)
    assert a.token_ids == b.token_ids


def test_a_new_process_continues_the_conversation(chat_model, db, tmp_path, monkeypatch):
    run = tmp_path / "run"
    chat_model.save(run)
    script = textwrap.dedent(f"""
        import mmembed as mm
        from tests.memory.conftest import picture
        model = mm.load({str(run)!r})
        with mm.Session(model, memory={str(db)!r}, user="ada") as chat:
            chat.ask(["Remember this.", mm.Image(picture(2))], max_new_tokens=3)
            print(chat.session)
    """)
    first = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    model = mm.load(run)
    seen = capture(model, monkeypatch)
    with mm.Session(model, memory=db, user="ada") as chat:
        assert chat.session == first.stdout.strip().splitlines()[-1]
        chat.ask("What colour was it?", max_new_tokens=3)
        assert chat.turn == 2
    image = model.embed("image", [picture(2)])[0]
    shown = [s for s in seen[0] if isinstance(s, Embedded)]
    assert len(shown) == 1 and torch.allclose(shown[0].vector.cpu(), image, atol=1e-6)
    assert seen[0][-1] == "What colour was it?"


def test_the_latest_session_is_the_one_used_last_not_the_one_begun_last(chat_model, db):
    with mm.Memory(db, model=chat_model) as mem:
        mem.add("ada", "first words", session="monday", time=1_000.0)
        mem.add("ada", "other words", session="tuesday", time=2_000.0)
        mem.add("ada", "back to monday", session="monday", time=3_000.0)
        assert mem.sessions("ada") == ["tuesday", "monday"]
    with mm.Session(chat_model, memory=db, user="ada") as chat:
        assert chat.session == "monday" and chat.turn == 0
    # `chat --new --session monday` continued monday, its old turns fed to the decoder
    with pytest.raises(UserError, match="session 'monday' of 'ada' already exists"):
        mm.Session(chat_model, memory=db, user="ada", session="monday", new=True)
    with mm.Session(chat_model, memory=db, user="ada", session="wednesday", new=True) as chat:
        assert chat.session == "wednesday" and chat.turn == 0


def test_recall_finds_older_sessions_and_never_another_users(chat_model, db, monkeypatch):
    with mm.Memory(db, model=chat_model) as mem:
        mem.add("ada", mm.Audio(sound(3)), session="old")
        mem.add("bob", mm.Audio(sound(3)), session="old")  # the same sound, another user
    seen = capture(chat_model, monkeypatch)
    with mm.Session(chat_model, memory=db, user="ada", new=True, recall_threshold=0.99) as chat:
        out = chat.ask(["Have you heard", mm.Audio(sound(3)), "before?"], max_new_tokens=3)
    assert [(h.user, h.session) for h in out.recalled] == [("ada", "old")]
    assert out.recalled[0].score == pytest.approx(1.0, abs=1e-5)
    assert sum(isinstance(s, Embedded) for s in seen[0]) == 2  # the recalled sound, then this turn's


def test_below_the_threshold_nothing_is_recalled(chat_model, db):
    with mm.Memory(db, model=chat_model) as mem:
        mem.add("ada", mm.Image(picture(4)), session="old")
    with mm.Session(chat_model, memory=db, user="ada", new=True, recall_threshold=1.01) as chat:
        assert chat.ask("anything?", max_new_tokens=2).recalled == []


def test_the_prompt_is_cut_to_the_context_oldest_turn_first(db, monkeypatch):
    model = with_decoder(tiny_model(0), context=24)  # soft_tokens 2: an item takes 4 ids, 20 fit
    seen = capture(model, monkeypatch)
    with mm.Session(model, memory=db, user="ada", history_turns=8, recall_k=0) as chat:
        for seed in range(6):
            chat.ask([mm.Image(picture(10 + seed))], max_new_tokens=4)
    fmt = model.prompt_model.fmt
    for prompt in seen:
        n = 2 + sum(fmt.soft_tokens + 2 if isinstance(s, Embedded) else len(fmt.tokenizer.encode(s)) for s in prompt)
        assert n <= 40 - 4
    last = [s for s in seen[-1] if isinstance(s, Embedded)]
    newest = model.embed("image", [picture(15)])[0]
    assert torch.allclose(last[-1].vector.cpu(), newest, atol=1e-6)  # this turn's item always stays
    assert len(last) < 6  # older turns were dropped to fit


def test_a_run_without_decoder_is_refused(db):
    with pytest.raises(UserError, match="decoder"):
        mm.Session(tiny_model(0), memory=db, user="ada")


def test_a_memory_opened_with_another_model_or_none_is_refused(chat_model, db):
    """The Session embeds turns and recalls through the Memory's model and hands those vectors to
    its own decoder: a Memory of another model was taken without a word (a path was checked)."""
    other = tiny_model(1)
    assert other.fingerprint != chat_model.fingerprint
    with mm.Memory(db, model=other) as foreign:
        foreign.add("ada", "a red star")
        with pytest.raises(UserError, match=f"opened with model {other.fingerprint} but this Session's model is "
                                            f"{chat_model.fingerprint}"):
            mm.Session(chat_model, memory=foreign, user="ada")
    with mm.Memory(db) as bare, pytest.raises(UserError, match="opened without a model"):
        mm.Session(chat_model, memory=bare, user="ada")
    with mm.Memory(db.with_name("own.db"), model=chat_model) as own:  # its own model's memory: fine
        assert mm.Session(chat_model, memory=own, user="ada").memory is own


def test_a_bad_user_or_setting_leaves_no_file_and_names_ask(chat_model, db):
    """A mistyped --user created (and claimed) the memory file before it was refused; a typo in a
    setting blamed check_generation(), a function no document names."""
    for user in ("", None, "\ud800"):
        with pytest.raises(UserError, match="user"):
            mm.Session(chat_model, memory=db, user=user)
    with pytest.raises(UserError, match="session"):
        mm.Session(chat_model, memory=db, user="ada", session=7)
    assert not db.exists()
    with mm.Session(chat_model, memory=db, user="ada") as chat:
        with pytest.raises(TypeError, match=r"^ask\(\) got an unexpected keyword argument 'temprature'$"):
            chat.ask("hello", temprature=0.7)
        assert chat.history() == []


def test_session_settings_take_numpy_numbers(chat_model, db):
    """np.int64(2) recall_k was "must be an integer >= 0" where Memory's own arguments took it."""
    import numpy as np

    with mm.Session(chat_model, memory=db, user="ada", history_turns=np.int64(2), recall_k=np.int32(1),
                    recall_threshold=np.float32(0.5)) as chat:
        assert (chat.history_turns, chat.recall_k) == (2, 1) and type(chat.recall_k) is int
    with pytest.raises(UserError, match="recall_k must be an integer >= 0"):
        mm.Session(chat_model, memory=db, user="ada", recall_k=np.bool_(True))


def test_chat_loop_answers_and_keeps_going_after_a_bad_line(chat_model, db, tmp_path):
    out = io.StringIO()
    lines = ["hello", f"look at <image:{tmp_path / 'missing.png'}>", "/hist", "//slash", "/history", "/quit",
             "never read"]
    with mm.Session(chat_model, memory=db, user="ada") as chat:
        tally = run_chat(chat, lines, out, max_new_tokens=3)
    text = out.getvalue()
    assert tally == (2, 2)  # "hello" and "//slash" answered; the missing file and "/hist" refused
    assert "error: prompt names a missing image file" in text
    assert "unknown command /hist (commands: /history, /forget, /quit;" in text
    assert '#1 user text "hello"' in text and 'user text "/slash"' in text and '"/hist"' not in text
    # a byte-order mark before the first command sent "\ufeff/history" as a message (stored); a known
    # command with an argument was "unknown"
    out = io.StringIO()
    with mm.Session(chat_model, memory=db, user="bob") as chat:
        assert run_chat(chat, ["\ufeff/history", "/history 5", "/quit now", "/quit", "never read"], out) == (0, 2)
        assert chat.memory.count("bob") == 0
    assert "/history takes no arguments" in out.getvalue() and "/quit takes no arguments" in out.getvalue()
    with mm.Session(chat_model, memory=db, user="bob", recall_threshold=10**400) as chat:  # was an OverflowError
        assert chat.ask("hi", max_new_tokens=1).recalled == []


def test_a_live_answer_is_one_escaped_line_as_history_shows_it(chat_model, db, monkeypatch):
    """A sampled answer holding ESC, CR, NUL or a newline was written raw: it could recolour or
    retitle the terminal, and broke a script reading one line per answer (/history escaped it)."""
    from mmembed.decoder import Generation

    raw = "red\x1b]0;owned\x07\nfake line\r\x00 \u202eevil"
    out = io.StringIO()
    with mm.Session(chat_model, memory=db, user="ada") as chat:
        monkeypatch.setattr(chat, "ask", lambda prompt, **kw: Generation(raw))
        run_chat(chat, ["hi"], out, prompt="", err=io.StringIO())
    escaped = "red\\x1b]0;owned\\x07\\nfake line\\r\\x00 \\u202eevil"
    assert out.getvalue() == escaped + "\n" + "\n"  # the answer's line, then the newline ending the chat


def test_an_empty_session_name_is_refused(chat_model, db, capsys, tmp_path):
    """`--session "$S"` with S unset began a conversation named "" (an empty user was refused)."""
    with pytest.raises(UserError, match="session must be a non-empty name"):
        mm.Session(chat_model, memory=db, user="ada", session="")
    assert not db.exists()


def test_chat_cli(chat_model, db, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    chat_model.save(run)
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi there\n/forget\n"))
    assert main(["chat", str(run), "--memory", str(db), "--user", "ada", "--max-new-tokens", "3"]) == 0
    assert "forgot" in capsys.readouterr().out
    with mm.Memory(db) as mem:
        assert mem.count("ada") == 0
    # answers on stdout, the help line and a refused turn's error on stderr: a scripted chat wrote
    # them all to stdout
    # a scripted chat with a refused line exits 1, saying so last (it exited 0: a script could not tell)
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"look at <image:{tmp_path / 'missing.png'}>\nhello\n"))
    assert main(["chat", str(run), "--memory", str(db), "--user", "ada", "--max-new-tokens", "3"]) == 1
    captured = capsys.readouterr()
    assert "error: prompt names a missing image file" in captured.err and "commands:" in captured.err
    assert captured.err.strip().splitlines()[-1] == "mmembed: 1 line(s) refused, 1 answered"
    assert "error" not in captured.out and "commands:" not in captured.out and captured.out.strip()


@pytest.mark.parametrize("settings, message", [({"temperature": -1.0}, "temperature must be"),
                                               ({"best_of": 2}, "give a temperature > 0"),
                                               ({"max_new_tokens": 0}, "max_new_tokens must be")])
def test_a_refused_setting_stores_nothing_of_the_turn(chat_model, db, settings, message):
    with mm.Session(chat_model, memory=db, user="ada") as chat:
        with pytest.raises(ValueError, match=message):
            chat.ask("my cat is red", **settings)
        assert chat.turn == 0 and chat.memory.count("ada") == 0


@pytest.mark.parametrize("stream", ["stdin", "stdout"])
def test_chat_cli_with_a_closed_stream_is_one_line(chat_model, db, tmp_path, monkeypatch, capsys, stream):
    """`<&-` or `>&-` (Python sets the stream to None) was an AttributeError traceback."""
    run = tmp_path / "run"
    chat_model.save(run)
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n"))
    monkeypatch.setattr(sys, stream, None)
    assert main(["chat", str(run), "--memory", str(db), "--user", "ada"]) == 2
    name = "input" if stream == "stdin" else "output"
    assert capsys.readouterr().err.startswith(f"mmembed: error: standard {name} is closed")
    assert not db.exists()


def test_chat_cli_refuses_a_bad_setting_in_one_line(chat_model, db, tmp_path, capsys):
    run = tmp_path / "run"
    chat_model.save(run)
    assert main(["chat", str(run), "--memory", str(db), "--user", "ada", "--temperature", "-1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mmembed: error: temperature must be") and "\n" not in err


def test_a_conversation_is_laid_out_as_the_memory_dialogues_the_decoder_trains_on(chat_model, db, monkeypatch):
    """Session prompt: recalled items bare, then each earlier turn's words, items and answer, then the
    question — the layout of the synthetic world's `recall` rows (data/synth/dialogues.py), with a
    scene shown (words, item, answer) or told in words (words, answer)."""
    import re

    import numpy as np

    from mmembed.data.synth import dialogues
    from mmembed.data.synth.world import sample_world
    from mmembed.decoder import Generation

    seen = []
    monkeypatch.setattr(chat_model, "generate", lambda prompt, **kw: seen.append(prompt) or Generation("a red star"))
    with mm.Session(chat_model, memory=db, user="ada") as chat:
        chat.ask(["Remember this picture.", mm.Image(picture(20))])
        chat.ask("What colour was the star?")
    with mm.Session(chat_model, memory=db, user="bob") as chat:
        chat.ask("Remember this: a red star on the left.")
        chat.ask("What colour was the star?")
    kinds = [["media" if isinstance(s, Embedded) else s for s in prompt] for prompt in seen]
    assert kinds[1] == ["Remember this picture.", "media", "a red star", "What colour was the star?"]
    assert kinds[3] == ["Remember this: a red star on the left.", "a red star", "What colour was the star?"]

    scenes = sample_world(0, 40, 0, (0.8, 0.1, 0.1), [])
    media = [{"image": f"{s.id}.png", "audio": f"{s.id}.wav"} for s in scenes]
    layouts = set()
    monkeypatch.setattr(dialogues, "P_TOLD", 0.0)  # every scene shown
    for i in range(40):
        item = dialogues.recall_item(scenes, media, i, np.random.default_rng(i))
        if item is not None:
            kinds = tuple("media" if isinstance(s, dict) else "text" for s in item[0])
            bare = kinds.index("text")
            assert all(x == "media" for x in kinds[:bare])  # recalled items first, bare
            assert kinds[bare:-1] == ("text", "media", "text") * ((len(kinds) - bare - 1) // 3)  # turns
            layouts.add(kinds)
    assert ("text", "media", "text", "text") in layouts  # the first conversation above
    monkeypatch.setattr(dialogues, "P_TOLD", 1.0)  # every scene told: recalled, its words; a turn, words and answer
    heads = tuple(t.split("{caption}")[0] for t in dialogues.TELL)
    for i in range(40):
        item = dialogues.recall_item(scenes, media, i, np.random.default_rng(i))
        if item is not None:
            told = "".join("T" if s.startswith(heads) else "A" for s in item[0][:-1])
            assert all(isinstance(s, str) for s in item[0]) and re.fullmatch("T*(TA)*", told), item[0]
            layouts.add(told)
    assert "TA" in layouts  # the second conversation above


def test_a_turn_with_an_unreadable_item_stores_nothing(chat_model, db, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a picture")
    with mm.Session(chat_model, memory=db, user="ada") as chat:
        chat.ask("hello", max_new_tokens=2)
        before = chat.memory.count("ada")
        with pytest.raises(UserError, match="^prompt segment 1 \\(image\\): .*bad.png: not a readable image"):
            chat.ask(["look at this", mm.Image(bad)], max_new_tokens=2)
        # named by its place in the prompt as given, as `generate` names it (a blank segment is not stored);
        # a missing file was "missing file nope.png", naming no segment
        with pytest.raises(UserError, match=r"^prompt segment 2 \(image\): missing file .*nope.png$"):
            chat.ask(["look", " ", mm.Image(tmp_path / "nope.png")], max_new_tokens=2)
        assert chat.memory.count("ada") == before and chat.turn == 1
        chat.ask("still here?", max_new_tokens=2)
        assert [h.turn for h in chat.history() if h.role == "user"] == [1, 2]


def test_with_a_query_tower_the_turns_words_search_as_a_question(db):
    """Words go through the query tower and its threshold; media items search by their own vectors."""
    model = with_decoder(tiny_model(0))
    tower = copy.deepcopy(model.space.towers["text"])
    with torch.no_grad():
        for p in tower.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.query_tower, model.query_threshold = tower.eval(), -1.0  # every memory passes the tower's threshold
    with mm.Memory(db, model=model) as mem:
        mem.add("ada", mm.Image(picture(4)), session="old")
    words = "What colour was the star?"
    with mm.Session(model, memory=db, user="ada", new=True, recall_threshold=1.01) as chat:
        searched = []
        real = chat.memory.search
        chat.memory.search = lambda user, query, **kw: searched.append(query) or real(user, query, **kw)
        out = chat.ask([words, mm.Image(picture(5))], max_new_tokens=2)
    assert torch.allclose(searched[0].cpu(), model.embed_query([words])[0], atol=1e-6)
    assert not torch.allclose(searched[0].cpu(), model.embed("text", [words])[0], atol=1e-3)
    assert torch.allclose(searched[1].cpu(), model.embed("image", [picture(5)])[0], atol=1e-6)
    # the picture's own search is held to recall_threshold (1.01: nothing); the question's found the old picture
    assert [(h.session, str(h.modality)) for h in out.recalled] == [("old", "image")]


def test_a_memory_in_a_turn_the_context_drops_is_recalled(chat_model, db, monkeypatch):
    """Recall used to leave out every item of the last `history_turns` turns, and the context then
    dropped the oldest of them: the best match (score 1.0) reached the decoder neither way."""
    seen = capture(chat_model, monkeypatch)
    words = "a large red circle on the left " * 6  # ~40 ids a turn: three such turns outgrow the context
    with mm.Session(chat_model, memory=db, user="ada", history_turns=3) as chat:
        first = chat.ask([mm.Image(picture(3))], max_new_tokens=2)
        chat.ask(words, max_new_tokens=2)
        chat.ask(words, max_new_tokens=2)
        again = chat.ask(["Have you seen this before?", mm.Image(picture(3))], max_new_tokens=2)
        shown_first = chat.history(limit=100)[0]
    assert first.recalled == [] and shown_first.turn == 1 and str(shown_first.modality) == "image"
    assert again.recalled and again.recalled[0].id == shown_first.id and again.recalled[0].score > 0.99
    vectors = [s.vector for s in seen[-1] if isinstance(s, Embedded)]
    assert len(vectors) == 2 and torch.allclose(vectors[0], vectors[1])  # the memory, then this turn's picture


def test_words_said_in_every_turn_do_not_crowd_the_picture_out_of_recall(chat_model, db):
    """"Remember this picture." said in five turns tied at 1.00 with the picture shown again and took
    every place recalled (the reviewer's chat: picture 0, 1, 2, 1, 2, then 0 again recalled three
    copies of the words and neither the picture nor its description)."""
    words = "Remember this picture."
    with mm.Session(chat_model, memory=db, user="ada", history_turns=3, recall_k=3) as chat:
        for i in (0, 1, 2, 1, 2):
            chat.ask([words, mm.Image(picture(i))], max_new_tokens=2)
        again = chat.ask([words, mm.Image(picture(0))], max_new_tokens=2)
        first_picture = chat.history(limit=100)[1]
    assert first_picture.turn == 1 and str(first_picture.modality) == "image"
    recalled = [(h.role, str(h.modality), h.text) for h in again.recalled]
    assert first_picture.id in {h.id for h in again.recalled}, recalled
    texts = [h.text for h in again.recalled if str(h.modality) == "text"]
    assert len(texts) == len(set(texts)), recalled  # each text once


def test_a_memory_in_the_history_shown_is_not_recalled_twice(chat_model, db, monkeypatch):
    seen = capture(chat_model, monkeypatch)
    with mm.Session(chat_model, memory=db, user="ada", history_turns=3) as chat:
        chat.ask([mm.Image(picture(4))], max_new_tokens=2)
        again = chat.ask([mm.Image(picture(4))], max_new_tokens=2)
    assert again.recalled == []  # turn 1 is in the history shown
    assert sum(isinstance(s, Embedded) for s in seen[-1]) == 2


def test_a_turn_refused_for_its_length_is_not_stored(chat_model, db):
    with mm.Session(chat_model, memory=db, user="ada") as chat:
        chat.ask("my bike is red", max_new_tokens=2)
        count, turn = chat.memory.count("ada"), chat.turn
        with pytest.raises(UserError, match="exceeds the decoder.s context"):
            chat.ask("word " * 200, max_new_tokens=2)
        assert chat.memory.count("ada") == count and chat.turn == turn  # the turn did not happen
        chat.ask("and my car?", max_new_tokens=2)
        assert [h.turn for h in chat.history()][-2] == turn + 1


def test_a_continued_session_numbers_turns_after_its_highest(chat_model, db):
    """An item added to the session without a turn (mm.Memory.add(..., session=S)) used to restart the count at 1."""
    with mm.Session(chat_model, memory=db, user="ada", session="s1") as chat:
        for _ in range(3):
            chat.ask("my bike is red", max_new_tokens=2)
    with mm.Memory(db, model=chat_model) as mem:
        mem.add("ada", "a note filed into the conversation", session="s1")
    with mm.Session(chat_model, memory=db, user="ada") as chat:
        assert chat.session == "s1" and chat.turn == 3
        chat.ask("hello again", max_new_tokens=2)
        assert max(h.turn or 0 for h in chat.history()) == 4


def test_a_long_answer_limit_leaves_room_for_the_memories(chat_model, db, monkeypatch):
    """`max_new_tokens` as long as the context used to reserve all of it: every earlier turn was dropped."""
    seen = capture(chat_model, monkeypatch)
    with mm.Session(chat_model, memory=db, user="ada") as chat:
        chat.ask(mm.Image(picture(5)), max_new_tokens=2)
        chat.ask("What colour?", max_new_tokens=96)
    assert any(isinstance(s, Embedded) for s in seen[-1])  # turn 1's picture is still shown


def test_one_media_item_is_a_turn(chat_model, db):
    with mm.Session(chat_model, memory=db, user="ada") as chat:
        chat.ask(mm.Image(picture(6)), max_new_tokens=2)  # was TypeError: 'Image' object is not iterable
        assert str(chat.history()[0].modality) == "image"


@pytest.mark.parametrize("settings", [{"recall_k": 2.5}, {"history_turns": -1}, {"recall_threshold": None},
                                      {"recall_threshold": float("nan")}])
def test_session_settings_are_checked_before_any_turn(chat_model, db, settings):
    with pytest.raises(UserError, match=next(iter(settings))):
        mm.Session(chat_model, memory=db, user="ada", **settings)
    assert not db.exists()  # refused before the memory file was opened


def test_undecodable_text_is_one_clear_error_and_stores_nothing(chat_model, db):
    """A command-line argument's undecodable bytes (surrogateescape) used to reach SQLite: UnicodeEncodeError."""
    with mm.Memory(db, model=chat_model) as mem:
        for call in (lambda: mem.add("caf\udce9", "hello"), lambda: mem.add("ada", "hello", session="s\udcff"),
                     lambda: mem.add("ada", mm.Image(picture(7)), text="caf\udce9"),
                     lambda: mem.add("ada", "hello", meta={"a": "\udce9"}), lambda: mem.add("ada", "caf\udce9")):
            with pytest.raises(UserError, match="not valid UTF-8"):
                call()
        assert mem.count() == 0


def test_an_interrupted_turn_stores_nothing(chat_model, db, monkeypatch):
    """Ctrl-C during generation (KeyboardInterrupt is no Exception) left the turn stored without
    an answer, and the next turn showed it as history."""
    with mm.Session(chat_model, memory=db, user="ada") as chat:
        chat.ask("my bike is red", max_new_tokens=2)
        count, turn = chat.memory.count("ada"), chat.turn

        def interrupted(*args, **kwargs):
            raise KeyboardInterrupt

        monkeypatch.setattr(chat_model, "generate", interrupted)
        with pytest.raises(KeyboardInterrupt):
            chat.ask("a small blue circle on the right", max_new_tokens=2)
        assert chat.memory.count("ada") == count and chat.turn == turn
        monkeypatch.undo()
        # and while the answer is embedded, or as the turn is stored
        for name in ("prepare", "add_turn"):
            real = getattr(chat.memory, name)
            calls = []

            def interrupted_second(*args, _real=real, _calls=calls, **kwargs):
                _calls.append(1)
                if name == "add_turn" or len(_calls) == 2:  # prepare: the answer's, after the turn's
                    raise KeyboardInterrupt
                return _real(*args, **kwargs)

            monkeypatch.setattr(chat.memory, name, interrupted_second)
            with pytest.raises(KeyboardInterrupt):
                chat.ask("a small blue circle on the right", max_new_tokens=2)
            monkeypatch.undo()
            assert chat.memory.count("ada") == count and chat.turn == turn, name


def test_nothing_of_a_turn_is_in_the_file_until_it_is_answered(chat_model, db, monkeypatch):
    """A chat killed while it generated (SIGTERM, a closed terminal, SIGKILL: no Python exception
    to take the turn back) left the turn stored without its answer; the next process showed it as
    history. Another connection now sees nothing of the turn before the answer, then both at once."""
    real, seen = chat_model.generate, []

    def generate(*args, **kwargs):
        with mm.Memory(db) as other:  # what a process opening the file after a kill here would find
            seen.append(other.count("ada"))
        return real(*args, **kwargs)

    with mm.Session(chat_model, memory=db, user="ada") as chat:
        chat.ask("my bike is red", max_new_tokens=2)
        before = chat.memory.count("ada")
        monkeypatch.setattr(chat_model, "generate", generate)
        chat.ask(["a small blue circle", mm.Image(picture(8))], max_new_tokens=2)
        assert seen == [before]
        items = [h for h in chat.history() if h.turn == chat.turn]
        assert [h.role for h in items][:2] == ["user", "user"] and chat.memory.count("ada") == before + len(items)


def test_turns_asked_at_once_on_one_conversation_get_their_own_numbers(chat_model, db, monkeypatch):
    """Two processes asking at the same moment both took the highest turn + 1, read before either
    stored: every number was used twice. The number is now taken as the turn is stored."""
    real = chat_model.generate
    with mm.Session(chat_model, memory=db, user="ada", session="s") as first, \
            mm.Session(chat_model, memory=db, user="ada", session="s") as second:
        def generate(*args, **kwargs):  # the second asks (and stores) while the first is generating
            monkeypatch.setattr(chat_model, "generate", real)
            second.ask("a turn of the second", max_new_tokens=2)
            return real(*args, **kwargs)

        monkeypatch.setattr(chat_model, "generate", generate)
        first.ask("a turn of the first", max_new_tokens=2)
        turns = {h.text: h.turn for h in first.history() if h.role == "user"}
    assert turns == {"a turn of the second": 1, "a turn of the first": 2} and (first.turn, second.turn) == (2, 1)


def test_two_sessions_on_one_conversation_number_their_turns_apart(chat_model, db):
    """Two processes (here two Sessions) alternating turns each counted from where it opened:
    both stored turns 2 and 3, and history counted two exchanges as one."""
    with mm.Session(chat_model, memory=db, user="ada", session="s") as a, \
            mm.Session(chat_model, memory=db, user="ada", session="s") as b:
        for chat in (a, b, a, b):
            chat.ask("hello", max_new_tokens=2)
        turns = [h.turn for h in a.memory.recent("ada", "s", limit=100) if h.role == "user"]
    assert turns == [1, 2, 3, 4]


def test_history_follows_the_turns_not_the_clock(chat_model, db, monkeypatch):
    """With the clock stepped back after turn 2, the history came out as turns 3, 1, 2 (ordered by
    time), and the context dropped the newest turn first; a limit of 64 items capped it at 32 turns."""
    import mmembed.memory.memory as memory_module

    seen = capture(chat_model, monkeypatch)
    now = iter([1000.0, 1001.0, 1002.0, 1003.0, 400.0, 401.0, 402.0, 403.0])
    monkeypatch.setattr(memory_module._time, "time", lambda: next(now, 500.0))
    with mm.Session(chat_model, memory=db, user="ada", history_turns=8, recall_k=0) as chat:
        for words in ("turn one", "turn two", "turn three", "turn four"):
            chat.ask(words, max_new_tokens=1)
    asked = [s for s in seen[-1] if isinstance(s, str) and s.startswith("turn")]
    assert asked == ["turn one", "turn two", "turn three", "turn four"]
    with mm.Session(chat_model, memory=db, user="ada", history_turns=10**19) as chat:  # was "first must be an int"
        assert [h.text for h in chat.history() if h.role == "user"] == ["turn one", "turn two", "turn three",
                                                                         "turn four"]  # /history: by turn too
        chat.ask("turn five", max_new_tokens=1)


def test_history_lists_a_note_added_to_the_session(chat_model, db):
    """`/history` dropped a note added to the session without a turn."""
    with mm.Session(chat_model, memory=db, user="ada", session="s") as chat:
        chat.ask("a red star", max_new_tokens=1)
        chat.memory.add("ada", "a note filed into the conversation", session="s")
        assert "a note filed into the conversation" in [h.text for h in chat.history()]


def test_a_window_decoder_with_learned_positions_answers_every_turn_of_a_long_chat(db):
    """Such a decoder refuses to write past its context (it cannot slide), and the session assumed
    `generate` would cap a long answer: once the history grew, every turn failed."""
    model = with_decoder(tiny_model(0), window=32, positional="learned")
    with mm.Session(model, memory=db, user="ada") as chat:
        for _ in range(4):
            out = chat.ask("a large red circle on the left " * 2, max_new_tokens=64)
            assert 1 <= len(out.token_ids) <= 64
        assert chat.turn == 4


@pytest.mark.parametrize("prompt, named", [(b"hello", "bytes"), (None, "NoneType"), (5, "int"),
                                           ([b"hello"], "bytes")])
def test_a_turn_that_is_not_text_or_media_is_refused_by_name(chat_model, db, prompt, named):
    with mm.Session(chat_model, memory=db, user="ada") as chat, pytest.raises(UserError, match=f"got {named}$"):
        chat.ask(prompt, max_new_tokens=2)


def test_a_session_at_the_highest_turn_number_says_so(chat_model, db):
    with mm.Memory(db, model=chat_model) as mem:
        mem.add("bob", "x", session="s", turn=2**63 - 1)
    with mm.Session(chat_model, memory=db, user="bob", session="s") as chat:
        with pytest.raises(UserError, match="at turn 9223372036854775807, the highest a turn can be: start a new"):
            chat.ask("hello", max_new_tokens=2)
        assert chat.memory.count("bob") == 1


def test_the_items_of_one_recalled_turn_keep_the_order_they_were_stored_in(chat_model, db, monkeypatch):
    """A turn's rows share one time since they are stored in one transaction, and recalled items
    were sorted by time alone, so ties kept score order: an answer recalled by its own words came
    before the picture it describes."""
    from mmembed.decoder import Generation

    seen = []
    monkeypatch.setattr(chat_model, "generate", lambda prompt, **kw: seen.append(prompt) or Generation("a red star"))
    with mm.Session(chat_model, memory=db, user="ada") as chat:
        chat.ask(["Remember this picture.", mm.Image(picture(20))])
    with mm.Session(chat_model, memory=db, user="ada", new=True, history_turns=0, recall_threshold=-1.0,
                    recall_k=5) as chat:
        chat.ask("a red star")
    kinds = ["media" if isinstance(s, Embedded) else s for s in seen[-1]]
    assert kinds == ["Remember this picture.", "media", "a red star", "a red star"]


def test_chat_shows_stored_texts_escaped_and_the_whole_session(chat_model, db, tmp_path):
    """A stored text was printed raw (an escape code retitled the terminal, a newline forged a
    /history line) and /history showed only the session's last 50 items (turn 1 vanished)."""
    with mm.Session(chat_model, memory=db, user="eve") as chat:
        for i in range(30):
            chat.ask(f"turn {i}", max_new_tokens=1)
            if i == 0:  # the session is named at its first turn
                chat.memory.add("eve", 'a\x1b]0;PWNED\x07 "x"\n  #1 user text "PIN"', session=chat.session)
                chat.memory.add("eve", "prix\xa0: 5\u202f€ 東京\u3000タワー 👨\u200d👩\u200d👧 \u202eevil", session=chat.session)
        out = io.StringIO()
        run_chat(chat, ["/history"], out, prompt="")
    lines = out.getvalue().splitlines()
    assert lines[1].startswith('  #1 user text "turn 0"')
    assert lines[3] == r'  #3 user text "a\x1b]0;PWNED\x07 \"x\"\n  #1 user text \"PIN\""'
    assert lines[4] == '  #4 user text "prix\xa0: 5\u202f€ 東京\u3000タワー 👨\u200d👩\u200d👧 \\u202eevil"'  # text stays
    assert sum(line.startswith("  #") for line in lines) == 62  # two notes and 30 turns of two items
    missing = tmp_path / unicodedata.normalize("NFD", "ünï.png")
    picture(0).save(missing)
    typed = unicodedata.normalize("NFC", str(missing))
    with pytest.raises(UserError, match=r"missing image file: .*the same name in another Unicode normalisation; "
                                        r"rename the file or the path in the prompt to one form"):
        parse_inline(f"look at <image:{typed}>")


def test_a_sliding_decoder_gets_a_prompt_that_fits_its_context_with_the_memory_in_it(db, monkeypatch):
    """A decoder that slides (window, rotary) was sent every turn unfitted: the prompt outgrew the
    context it trained on, and the recalled memory at its start lay past the window's reach."""
    model = with_decoder(tiny_model(0), context=48, window=16)
    assert model.prompt_model.lm.decoder.slides
    seen = capture(model, monkeypatch)
    words = "a large red circle on the left " * 2
    with mm.Session(model, memory=db, user="ada", history_turns=3) as chat:
        chat.ask([mm.Image(picture(3))], max_new_tokens=2)
        for _ in range(3):
            chat.ask(words, max_new_tokens=2)
        again = chat.ask(["Have you seen this before?", mm.Image(picture(3))], max_new_tokens=2)
    fmt = model.prompt_model.fmt
    assert fmt.length(seen[-1]) <= 48 + 1 - 2  # room for the answer
    assert again.recalled and again.recalled[0].score > 0.99
    vectors = [s.vector for s in seen[-1] if isinstance(s, Embedded)]
    assert len(vectors) == 2 and torch.allclose(vectors[0], vectors[1])  # the memory, then this turn's picture
    assert sum(s == words.strip() for s in seen[-1]) < 3  # older turns were dropped to fit
