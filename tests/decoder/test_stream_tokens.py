"""`stream_tokens`: one event per generated token, equal to `generate`'s ids, log-probs and
entropies, whose texts join to the answer (held-back characters and stop strings included)."""

import pytest
import torch

from mmembed.decoder import Sampling, Stops, StreamedToken, generate, resolve_prompts, stream_tokens
from tests.decoder.helpers import DIM, fake_embed, lively, prompt_model

CPU = torch.device("cpu")
PROMPT = ["describe the picture", torch.ones(DIM), "and the sound", -torch.ones(DIM), "please"]


def both(pm, n: int, stop: Stops, seed: int, temperature: float):
    (resolved,) = resolve_prompts([PROMPT], fake_embed, DIM, CPU)
    tokens = list(stream_tokens(pm.lm, pm.fmt, resolved, n, Sampling(temperature), stop, seed, CPU))
    (out,) = generate(pm.lm, pm.fmt, [resolved], n, Sampling(temperature), stop, seed, CPU)
    return tokens, out


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_tokens_match_generate_and_join_to_its_text(temperature):
    pm = lively(prompt_model(), std=0.3)
    tokens, out = both(pm, 20, Stops(), seed=5, temperature=temperature)
    assert all(isinstance(t, StreamedToken) for t in tokens)
    assert [t.id for t in tokens] == out.token_ids and len(tokens) > 1
    assert [t.logprob for t in tokens] == out.logprobs and [t.entropy for t in tokens] == out.entropy
    assert "".join(t.text for t in tokens) == out.text
    if temperature > 0:
        assert any(t.entropy > 0 for t in tokens)


def test_a_stop_string_is_never_streamed():
    pm = lively(prompt_model(), std=0.3)
    free, full = both(pm, 20, Stops(), seed=5, temperature=1.0)
    stop = full.text[len(full.text) // 2:][:3]  # three characters from the middle of the free answer
    assert len(stop) == 3
    tokens, out = both(pm, 20, Stops((stop,)), seed=5, temperature=1.0)
    streamed = "".join(t.text for t in tokens)
    assert streamed == out.text and stop not in streamed and out.finish_reason == "stop"
    assert len(tokens) == len(out.token_ids) < len(free)


@pytest.mark.parametrize("stop", [Stops(), None])
def test_replaying_a_finished_answer_gives_the_streamed_tokens(stop):
    """What the web app shows for a best-of answer: the tokens a stream of it would have sent."""
    from mmembed.decoder.stream import replay_tokens

    pm = lively(prompt_model(), std=0.3)
    if stop is None:  # a stop string from the middle of the free answer
        _, free = both(pm, 20, Stops(), seed=5, temperature=1.0)
        stop = Stops((free.text[len(free.text) // 2:][:3],))
    tokens, out = both(pm, 20, stop, seed=5, temperature=1.0)
    assert replay_tokens(pm.fmt, out, stop) == tokens and len(tokens) > 1


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_stop_string_longer_than_the_answer_so_far_releases_nothing_twice(temperature):
    """While the answer is shorter than what a stop string holds back, nothing is released; the
    texts still join to the answer, and `stream`'s pieces too."""
    from mmembed.decoder import stream

    pm = lively(prompt_model(), std=0.3)
    stop = Stops.parse("#" * 40)  # never written: holds back 39 characters until the end
    tokens, out = both(pm, 30, stop, seed=5, temperature=temperature)
    assert len(out.text) > 10 and "".join(t.text for t in tokens) == out.text
    before_last = "".join(t.text for t in tokens[:-1])  # never within 39 characters of the answer's end
    assert len(before_last) <= max(0, len(out.text) - 39)
    (resolved,) = resolve_prompts([PROMPT], fake_embed, DIM, CPU)
    assert "".join(stream(pm.lm, pm.fmt, resolved, 30, Sampling(temperature), stop, 5, CPU)) == out.text


def test_a_stop_string_ending_in_a_multibyte_character_is_never_streamed(monkeypatch):
    """"a€" with "€" arriving as three byte tokens: the half-decoded character counted as one of the
    held-back characters, so "a" was streamed before the stop string cut it."""
    import sys

    from mmembed.decoder import stream

    from mmembed.decoder.sampling import Choice

    pm = prompt_model()
    tok = pm.fmt.tokenizer
    script = [*tok.encode("z"), *tok.encode("a"), *(tok.encode_bytes(bytes([b]))[0] for b in "€".encode()),
              *tok.encode(" q")]

    def scripted():
        ids = iter(script)
        return lambda logits, sampling, generator=None: Choice(
            torch.tensor([next(ids)]), torch.zeros(1), torch.zeros(1))

    decode_module = sys.modules["mmembed.decoder.decode"]  # where `decode_steps` looks up `choose`
    (resolved,) = resolve_prompts([["describe"]], fake_embed, DIM, CPU)
    stop = Stops(("a€",))
    monkeypatch.setattr(decode_module, "choose", scripted())
    (out,) = generate(pm.lm, pm.fmt, [resolved], len(script), Sampling(), stop, None, CPU)
    monkeypatch.setattr(decode_module, "choose", scripted())
    pieces = list(stream(pm.lm, pm.fmt, resolved, len(script), Sampling(), stop, None, CPU))
    monkeypatch.setattr(decode_module, "choose", scripted())
    tokens = list(stream_tokens(pm.lm, pm.fmt, resolved, len(script), Sampling(), stop, None, CPU))
    assert (out.text, out.finish_reason) == ("z", "stop")
    assert "".join(pieces) == "z" and "".join(t.text for t in tokens) == "z"


def test_a_stop_string_of_the_replacement_character_waits_for_a_character_to_end(monkeypatch):
    """stop="\ufffd" stopped at the first byte of any character split over tokens ("é" of "héllo"):
    the answer was "h", although "héllo" holds no U+FFFD; an undecodable byte still stops it."""
    import sys

    from mmembed.decoder.sampling import Choice

    pm = prompt_model()
    tok = pm.fmt.tokenizer
    byte_ids = lambda data: [tok.encode_bytes(bytes([b]))[0] for b in data]  # noqa: E731
    decode_module = sys.modules["mmembed.decoder.decode"]
    (resolved,) = resolve_prompts([["describe"]], fake_embed, DIM, CPU)
    for script, text, reason in [(byte_ids("h\u00e9llo".encode()), "h\u00e9llo", "length"),
                                 (byte_ids(b"ok\xff then"), "ok", "stop")]:
        ids = iter(script)
        monkeypatch.setattr(decode_module, "choose", lambda logits, sampling, generator=None: Choice(
            torch.tensor([next(ids)]), torch.zeros(1), torch.zeros(1)))
        (out,) = generate(pm.lm, pm.fmt, [resolved], len(script), Sampling(), Stops(("\ufffd",)), None, CPU)
        assert (out.text, out.finish_reason) == (text, reason)


def test_a_stop_string_of_the_replacement_character_still_cuts_an_undecodable_byte_at_the_end(monkeypatch):
    """An undecodable last byte before <eos> (or at the last step) stayed in the text as U+FFFD
    although it was the stop string: only a character that may still be completed waits."""
    import sys

    from mmembed.decoder.sampling import Choice

    pm = prompt_model()
    tok = pm.fmt.tokenizer
    decode_module = sys.modules["mmembed.decoder.decode"]
    (resolved,) = resolve_prompts([["describe"]], fake_embed, DIM, CPU)
    a, bad = tok.encode_bytes(b"a")[0], tok.encode_bytes(b"\xff")[0]
    for script, steps in [([a, bad, pm.fmt.eos_id], 3), ([a, bad], 2)]:  # <eos> after it; the last step
        ids = iter(script)
        monkeypatch.setattr(decode_module, "choose", lambda logits, sampling, generator=None: Choice(
            torch.tensor([next(ids)]), torch.zeros(1), torch.zeros(1)))
        (out,) = generate(pm.lm, pm.fmt, [resolved], steps, Sampling(), Stops(("\ufffd",)), None, CPU)
        assert (out.text, out.finish_reason) == ("a", "stop")


@pytest.mark.parametrize("steps, stop, text, reason", [
    (2, ("b", "ab\ufffd"), "", "stop"),  # the final step: "ab\ufffd" is final text, and the earliest stop
    (4, ("b", "ab\ufffd"), "a", "stop"),  # an earlier step: "\ufffd" may still become "é", so "b" stops it
    (2, ("q",), "ab\ufffd", "length"),
])
def test_replayed_tokens_join_to_the_text_whichever_step_stopped_the_answer(monkeypatch, steps, stop, text, reason):
    """A stop on the final step was replayed as on an earlier one: a best-of answer "" showed tokens joining to "a"."""
    import sys

    from mmembed.config_decoder import DecoderConfig
    from mmembed.decoder import build_prompt_model
    from mmembed.decoder.stream import replay_tokens
    from mmembed.decoder.sampling import Choice
    from mmembed.tokenizer import Tokenizer

    tok = Tokenizer.train(["b\u00e9 ab\u00e9"] * 30, vocab_size=300)  # learns the token b"b\xc3": "b" + half an "é"
    (split,) = [i for i in range(tok.vocab_size) if tok.decode_bytes([i]) == b"b\xc3"]
    torch.manual_seed(0)
    cfg = DecoderConfig(width=32, layers=2, heads=4, context=64, dropout=0.0, soft_tokens=3)
    pm = build_prompt_model(cfg, tok, DIM)
    decode_module = sys.modules["mmembed.decoder.decode"]
    (resolved,) = resolve_prompts([["describe"]], fake_embed, DIM, CPU)

    def scripted():  # "a", then "b" and the first byte of an "é"
        ids = iter([*tok.encode_bytes(b"a"), split, *tok.encode_bytes(b"zz")])
        return lambda logits, sampling, generator=None: Choice(
            torch.tensor([next(ids)]), torch.zeros(1), torch.zeros(1))

    monkeypatch.setattr(decode_module, "choose", scripted())
    (out,) = generate(pm.lm, pm.fmt, [resolved], steps, Sampling(), Stops(stop), None, CPU)
    monkeypatch.setattr(decode_module, "choose", scripted())
    tokens = list(stream_tokens(pm.lm, pm.fmt, resolved, steps, Sampling(), Stops(stop), None, CPU))
    assert (out.text, out.finish_reason, len(out.token_ids)) == (text, reason, 2)
    replayed = replay_tokens(pm.fmt, out, Stops(stop))
    assert replayed == tokens and "".join(t.text for t in replayed) == out.text


def test_token_texts_give_each_token_the_text_it_wrote():
    """`token_texts`: no hold-back for a stop string that might begin, so each token keeps its own
    text; they join to the answer, cut where a stop string begins (a stream's token i carried the
    text of token i+1 while the stop could be starting)."""
    from mmembed.decoder.stream import token_texts

    pm = lively(prompt_model(), std=0.3)
    free_tokens, free = both(pm, 20, Stops(), seed=5, temperature=1.0)
    own = token_texts(pm.fmt, free.token_ids, free.text)
    assert own == [t.text for t in free_tokens]  # nothing to hold back: the stream's texts
    stop = free.text[len(free.text) // 2:][:3]
    tokens, out = both(pm, 20, Stops((stop,)), seed=5, temperature=1.0)
    stopped = token_texts(pm.fmt, out.token_ids, out.text)
    assert "".join(stopped) == out.text and len(stopped) == len(out.token_ids)
    cut, used = len(out.text), 0
    for text, unstopped in zip(stopped, own):
        assert text == unstopped[:max(cut - used, 0)]
        used += len(text)
    assert stopped != [t.text for t in tokens]  # the stream held text back behind the stop's first characters


def test_token_texts_wait_for_a_character_split_over_tokens():
    from mmembed.decoder.stream import token_texts
    from mmembed.tokenizer import Tokenizer
    from mmembed.decoder.prompt import PromptFormat

    tok = Tokenizer.train(["b\u00e9 ab\u00e9"] * 30, vocab_size=300)  # learns the token b"b\xc3": "b" + half an "é"
    (split,) = [i for i in range(tok.vocab_size) if tok.decode_bytes([i]) == b"b\xc3"]
    (rest,) = tok.encode_bytes(b"\xa9")
    fmt = PromptFormat(tok, soft_tokens=1)
    ids = [*tok.encode_bytes(b"a"), split, rest, *tok.encode_bytes(b"z")]
    # the token holding "b" and half an "é" writes the "b"; the "é" waits for its second byte
    assert token_texts(fmt, ids, "ab\u00e9z") == ["a", "b", "\u00e9", "z"]
    assert token_texts(fmt, ids, "ab") == ["a", "b", "", ""]  # an answer cut before the "é"
