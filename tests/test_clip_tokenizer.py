"""CLIP tokenizer: huge captions with long whitespace runs, and the bound on a marker's context_length."""

import pytest

from mmembed.errors import CheckpointError, UserError

open_clip_tokenizer = pytest.importorskip("open_clip.tokenizer")

from mmembed.clip_tokenizer import ClipTokenizer  # noqa: E402


@pytest.fixture(scope="module")
def clip():
    return ClipTokenizer(), open_clip_tokenizer.SimpleTokenizer()


def test_words_after_a_long_whitespace_run_are_open_clips(clip):
    """The text was cut to 65,536 characters before cleaning: after 70,000 spaces "red star" was gone."""
    ours, ref = clip
    texts = ["a" + " " * 70_000 + "red star", " " * 70_000 + "red star",
             "\u00c3" + " " * 70_000 + "la mode", "x \u00c3\t" + " " * 70_000 + "la",
             "voil\u00c3\u00a0" + (" \t" * 700 + "\r\n") * 50 + "z &amp; y", "a!" + "\n " * 40_000 + "<b> c"]
    for text in texts:
        expected = ref([text], context_length=20)[0].tolist()
        expected = expected[:expected.index(ref.eot_token_id) + 1]
        assert ours.encode(text, add_bos=True, add_eos=True, max_length=20) == expected, repr(text[:12])
        assert ours.encode(text, max_length=3) == ref.encode(text)[:3], repr(text[:12])


def _cleaned_lengths(ours, monkeypatch) -> list[int]:
    """The length of every text the tokenizer cleans from now on (ftfy's time grows with it)."""
    seen, clean = [], ours._tok.clean_fn
    monkeypatch.setattr(ours._tok, "clean_fn", lambda t: seen.append(len(t)) or clean(t))
    return seen


def test_a_million_blank_characters_are_not_all_cleaned(clip, monkeypatch):
    """Cleaning is slow on many lines (ftfy fixes each on its own: 34 s for a million newlines), so
    a long whitespace run must shrink before cleaning, not grow the window."""
    ours, ref = clip
    seen = _cleaned_lengths(ours, monkeypatch)
    assert ours.encode("a" + "\n" * 1_000_000 + "red star", max_length=77) == ref.encode("a red star")
    assert max(seen) < 100


def test_a_markers_context_length_is_bounded(tmp_path):
    """context_length 10**12 loaded, then a padded batch raised a bare MemoryError."""
    from mmembed.clip_tokenizer import MAX_CONTEXT_LENGTH

    file = tmp_path / "tokenizer.json"
    file.write_text('{"kind": "clip", "context_length": 1000000000000}')
    with pytest.raises(CheckpointError, match=f"context_length must be an int in \\[2, {MAX_CONTEXT_LENGTH}\\]"):
        ClipTokenizer.load(file)
    with pytest.raises(UserError, match="context_length"):
        ClipTokenizer(context_length=MAX_CONTEXT_LENGTH + 1)
    file.write_text(f'{{"kind": "clip", "context_length": {MAX_CONTEXT_LENGTH}}}')
    ids, mask = ClipTokenizer.load(file).encode_batch(["hi"], padding="max_length")
    assert ids.shape == mask.shape == (1, MAX_CONTEXT_LENGTH)


def test_the_shrunk_prefix_equals_shrinking_the_whole_text_then_cutting():
    """Shrinking ran over the whole caption before the cut: a 40M-character caption of short runs
    took 6.4 s where the cut alone took 0.2 s. Reading only the prefix must give the same text."""
    import random

    from mmembed.clip_tokenizer import _BLANK_RUN, _shrink_run, _shrunk_prefix

    rng = random.Random(0)
    pieces = ["a", "bc", "Ã", "x" * 7, " ", "  ", " " * 5, " " * 11, "\n" * 3, " \t\r\n", "\n" * 6 + " ",
              "\u3000" * 7, "\u2028", "\xa0" * 6]
    for _ in range(2000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 30)))
        window = rng.randint(1, 60)
        prefix, end = _shrunk_prefix(text, window)
        shrunk = _BLANK_RUN.sub(lambda m: _shrink_run(m.group()), text)
        assert prefix == _BLANK_RUN.sub(lambda m: _shrink_run(m.group()), text[:end])
        assert shrunk.startswith(prefix) and len(prefix) >= min(window, len(shrunk))


def test_shrinking_blank_runs_keeps_open_clips_cleaning(clip):
    """Shrinking runs of Unicode blanks too (so that 70,000 U+3000 no longer hide the words after
    them) must not change what ftfy makes of a line: shrinking U+00A0 (mojibake's byte A0) did."""
    import random

    from mmembed.clip_tokenizer import _BLANK_RUN, _shrink_run

    ref = clip[1]
    rng = random.Random(0)
    pieces = ["a", "Ã", "ð", "â€", "Ã©", "æ—¥æœ¬", "â€™", "\xa0", "\u3000", "\u2028", " ", "\n", "\r", "\x85",
              "\x1c", "&nbsp;", "<", "\xa0" * 6, " " * 6, "\u3000" * 7, "\n" * 7, " \u2028 " * 3]
    for _ in range(1500):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 20)))
        shrunk = _BLANK_RUN.sub(lambda m: _shrink_run(m.group()), text)
        assert ref.clean_fn(shrunk) == ref.clean_fn(text), repr(text)


def test_capped_ids_after_unicode_blanks_or_entities_are_open_clips(clip):
    """After 70,000 U+3000 (or 12,000 "&nbsp;") a capped caption lost its words ("a" alone), or
    encoded half an entity ("a & n"): only ASCII runs were shrunk before the 65,536-character cut."""
    ours, ref = clip
    texts = ["a" + "\u3000" * 70_000 + " red star", "a " + "&nbsp;" * 12_000 + " red star",
             "a" + "\xa0" * 70_000 + " red star", "a" + "x" * 70_000 + " red star",
             "a" + "\u3000\n" * 40_000 + "red star",
             "&amp;amp;amp; x " + "word " * 14_000 + "<b>"]  # "<" beyond the cut: ftfy unescapes nothing
    for text in texts:
        expected = ref([text])[0].tolist()
        expected = expected[:expected.index(ref.eot_token_id) + 1]
        assert ours.encode(text, add_bos=True, add_eos=True, max_length=77) == expected, repr(text[:12])


def test_a_megabyte_of_unicode_blanks_or_entities_stays_bounded(clip, monkeypatch):
    """Blank runs of any kind are shrunk before cleaning; a megabyte of "&nbsp;" is cleaned once."""
    ours, ref = clip
    seen = _cleaned_lengths(ours, monkeypatch)
    assert ours.encode("a" + "\u3000" * 1_000_000 + "red star", max_length=77) == ref.encode("a red star")
    assert max(seen) < 100
    assert ours.encode("a " + "&nbsp;" * 170_000 + " red star", max_length=77) == ref.encode("a red star")


@pytest.mark.parametrize("word", ["日本語の文章", "cafÃ©"])
def test_a_megabyte_without_spaces_is_cleaned_a_window_at_a_time(clip, monkeypatch, word):
    """With no space left to drop words at, the window grew until the whole caption was cleaned
    (CJK prose or mojibake: 1 MB took seconds, 4 MB seven)."""
    ours, ref = clip
    seen = _cleaned_lengths(ours, monkeypatch)
    text = "a red star " + word * (1_000_000 // len(word))
    ids = ours.encode(text, max_length=77)
    assert len(ids) == 77 and max(seen) < 200_000
    short = text[:3000]  # a prefix open_clip tokenizes in well under a second: the same first ids
    assert ids == ref.encode(short)[:77]
