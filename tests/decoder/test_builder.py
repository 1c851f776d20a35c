"""Decoder builder: a GPT-2 folder's tokenizer must fit its weights."""

import re

import pytest

pytest.importorskip("transformers")

from mmembed.config_decoder import DecoderConfig  # noqa: E402
from mmembed.decoder import build_prompt_model, gpt2_tokenizer  # noqa: E402
from mmembed.errors import CheckpointError  # noqa: E402
from tests.decoder.helpers import DIM, save_tiny_gpt2  # noqa: E402


def test_a_tokenizer_larger_than_the_gpt2_table_is_refused(tmp_path):
    """A 300-token tokenizer beside 200-row weights built a model whose rows 200..299 were all the
    mean row: a third of the real tokens shared one meaningless embedding."""
    folder = save_tiny_gpt2(tmp_path / "small", vocab_size=200)
    tokenizer = gpt2_tokenizer(folder)
    assert tokenizer.vocab_size == 300
    with pytest.raises(CheckpointError, match=re.escape(f"{folder}: the tokenizer has 300 tokens but the "
                                                        "weights only 200 token rows")):
        build_prompt_model(DecoderConfig(init_from_gpt2=str(folder), soft_tokens=2), tokenizer, DIM)
    # control: the same tokenizer with the table it was made for builds
    folder = save_tiny_gpt2(tmp_path / "fits")
    pm = build_prompt_model(DecoderConfig(init_from_gpt2=str(folder), soft_tokens=2), gpt2_tokenizer(folder), DIM)
    assert pm.lm.decoder.vocab_size == pm.fmt.vocab_size > 300
