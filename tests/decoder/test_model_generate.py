"""`Model.generate` over many prompts: the list is run in chunks of 64, and errors name a prompt
by its place in the whole list."""

import pytest

from mmembed.errors import BadInput
from tests.decoder.test_best_of import with_decoder
from tests.conftest import tiny_model


def test_a_prompt_too_long_past_the_first_chunk_is_named_by_its_place_in_the_list():
    """Prompt 66 of 70 was called "prompt 2" (its place in the second chunk of 64), after the
    first 64 answers had been generated and thrown away."""
    model = with_decoder(tiny_model(0))  # context 64
    prompts = [["a small red star"]] * 66 + [[" ".join(["red"] * 100)]] + [["b"]] * 3
    with pytest.raises(BadInput, match=r"^prompt 66 of \d+ tokens exceeds the decoder's context of 64"):
        model.generate(prompts, max_new_tokens=2)
    with pytest.raises(BadInput, match=r"^prompt 66 of \d+ tokens exceeds"):  # best_of chunks by 64 too
        model.generate(prompts, max_new_tokens=2, best_of=2, temperature=1.0, rerank_weight=0.0)
    assert len(model.generate(prompts[:66] + prompts[67:], max_new_tokens=2)) == 69


def test_a_huge_prompt_is_refused_without_tokenising_all_of_it(monkeypatch, tmp_path):
    """A 5 MB line was BPE-encoded whole to be measured, twice (6 s and 1 GB in `mmembed chat`),
    then refused: it is counted only as far as the refusal needs, in generate, stream and a Session."""
    import mmembed as mm

    model = with_decoder(tiny_model(0))  # context 64
    tok = model.prompt_model.fmt.tokenizer
    seen = []
    for name in ("_encode_plain", "_encode_with_specials"):
        real = getattr(tok, name)
        monkeypatch.setattr(tok, name, lambda text, *a, real=real: seen.append(len(text)) or real(text, *a))
    huge = "word " * 200_000  # 1 M characters
    with pytest.raises(BadInput, match=r"^prompt of more than 256 tokens exceeds the decoder's context of 64"):
        model.generate([huge, "?"], max_new_tokens=2)
    with pytest.raises(BadInput, match="more than 256 tokens"):
        next(model.stream([huge], max_new_tokens=2))
    with mm.Session(model, memory=tmp_path / "m.db", user="ada") as chat, pytest.raises(BadInput, match="more than"):
        chat.ask(huge, max_new_tokens=2)
    assert seen and max(seen) < 20_000, max(seen)
    with pytest.raises(BadInput, match=r"^prompt of 81 tokens exceeds"):  # counted exactly up to 4 contexts
        model.generate([" ".join(["red"] * 79)], max_new_tokens=2)
