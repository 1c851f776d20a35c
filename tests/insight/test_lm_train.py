"""Training one decoder as a language model: what its reported validation loss scores."""

import torch
import torch.nn.functional as F

from mmembed.decoder.model import Decoder
from mmembed.insight.lm_train import Recipe, train_lm


def _trained(val_rows: torch.Tensor) -> tuple[Decoder, float]:
    torch.manual_seed(0)
    train_rows = torch.randint(0, 40, (32, 9))
    decoder = Decoder(40, 16, 1, 2, max_len=8)
    result = train_lm(decoder, train_rows, val_rows, Recipe(batch_size=8, lr=1e-2, warmup_steps=1, eval_every=2,
                                                            eval_rows=8))
    assert result.curve[-1]["step"] == 4  # 32 rows, batches of 8: 4 steps
    return decoder, result.val_loss


def test_the_reported_validation_loss_scores_every_validation_row():
    """The loss scored the first eval_rows rows only: val_tokens changed the log line and nothing
    else (with the shipped config 8,192 of its 32,768 validation tokens were scored)."""
    val_rows = torch.randint(0, 40, (40, 9), generator=torch.Generator().manual_seed(1))
    decoder, val_loss = _trained(val_rows)
    decoder.eval()
    with torch.no_grad():
        logits = decoder(val_rows[:, :-1])  # (R, T, V)
        direct = float(F.cross_entropy(logits.flatten(0, 1), val_rows[:, 1:].flatten()))
        first = float(F.cross_entropy(decoder(val_rows[:8, :-1]).flatten(0, 1), val_rows[:8, 1:].flatten()))
    assert abs(val_loss - direct) < 1e-5 and abs(val_loss - first) > 1e-3
    _, fewer = _trained(val_rows[:16])  # the same training (same seed), fewer validation tokens
    assert abs(fewer - val_loss) > 1e-4


def test_the_curve_scores_the_same_validation_rows_as_the_reported_loss():
    """The curve scored eval_rows validation rows while the reported loss scored them all: the
    study's "val loss there" (the curve's lowest) and its final val loss were on different rows."""
    train_rows, val_rows = torch.randint(0, 40, (32, 9)), torch.randint(0, 40, (40, 9))

    def curve(eval_rows):
        torch.manual_seed(0)
        result = train_lm(Decoder(40, 16, 1, 2, max_len=8), train_rows, val_rows,
                          Recipe(batch_size=8, lr=1e-2, warmup_steps=1, eval_every=2, eval_rows=eval_rows))
        assert result.curve[-1]["val_loss"] == result.val_loss
        return [p["val_loss"] for p in result.curve]

    assert curve(8) == curve(32)  # eval_rows samples the training rows only
