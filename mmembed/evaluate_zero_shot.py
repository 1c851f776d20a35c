"""Zero-shot classification (CLIP's): items classified by their nearest label prompt, with prompt
ensembling over templates (`zero_shot_classify`, `class_embeddings`), and the checks on labels and
templates. `manifest_report` (evaluate.py) uses it for a manifest's zero-shot accuracy.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from mmembed.errors import UserError
from mmembed.modality import Modality
from mmembed.evaluate_recall import check_finite


class ZeroShotResult(NamedTuple):
    predictions: list[str]
    accuracy: float | None  # over the `n` items whose truth is a label; None without truth or such items
    n: int  # the items the accuracy counts (0 without `truth`)


def zero_shot_classify(model: Any, items: Sequence[Any], modality: Modality | str, labels: Sequence[str],
                       template: str | Sequence[str] = "a photo of a {label}", *, truth: Sequence[str] | None = None,
                       prompt_modality: Modality | str = Modality.TEXT, batch_size: int = 64) -> ZeroShotResult:
    """Classify items by their nearest label prompt (CLIP zero-shot).

    Each label becomes `template.format(label=...)`; with several templates the label's prompt
    embeddings are averaged and renormalised (CLIP's prompt ensembling).

    Args:
        model: anything with `embed(modality, items) -> (N, D)` unit vectors.
        items: raw items of `modality`; labels: the candidate class names (unique).
        truth: the true label per item, to compute accuracy; an item whose truth is not among
            `labels` (or None) cannot be right and is left out of it, as `manifest_report` does.
    Returns:
        ZeroShotResult(predictions of every item, accuracy over the n items whose truth is a label, n).
    """
    if truth is not None and len(truth) != len(items):
        raise UserError(f"{len(truth)} truth labels for {len(items)} items")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    classes = class_embeddings(model, labels, template, prompt_modality)  # (L, D)
    with torch.inference_mode():
        z_items = torch.cat([model.embed(modality, list(items[s:s + batch_size])).float()
                             for s in range(0, len(items), batch_size)]) if len(items) else classes[:0]
    check_finite(z_items, classes, what="a classification")
    predictions = [labels[i] for i in (z_items @ classes.T).argmax(dim=1).tolist()]  # (N,)
    return ZeroShotResult(predictions, *_accuracy(predictions, truth, labels))


def class_embeddings(model: Any, labels: Sequence[str], template: str | Sequence[str] = "a photo of a {label}",
                     prompt_modality: Modality | str = Modality.TEXT) -> Tensor:
    """(L, D) unit vectors: each label's prompts embedded, averaged over templates, renormalised."""
    templates = check_templates(template)
    check_labels(labels)
    prompts = [t.format(label=label) for label in labels for t in templates]
    with torch.inference_mode():
        z = model.embed(prompt_modality, prompts).float().view(len(labels), len(templates), -1)
    return torch.nn.functional.normalize(z.mean(dim=1), dim=1)


def check_labels(labels: Sequence[str]) -> None:
    if isinstance(labels, str):  # "circle" was read as the labels c, i, r, c, l, e
        raise UserError(f"zero-shot labels must be a list of class names, got the one string {labels!r}")
    if not labels or len(set(labels)) != len(labels) or not all(str(label).strip() for label in labels):
        raise UserError(f"zero-shot labels must be a non-empty list of unique, non-blank names, got {list(labels)}")


def check_templates(template: str | Sequence[str]) -> list[str]:
    """The zero-shot templates as a list; UserError unless each formats with `label` alone and puts
    the label in its text (`"{{label}}"` is a literal brace pair: every class would get one prompt)."""
    templates = [template] if isinstance(template, str) else list(template)
    if not templates:
        raise UserError("zero-shot needs at least one template, e.g. 'a photo of a {label}'")
    for t in templates:
        try:
            filled = t.format(label="\0")
        except (KeyError, IndexError, ValueError, AttributeError) as e:
            raise UserError(f"zero-shot template {t!r} does not format with {{label}} alone "
                            f"({type(e).__name__}: {e}); write literal braces as {{{{ }}}}") from None
        if "\0" not in filled:
            raise UserError(f"every template must contain '{{label}}', got {t!r}")
    return templates


def _accuracy(predictions: Sequence[str], truth: Sequence[Any] | None,
              labels: Sequence[str]) -> tuple[float | None, int]:
    """(accuracy, n) over the items whose truth is one of `labels`: the others cannot be right, and
    counting them wrong made the two zero-shot entry points disagree on the same items."""
    if truth is None:
        return None, 0
    classes = set(labels)
    scored = [(p, str(t)) for p, t in zip(predictions, truth) if t is not None and str(t) in classes]
    if not scored:
        return None, 0
    return sum(p == t for p, t in scored) / len(scored), len(scored)
