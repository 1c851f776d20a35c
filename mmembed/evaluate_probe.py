"""Linear probe (CLIP's, Radford et al. 2021, section 3.2; LAION's clip_benchmark): a multinomial
logistic regression fitted on frozen embeddings of one manifest's items and scored on another's.
Where zero-shot asks whether the space placed an item near its class's words, the probe asks
whether the class can be read off the vectors at all.

As CLIP did, the L2 penalty is chosen on held-out training items: a fifth of them, dealt per label
(`data.splits.deal`, seeded; an item whose label would have none left to fit on stays in the fitted
part, so a label of one item is never held out), each penalty of `L2_GRID` fitted on the rest, the best validation
accuracy kept (ties: the larger penalty); the probe is then refitted on every training item. A fit
is full-batch L-BFGS on the mean cross-entropy plus `l2`·‖W‖² (the bias unpenalised): convex, so
the optimum does not depend on the start, and deterministic on one machine. `probe_report` is what
`mmembed eval --linear-probe` runs: the training manifest embedded, a probe per modality. Its cost: logits and
their gradients in float64, a few times N × classes × 8 bytes (N = 5,000 items of D = 512 in 100
classes: eight fits in 14 s on one busy core, about 840 MB).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import logging

import torch
from torch import Tensor

from mmembed.data.manifest import INLINE_MODALITIES, read_manifest
from mmembed.data.splits import deal
from mmembed.errors import UserError
from mmembed.evaluate_recall import check_finite
from mmembed.retrieval.embed import embed_manifest, outside_root_allowed

log = logging.getLogger(__name__)
L2_GRID = tuple(10.0 ** e for e in range(-6, 1))  # 1e-6 ... 1, on the mean loss
VALIDATION_SHARE = 0.2


class ProbeResult(NamedTuple):
    accuracy: float | None  # over the n test items whose label the probe was trained on; None if none
    n: int
    n_train: int
    classes: list[str]
    l2: float
    val_accuracy: float | None  # of the chosen penalty; None when too few items to hold any out


def fit_logistic(x: Tensor, y: Tensor, n_classes: int, l2: float, max_iter: int = 500) -> tuple[Tensor, Tensor]:
    """(weight (C, D), bias (C,)) minimising mean cross-entropy + l2·‖weight‖² over (N, D) features
    `x` and (N,) class indices `y`, by L-BFGS with a strong-Wolfe line search, in float64."""
    x = x.double()
    weight = torch.zeros(n_classes, x.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], lr=1, max_iter=max_iter, history_size=20, tolerance_grad=1e-9,
                            tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def objective() -> Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ weight.T + bias, y) + l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(objective)
    return weight.detach(), bias.detach()


def _hit_rate(x: Tensor, y: Tensor, weight: Tensor, bias: Tensor) -> float:
    return float(((x.double() @ weight.T + bias).argmax(dim=1) == y).double().mean())


def linear_probe(train_x: Tensor, train_labels: Sequence[Any], test_x: Tensor, test_labels: Sequence[Any], *,
                 l2: float | None = None, seed: int = 0) -> ProbeResult:
    """Fit on the training items with a label, score the test items whose label is among theirs
    (the others cannot be right and are left out of `n`, as zero-shot leaves them). `l2=None`
    chooses the penalty on a held-out fifth of the training items (module docstring)."""
    check_finite(train_x, test_x, what="a probe")
    keep = [i for i, label in enumerate(train_labels) if label is not None]
    classes = sorted({str(train_labels[i]) for i in keep})
    if len(classes) < 2:
        raise UserError(f"a linear probe needs training items of at least 2 labels, got {len(classes)}")
    index = {c: i for i, c in enumerate(classes)}
    x = train_x[keep].float()
    y = torch.tensor([index[str(train_labels[i])] for i in keep])
    val_accuracy = None
    if l2 is None:
        fit, held = deal(y.tolist(), (1 - VALIDATION_SHARE, VALIDATION_SHARE), seed)
        fitted = set(y[fit].tolist())  # a label dealt wholly to the held-out part could never be answered
        fit, held = (sorted([*fit, *(i for i in held if int(y[i]) not in fitted)]),
                     [i for i in held if int(y[i]) in fitted])
        if held and len(fitted) >= 2:
            scores = [(_hit_rate(x[held], y[held], *fit_logistic(x[fit], y[fit], len(classes), c)), c)
                      for c in L2_GRID]
            val_accuracy, l2 = max(scores)  # equal accuracies: the larger penalty
        else:  # labels of one item each stay in the fitted part: with every label so, nothing is held out
            l2 = L2_GRID[len(L2_GRID) // 2]
    weight, bias = fit_logistic(x, y, len(classes), l2)
    scored = [i for i, label in enumerate(test_labels) if label is not None and str(label) in index]
    if not scored:
        return ProbeResult(None, 0, len(keep), classes, l2, val_accuracy)
    truth = torch.tensor([index[str(test_labels[i])] for i in scored])
    return ProbeResult(_hit_rate(test_x[scored], truth, weight, bias), len(scored), len(keep), classes, l2,
                       val_accuracy)


def row_labels(rows: list, column: str) -> list[Any]:
    """Each row's class: its `label`, or the metadata column `column`."""
    return [r.label if column == "label" else r.meta.get(column) for r in rows]


def _check_apart(train_rows: list, test_rows: list, modality: Any, train_manifest: str | Path) -> None:
    """UserError when the probe would be fitted on the very files it is scored on (`--linear-probe` given
    the evaluated manifest read 92.5 for 91.1); a warning when some are shared. Texts are not compared:
    the same caption in both splits is the data's (170 of the world's 300 test captions are also
    training ones), not a mistake."""
    if modality in INLINE_MODALITIES:
        return
    fitted = {row.items.get(modality) for row in train_rows} - {None}
    shared = sum(row.items.get(modality) in fitted for row in test_rows)
    if shared and shared == len(test_rows):
        raise UserError(f"{train_manifest}: the linear probe would be fitted on every {modality} item it is scored on "
                        "(the evaluated manifest's own): give it a training manifest of other rows (e.g. train.jsonl)")
    if shared:
        log.warning("linear probe: %d of the %d %s items scored are also among its training items (%s): its "
                    "accuracy overstates what it does on unseen ones", shared, len(test_rows), modality, train_manifest)


def probe_report(model: Any, train_manifest: str | Path, test: dict, column: str, batch_size: int,
                 progress: bool) -> dict[str, dict[str, Any]]:
    """A linear probe per modality of both manifests: fitted on `train_manifest`'s items, scored on
    `test`'s; a modality only one of them holds is left out (logged)."""
    held = read_manifest(train_manifest, allow_outside_root=outside_root_allowed(model), bad_items="row").modalities
    shared = [m for m in test if m in held]
    if not shared:
        raise UserError(f"{train_manifest}: the linear probe's training manifest holds none of the evaluated "
                        f"modalities ({', '.join(map(str, test))})")
    if left := [str(m) for m in (*test, *held) if m not in shared]:
        log.info("linear probe: %s is in only one of the two manifests, not probed", ", ".join(dict.fromkeys(left)))
    train = embed_manifest(model, train_manifest, modalities=shared, batch_size=batch_size, progress=progress,
                           skip="row").by_modality
    report = {}
    for m in shared:
        _check_apart(train[m].rows, test[m].rows, m, train_manifest)
        try:
            result = linear_probe(train[m].vectors, row_labels(train[m].rows, column), test[m].vectors,
                                  row_labels(test[m].rows, column))
        except UserError as e:
            raise UserError(f"{train_manifest}: {m}: {e} (its classes are the '{column}' column)") from None
        report[str(m)] = {"accuracy": result.accuracy, "n": result.n, "train": result.n_train,
                          "classes": len(result.classes), "l2": result.l2, "val_accuracy": result.val_accuracy}
    return report
