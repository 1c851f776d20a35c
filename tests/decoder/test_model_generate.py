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
