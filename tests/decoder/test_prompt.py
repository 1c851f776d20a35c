"""Prompts: segment checks, marker tokens, soft-token placement, answer-only loss, inline syntax."""

import re

import pytest
import torch
import torch.nn.functional as F

import mmembed as mm
from mmembed.decoder import (Sampling, Stops, Slot, answer_logits, generate, is_batch, parse_inline,
                             resolve_prompts)
from mmembed.errors import BadInput, UserError
from mmembed.modality import Modality
from tests.decoder.helpers import DIM, fake_embed, prompt_model

CPU = torch.device("cpu")


def unit(seed=0):
    return F.normalize(torch.randn(DIM, generator=torch.Generator().manual_seed(seed)), dim=0)


def test_soft_tokens_land_exactly_at_their_placeholders():
    pm = prompt_model()
    fmt, k = pm.fmt, pm.fmt.soft_tokens
    rows = [fmt.encode(["see", Slot("image"), "and", Slot("audio")]), fmt.encode([Slot("vector"), "then text"])]
    width = max(map(len, rows))
    ids = torch.tensor([r + [fmt.pad_id] * (width - len(r)) for r in rows])
    media = torch.stack([unit(1), unit(2), unit(3)])  # row 0: two items, row 1: one
    with torch.no_grad():
        x = pm.lm.embed(ids, media)
        soft = pm.lm.projector(media)  # (3, k, C)
        plain = pm.lm.decoder.token_embedding(ids)
    slots = (ids == fmt.placeholder_id).nonzero().tolist()
    assert len(slots) == 3 * k
    expected = soft.reshape(3 * k, -1)  # row-major: row 0's two items, then row 1's
    for j, (b, t) in enumerate(slots):
        torch.testing.assert_close(x[b, t], expected[j], atol=0, rtol=0)
    keep = ids != fmt.placeholder_id
    torch.testing.assert_close(x[keep], plain[keep], atol=0, rtol=0)
    # each item's k slots sit between its own markers
    row0 = rows[0]
    start = row0.index(fmt.ids["<image>"])
    assert row0[start + 1: start + 1 + k] == [fmt.placeholder_id] * k and row0[start + 1 + k] == fmt.ids["</image>"]
    with pytest.raises(ValueError, match="placeholder"):
        pm.lm.embed(ids, media[:2])


def test_loss_ignores_prompt_positions():
    pm = prompt_model()
    fmt = pm.fmt
    prompt = fmt.encode(["what colour is", Slot("image"), "?"])
    answer = fmt.encode_answer("red")
    ids = torch.tensor([prompt + answer])
    targets = torch.tensor([prompt[1:] + answer + [fmt.pad_id]])
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[0, len(prompt) - 1: len(prompt) - 1 + len(answer)] = True
    media = unit(4)[None]

    def loss(t):
        logits, tgt = answer_logits(pm.lm, ids, media, t, mask)
        return float(F.cross_entropy(logits, tgt).detach())

    base = loss(targets)
    scrambled = targets.clone()
    scrambled[0, : len(prompt) - 1] = (scrambled[0, : len(prompt) - 1] + 7) % fmt.vocab_size
    assert loss(scrambled) == base  # a prompt position's target changes nothing
    changed = targets.clone()
    changed[0, len(prompt) - 1] = (changed[0, len(prompt) - 1] + 7) % fmt.vocab_size
    assert loss(changed) != base  # an answer position's target does


def test_typed_marker_text_is_text_not_a_marker():
    fmt = prompt_model().fmt
    ids = fmt.encode(["look: <image> </image> <answer> <media>"])
    markers = set(fmt.ids.values())
    assert not markers & set(ids[1:-1])
    assert ids[0] == fmt.bos_id and ids[-1] == fmt.answer_id
    assert fmt.decode(fmt.tokenizer.encode("<image>")) == "<image>"
    # a media item is a word boundary: spacing around it does not change the ids
    assert fmt.encode(["Describe ", Slot("image"), " now"]) == fmt.encode(["Describe", Slot("image"), "now"])


@pytest.mark.parametrize("segment, message", [
    (torch.ones(DIM + 1), r"shape \(16,\)"),
    (torch.ones(DIM, dtype=torch.long), "floating-point"),
    (torch.ones(2, DIM), r"shape \(16,\)"),
    (torch.empty(DIM, device="meta"), "on meta"),
    (torch.full((DIM,), float("nan")), "NaN"),
    (torch.zeros(DIM), "zero vector"),
    ({"image": "a.png"}, "unsupported type dict"),
    ("a \udcff b", "text is not valid UTF-8"),  # a command line's undecodable byte: the tokenizer's words
])
def test_bad_segment_is_one_clear_error_naming_it(segment, message):
    with pytest.raises(BadInput, match=f"prompt segment 1: .*{message}"):
        resolve_prompts([["look at", segment]], fake_embed, DIM, CPU)


@pytest.mark.parametrize("vector", [unit().numpy(), unit().tolist()])
def test_an_embedded_vector_that_is_not_a_tensor_is_named_not_an_attribute_error(vector):
    """mm.decoder.Embedded(z.numpy(), "audio") raised AttributeError: 'numpy.ndarray' object has no
    attribute 'is_floating_point'."""
    name = type(vector).__name__
    with pytest.raises(BadInput, match=re.escape(f"prompt segment 1: a vector must be a 1-D torch tensor, got {name} (")):
        resolve_prompts([["look at", mm.decoder.Embedded(vector, "audio")]], fake_embed, DIM, CPU)
    assert name in repr(mm.decoder.Embedded(vector, "audio"))


def test_a_batch_mixing_lists_and_bare_strings_says_how_to_write_a_batch():
    """A list within a prompt (a batch with one bare string is one prompt) was "unsupported type list"."""
    mixed = [["Describe", mm.Image("a.png")], ["a", mm.Audio("a.wav")], "What is it"]
    assert not is_batch(mixed)
    hint = "a batch is a list of prompts, each a list: wrap a one-segment prompt as ['text']; use str, mm.Image"
    for segment in (mixed[0], tuple(mixed[0])):
        with pytest.raises(BadInput, match=re.escape(f"prompt segment 0: unsupported type {type(segment).__name__} "
                                                     f"({hint}")):
            resolve_prompts([[segment, *mixed[1:]]], fake_embed, DIM, CPU)
    with pytest.raises(BadInput, match=re.escape("prompt segment 1: unsupported type dict (use str, mm.Image")):
        resolve_prompts([["look at", {"image": "a.png"}]], fake_embed, DIM, CPU)
    # already a batch: a list nested in one of its prompts gets no batch hint
    with pytest.raises(BadInput, match=re.escape("prompt 0 segment 1: unsupported type list (use str, mm.Image")):
        resolve_prompts([["look at", ["a", "b"]], ["c"]], fake_embed, DIM, CPU)


def test_empty_prompt_and_unreadable_media_are_named():
    for empty in ([], ["   "], ""):
        with pytest.raises(BadInput, match="empty"):
            resolve_prompts([empty], fake_embed, DIM, CPU)

    def embed(modality, items):
        if any(str(i).endswith("bad.png") for i in items):
            raise BadInput(f"{modality} item {len(items) - 1}: not a readable image file: bad.png")
        return fake_embed(modality, items)

    prompts = [["ok", mm.Image("good.png")], ["two", mm.Audio("a.wav"), mm.Image("x.png"), mm.Image("bad.png")]]
    with pytest.raises(BadInput, match=r"^prompt 1 segment 3 \(image\): not a readable image file: bad.png$"):
        resolve_prompts(prompts, embed, DIM, CPU)


def test_a_prompt_of_one_segment_or_of_no_kind_at_all():
    z = torch.arange(1.0, DIM + 1)
    for alone in (mm.Image("a.png"), z):
        (one,) = resolve_prompts([alone], fake_embed, DIM, CPU)
        (listed,) = resolve_prompts([[alone]], fake_embed, DIM, CPU)
        assert one.parts == listed.parts and torch.equal(one.vectors, listed.vectors)
    for bad in (None, 5, {"text": "hi"}):  # one prompt is "prompt", as in every other message (it was "prompt 0")
        with pytest.raises(BadInput, match=f"^prompt: expected a str, a segment or a list of segments, "
                                           f"got {type(bad).__name__}$"):
            resolve_prompts([bad], fake_embed, DIM, CPU)
        with pytest.raises(BadInput, match="^prompt 1: expected a str"):
            resolve_prompts(["fine", bad], fake_embed, DIM, CPU)


def test_media_vectors_follow_prompt_order_and_vectors_are_normalised():
    z = torch.arange(1.0, DIM + 1)
    (r,) = resolve_prompts([[mm.Audio("b.wav"), "x", z, mm.Image("a.png")]], fake_embed, DIM, CPU)
    assert [p.marker for p in r.parts if isinstance(p, Slot)] == ["audio", "vector", "image"]
    torch.testing.assert_close(r.vectors[0], fake_embed(Modality.AUDIO, ["b.wav"])[0])
    torch.testing.assert_close(r.vectors[1], z / z.norm())
    torch.testing.assert_close(r.vectors[2], fake_embed(Modality.IMAGE, ["a.png"])[0])
    (big,) = resolve_prompts([[z * 1e19]], fake_embed, DIM, CPU)  # finite, but its norm overflows float32
    torch.testing.assert_close(big.vectors[0], z / z.norm())  # it was a zero vector, silently


def test_prompt_longer_than_the_context_is_a_clear_error():
    pm = prompt_model()  # context 64
    resolved = resolve_prompts([["one two " * 60]], fake_embed, DIM, CPU)
    with pytest.raises(BadInput, match="exceeds the decoder's context of 64"):
        generate(pm.lm, pm.fmt, resolved, 5, Sampling(), Stops(), None, CPU)


def test_inline_prompt_syntax(tmp_path):
    (tmp_path / "a.png").write_bytes(b"x")
    (tmp_path / "b.wav").write_bytes(b"x")
    parts = parse_inline("Describe <image:a.png> and <audio: b.wav >, please", base=tmp_path)
    assert [type(p).__name__ for p in parts] == ["str", "Image", "str", "Audio", "str"]
    assert parts[1].item == tmp_path / "a.png" and parts[3].item == tmp_path / "b.wav"
    with pytest.raises(UserError, match="missing image file"):
        parse_inline("look <image:nope.png>", base=tmp_path)
    assert parse_inline("plain <image> text") == ["plain <image> text"]
    for empty in ("<image:>", "<audio:  >"):
        with pytest.raises(UserError, match="without a path"):
            parse_inline(f"look {empty}", base=tmp_path)
    with pytest.raises(UserError, match="names a folder, not an image file"):
        parse_inline("look <image:.>", base=tmp_path)
    (tmp_path / "x>y.png").write_bytes(b"x")
    with pytest.raises(UserError, match="ends at its first '>'"):  # it said only "missing image file: x"
        parse_inline("look <image:x>y.png>", base=tmp_path)
    with pytest.raises(UserError, match=r"missing image file: \S*nope.png$"):  # no hint without a later '>'
        parse_inline("look <image:nope.png>", base=tmp_path)
    # a tag in other letters is the same tag; a misspelt one naming a file was sent as text, and the
    # decoder answered about no picture
    assert [type(p).__name__ for p in parse_inline("see <Image:a.png>", base=tmp_path)] == ["str", "Image"]
    with pytest.raises(UserError, match=r"prompt holds <img:a.png>: a file is named <image:FILE> or <audio:FILE>"):
        parse_inline("see <img:a.png>", base=tmp_path)
    assert parse_inline("note <b:bold> and <http://x.org>", base=tmp_path) == ["note <b:bold> and <http://x.org>"]
    # text that only looks like a tag is never probed as a path (the probe raised OSError
    # "File name too long" on a quote and RuntimeError on ~user, and ended a chat)
    for text in ("Summarise <quote:" + "word " * 60 + ">", "who is <user:~nobody_xyz/notes> ?",
                 "<x:" + "a" * 300 + ".png>"):
        assert parse_inline(text, base=tmp_path) == [text]
    with pytest.raises(UserError, match="names no user"):
        parse_inline("see <image:~nobody_xyz/a.png>", base=tmp_path)
    # a name too long for the file system was an OSError that ended a chat; /dev/null was "missing"
    with pytest.raises(UserError, match="unreadable image file"):
        parse_inline("see <image:" + "a" * 300 + ".png>", base=tmp_path)
    with pytest.raises(UserError, match="not a regular file"):
        parse_inline("see <image:/dev/null>")
    # a tag without its '>' went to the decoder as text: "yes", about a picture it never saw
    for text in ("Describe <image:a.png", "Describe <AUDIO:b.wav and <image:a.png>", "<image:a.png <audio:b.wav>"):
        with pytest.raises(UserError, match="without its closing '>'"):
            parse_inline(text, base=tmp_path)
    (tmp_path / "my photo.png").write_bytes(b"x")  # a misspelt tag before a name with a space is still caught
    with pytest.raises(UserError, match="a file is named <image:FILE>"):
        parse_inline("what is <img:my photo.png>?", base=tmp_path)


def test_adjacent_text_segments_are_one_text_joined_by_a_space():
    """Each text segment was tokenised alone: ["what colour is the star?", "blue", "and the circle?"]
    (a Session's history turn, its answer and the new question) reached the decoder as
    "what colour is the star?blueand the circle?"."""
    pm = prompt_model()
    fmt = pm.fmt
    parts = ["what colour is the star?", "blue", "  ", "and the circle?"]
    joined = fmt.encode(["what colour is the star? blue and the circle?"])
    assert fmt.encode(parts) == joined and fmt.length(parts) == len(joined)
    assert fmt.decode(fmt.encode(parts)) == fmt.decode(joined)
    media = torch.ones(DIM)
    (resolved,) = resolve_prompts([["a", "b", media, "c"]], fake_embed, DIM, CPU)  # text runs around media stay apart
    assert fmt.encode(resolved.parts) == [fmt.bos_id, *fmt.tokenizer.encode("a b"), *fmt.slot_ids("vector"),
                                          *fmt.tokenizer.encode("c"), fmt.answer_id]


def test_training_reads_adjacent_text_segments_as_generation_does():
    """The training rows of memory dialogues hold runs of text segments (turns, answers, the question):
    training must tokenise them as `PromptFormat.encode` does, or it trains on other words."""
    from mmembed.data.instructions import InstructionRow
    from mmembed.train.decoder_data import MediaTable, PromptDataset

    pm = prompt_model()
    ref = (Modality.IMAGE, "a.png")
    row = InstructionRow(1, ("what colour is the star?", "blue", ref, "and", "the circle?"), "red")
    table = MediaTable()
    table.add([row])
    ids, start, media = PromptDataset([row], pm.fmt, table, context=64)[(0, 0)]
    expected = pm.fmt.encode(["what colour is the star?", "blue", Slot("image"), "and", "the circle?"])
    assert ids[:start] == expected and media == [0]


def test_an_inline_caption_is_the_python_apis_text_segment():
    """`--prompt "Describe <text:a red star>"` sent the tag's characters to the decoder as words,
    without a message: the command line had no way to give what `mm.Text` gives in Python."""
    from mmembed.decoder.prompt import Text

    parts = parse_inline("Describe <text: a large red star on the left >, please")
    assert [type(p).__name__ for p in parts] == ["str", "Text", "str"]
    assert parts[1].item == "a large red star on the left" and isinstance(parts[1], Text)
    for bad, message in (("look <text:>", "without a caption"), ("look <text:a red star", "without its closing '>': write <text:CAPTION>$")):
        with pytest.raises(UserError, match=message):
            parse_inline(bad)


def test_clips_exclamation_mark_is_a_word_the_decoder_may_write():
    """CLIP's pad id 0 is also the token "!": PromptFormat hid it, so decode dropped every "!" and
    generation could never write one."""
    pytest.importorskip("open_clip")
    from mmembed.clip_tokenizer import ClipTokenizer
    from mmembed.decoder import PromptFormat

    tok = ClipTokenizer()
    fmt = PromptFormat(tok, 2)
    ids = tok.encode("wow!\U0001F600")  # "!" not ending a word: id 0
    assert tok.pad_id in ids
    assert fmt.decode(ids) == tok.decode(ids) == "wow !\U0001F600 "
    assert tok.pad_id not in fmt.prompt_only_ids and tok.pad_id not in fmt.never_written(fmt.vocab_size)
    own = prompt_model().fmt  # a pad that is a special token stays prompt-only
    assert own.pad_id in own.prompt_only_ids


def test_a_vector_on_another_device_is_moved_to_the_models():
    """`model.embed` and `Index.vector` give CPU tensors; a model on a GPU refused them ("the vector is
    on cpu, the model on cuda:0"). Here the model's device is `meta` (no second device on a CPU machine):
    the CPU vector arrives there, checked and normalised first."""
    (resolved,) = resolve_prompts([["look at", 3 * unit()]], fake_embed, DIM, torch.device("meta"))
    assert resolved.vectors.device.type == "meta" and resolved.vectors.shape == (1, DIM)
