"""Text preprocessing and the preprocessor registry/builder."""

from __future__ import annotations

import pytest
import torch

from mmembed.errors import BadInput, ConfigError
from mmembed.modality import Modality
from mmembed.preprocess import PREPROCESSORS, ImagePreprocessor, TextPreprocessor, build_preprocessor
from mmembed.tokenizer import Tokenizer

CORPUS = [
    "a red circle on the left beeps twice",
    "a blue square on the right hums",
    "héllo wörld café naïve 🎉🐱 e\u0301 日本語",
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(CORPUS, vocab_size=300)


class SpyTokenizer:
    """Wraps a `tokenizers.Tokenizer` and records the longest text it was asked to encode."""

    def __init__(self, inner) -> None:
        self.inner, self.longest = inner, 0

    def encode(self, text: str, *args, **kwargs):
        self.longest = max(self.longest, len(text))
        return self.inner.encode(text, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_caption_is_bos_ids_eos(tok):
    ids = TextPreprocessor(tok)("a red circle")
    assert ids.dtype == torch.long
    assert ids.tolist() == [tok.bos_id, *tok.encode("a red circle"), tok.eos_id]
    bare = TextPreprocessor(tok, add_bos=False, add_eos=False)
    assert bare("  a red circle\n").tolist() == tok.encode("a red circle")  # surrounding whitespace stripped


def test_empty_and_whitespace_captions_are_rejected(tok):
    pre = TextPreprocessor(tok)
    for caption in ["", "   ", "\n\t", b""]:
        with pytest.raises(BadInput, match="empty caption"):
            pre(caption)
    with pytest.raises(BadInput, match="must be a string"):
        pre(float("nan"))  # what a CSV reader might hand over for an empty cell



def test_a_caption_that_cleans_to_nothing_is_empty():
    """CLIP's cleaning turns "&nbsp;" (or a byte-order mark) into nothing: the caption became
    [BOS, EOS] and trained as a real one."""
    from mmembed.clip_tokenizer import ClipTokenizer

    pre = TextPreprocessor(ClipTokenizer(), add_bos=True, add_eos=True)
    for caption in ["&nbsp;", "\ufeff"]:
        with pytest.raises(BadInput, match="empty caption"):
            pre(caption)
    assert len(pre("a red star")) == 5


def test_megabyte_caption_is_truncated_in_bounded_work(tok, monkeypatch):
    spy = SpyTokenizer(tok._plain)  # the BPE itself: what it is asked to encode bounds the work
    monkeypatch.setattr(tok, "_plain", spy)
    pre = TextPreprocessor(tok, max_length=32)
    caption = "a red circle on the left beeps twice " * 30000  # ~1.1 MB
    ids, seen = pre(caption), spy.longest
    assert seen <= 32 * 64  # the BPE never saw more than a prefix
    assert ids.numel() == 32 and ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert ids[1:-1].tolist() == tok.encode(caption[:5000])[:30]  # same ids as full tokenization
    # no whitespace to cut at: still bounded, still exact
    spy.longest = 0
    run = "é" * 1_000_000
    ids, seen = pre(run), spy.longest
    assert seen <= 32 * 64
    assert ids.numel() == 32 and ids[1:-1].tolist() == tok.encode(run[:5000])[:30]


def test_invalid_utf8_bytes_are_rejected_and_valid_bytes_accepted(tok):
    pre = TextPreprocessor(tok)
    with pytest.raises(BadInput, match="not valid UTF-8 .byte 2"):
        pre(b"ab\xff\xfecd")
    assert torch.equal(pre("café 🎉".encode()), pre("café 🎉"))


@pytest.mark.parametrize(
    "text", ["🐱🎉 a cat", "e\u0301 vs é", "日本語のテキスト", "👩\u200d👩\u200d👧 family", "Z\u0335\u0321a\u0336lgo"]
)
def test_emoji_and_combining_marks_round_trip(tok, text):
    ids = TextPreprocessor(tok, max_length=200)(text)
    assert tok.decode(ids[1:-1].tolist()) == text


def test_collate_pads_with_pad_id(tok):
    pre = TextPreprocessor(tok)
    a, b = pre("a red circle"), pre("a blue square on the right hums")
    ids, mask = pre.collate([a, b])
    assert ids.shape == (2, b.numel()) and mask.sum(1).tolist() == [a.numel(), b.numel()]
    assert (ids[0, a.numel() :] == tok.pad_id).all() and torch.equal(ids[0, : a.numel()], a)


def test_max_length_must_leave_room_for_text(tok):
    with pytest.raises(ConfigError, match="max_length"):
        TextPreprocessor(tok, max_length=2)


# ---------------------------------------------------------------------------- registry / builder


def test_registry_covers_every_modality():
    assert set(PREPROCESSORS) == set(Modality)
    assert all(cls.modality == m for m, cls in PREPROCESSORS.items())


def test_build_preprocessor_validates_the_yaml_block(tok):
    pre = build_preprocessor("image", {"size": 32, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}, train=True)
    assert isinstance(pre, ImagePreprocessor) and pre.size == 32 and pre.mean == (0.5, 0.5, 0.5) and pre.train
    with pytest.raises(ConfigError, match="unknown key 'model.towers.image.preprocess.szie'"):
        build_preprocessor("image", {"szie": 32})
    with pytest.raises(ConfigError, match="size must be int"):
        build_preprocessor("image", {"size": "big"})
    with pytest.raises(ConfigError, match="preprocess.train is set by the program"):
        build_preprocessor("audio", {"train": True})
    with pytest.raises(ConfigError, match="unknown modality 'imgae'"):
        build_preprocessor("imgae", {})
    with pytest.raises(ConfigError, match="needs the model's tokenizer"):
        build_preprocessor("text", {"max_length": 16})
    text = build_preprocessor(Modality.TEXT, {"max_length": 16}, tokenizer=tok)
    assert text.max_length == 16 and text(CORPUS[0]).numel() == 16


def test_a_cut_never_falls_at_a_control_character_gpt2_joins_to_punctuation():
    """`str.isspace` holds for \\x1c, which GPT-2's regex reads as punctuation: ".,\\x1c" is one
    pre-token, and a cut before \\x1c re-split it (the last id differed from the full encoding's)."""
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers

    from mmembed.tokenizer import DEFAULT_SPECIAL_TOKENS, byte_to_unicode

    chars = byte_to_unicode()
    vocab = {t: i for i, t in enumerate(DEFAULT_SPECIAL_TOKENS)}
    for b in range(256):
        vocab[chars[b]] = len(vocab)
    merges = [(",", chars[0x1C]), (".", ","), ("!", "."), ("!", "!"), ("!!", "!!"), ("!!!!", "!!!!")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    hf = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens(list(DEFAULT_SPECIAL_TOKENS))
    tok = Tokenizer(hf)
    text = "!" * 24 + ".,\x1c" + "z" * 100
    assert TextPreprocessor(tok, max_length=5)(text).tolist() == [tok.bos_id, *tok.encode(text)[:3], tok.eos_id]
