"""The held-out-styles set (`benchmarks/words_set.py`): its splits keep test styles out of training."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from benchmarks import words_set as ws


def _plan(n_words: int = 20):
    train = [Path(f"/fonts/{name}.ttf") for name, _ in ws.TRAIN_FACES]
    test = [Path(f"/fonts/{name}.ttf") for name, _ in ws.TEST_FACES]
    return ws.plan(ws.WORDS[:n_words], train, test, seed=0), set(train), set(test)


def test_word_list_is_200_distinct_short_words():
    assert len(ws.WORDS) == 200 == len(set(ws.WORDS))
    assert all(w.isalpha() and w.islower() and 3 <= len(w) <= 8 for w in ws.WORDS)


def test_held_out_styles_never_occur_in_training():
    samples, train_faces, test_faces = _plan()
    by_split = {split: [s for s in samples if s.split == split] for split in ("train", "val", "test")}
    assert {s.face for s in by_split["train"] + by_split["val"]} <= train_faces
    assert {s.face for s in by_split["test"]} == test_faces
    # no held-out voice shares its accent or its variant with a training voice
    train_voices, test_voices = {s.voice for s in by_split["train"]}, {s.voice for s in by_split["test"]}
    assert train_voices == set(ws.TRAIN_VOICES) and test_voices == set(ws.TEST_VOICES)
    assert not {v[0] for v in train_voices} & {v[0] for v in test_voices}
    assert not {v[1] for v in train_voices} & {v[1] for v in test_voices}
    # and no held-out typeface is a design (or a metric clone) seen in training
    assert not {d for d, _ in ws.TRAIN_FACES} & {d for d, _ in ws.TEST_FACES}


def test_every_word_has_a_dozen_training_rows_one_per_typeface():
    samples, train_faces, _ = _plan()
    train = [s for s in samples if s.split == "train"]
    per_word = Counter(s.word for s in train)
    assert set(per_word.values()) == {len(ws.TRAIN_FACES)} == {12}
    for word in ws.WORDS[:20]:
        rows = [s for s in train if s.word == word]
        assert {s.face for s in rows} == train_faces
    # voices rotate with the word: a typeface is not tied to one voice
    face = sorted(train_faces)[0]
    assert len({s.voice for s in train if s.face == face}) == len(ws.TRAIN_VOICES)
    names = [s.stem for s in samples]
    assert len(names) == len(set(names))  # one file name per row


@pytest.mark.skipif(not Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf").exists(),
                    reason="needs the DejaVu fonts (Debian: fonts-dejavu-core)")
def test_rendered_word_is_seeded_and_fits_the_image():
    import random

    import numpy as np

    face = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")
    a = ws.render_word("umbrella", face, random.Random("0/x"))
    b = ws.render_word("umbrella", face, random.Random("0/x"))
    assert a.size == (ws.IMAGE_SIZE, ws.IMAGE_SIZE) and np.array_equal(np.asarray(a), np.asarray(b))
    ink = np.asarray(a.convert("L")) < 128
    rows, cols = np.nonzero(ink)
    assert ink.sum() > 50  # the word is there
    assert cols.min() > 0 and cols.max() < ws.IMAGE_SIZE - 1 and rows.min() > 0 and rows.max() < ws.IMAGE_SIZE - 1
