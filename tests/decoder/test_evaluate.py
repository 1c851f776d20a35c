"""answer_rows: how many tokens each instruction row may write, by default and when capped."""

import pytest

from mmembed.config_decoder import DecoderConfig
from mmembed.data.instructions import InstructionRow
from mmembed.decoder import build_prompt_model
from mmembed.decoder.evaluate import ANSWER_FLOOR, ANSWER_SLACK, answer_budget, answer_rows, row_prompt
from tests.conftest import tiny_model
from tests.decoder.helpers import lively

LONG = " ".join(["a small red star on the left and a large blue circle"] * 4)


def decoder_model(context: int = 160):
    """The tiny untrained space with an untrained (lively: it does not repeat one id) decoder."""
    model = tiny_model()
    cfg = DecoderConfig(width=32, layers=1, heads=2, context=context, dropout=0.0, soft_tokens=2)
    model.prompt_model = lively(build_prompt_model(cfg, model.tokenizer, model.embed_dim), std=0.5)
    model.prompt_model.lm.eval()
    model.config.decoder = cfg  # as a saved run holds it
    return model


def test_each_row_may_write_its_reference_answer_and_some_slack_at_least_48_tokens():
    """A fixed 48 new tokens cut every longer reference answer short, and the row was scored wrong."""
    model = decoder_model()
    rows = [InstructionRow(1, ("Describe it:",), LONG), InstructionRow(2, ("Its colour?",), "red")]
    need = len(model.prompt_model.fmt.encode_answer(LONG))  # with its end token
    assert need > ANSWER_FLOOR
    assert [answer_budget(model, r) for r in rows] == [need + ANSWER_SLACK, ANSWER_FLOOR]
    answers = answer_rows(model, rows)
    assert all(a.finish_reason == "length" for a in answers)  # untrained: it writes to its budget
    assert [len(a.token_ids) for a in answers] == [need + ANSWER_SLACK, ANSWER_FLOOR]
    alone = [model.generate(row_prompt(r), max_new_tokens=answer_budget(model, r)) for r in rows]
    assert [a.token_ids for a in answers] == [a.token_ids for a in alone]
    assert [len(a.token_ids) for a in answer_rows(model, rows, max_new_tokens=20)] == [20, 20]  # a cap is a cap


def test_the_context_caps_a_rows_budget_at_the_room_its_prompt_leaves():
    model = decoder_model()
    row = InstructionRow(1, ("Describe it:",), LONG)
    prompt = model.prompt_model.fmt.length(row_prompt(row))
    need = len(model.prompt_model.fmt.encode_answer(LONG))
    model.prompt_model.lm.decoder.max_len = prompt + need + 2  # room for the reference and 3 more, not the slack
    (answer,) = answer_rows(model, [row])
    assert len(answer.token_ids) == need + 3 < answer_budget(model, row)


@pytest.mark.parametrize("answer", ["red", "a small red star on the left"])
def test_short_reference_answers_keep_the_budget_of_48_the_demo_was_scored_with(answer):
    """The demo's figures (answer_rows with no max_new_tokens) must not move: its answers are short."""
    model = decoder_model()
    assert answer_budget(model, InstructionRow(1, ("Q",), answer)) == 48
