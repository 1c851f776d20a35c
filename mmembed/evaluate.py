"""Evaluation of a shared space: cross-modal recall@K, ranks, zero-shot classification, tables.

A retrieval is correct when the target's key equals the query's key. With manifest row ids
as keys this is instance retrieval (the caption of row 7 must find the image of row 7); with
the `label` column it is class/scene retrieval (any image of scene "s3" counts).

Ranks are pessimistic about ties: the rank of a query is 1 + the number of *incorrect*
targets scoring at least as high as its best correct target (within 1e-6, so float rounding
never decides a tie), so a collapsed model (every score equal) gets the worst rank instead
of a perfect one.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import numbers
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor

from mmembed.checkpoint import atomic_write_json, check_output_file
from mmembed.errors import UserError
from mmembed.modality import Modality
from mmembed.retrieval.embed import embed_manifest

log = logging.getLogger(__name__)
_QUERY_BLOCK = 1024  # queries scored at once: bounds the (block, N) score matrix
_TIE = 1e-6  # scores this close count as tied (cosines of unit vectors; float32 rounding is ~1e-7)


def retrieval_metrics(query_emb: Tensor, target_emb: Tensor, query_keys: Sequence[str],
                      target_keys: Sequence[str], ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Recall@K and rank statistics of retrieving targets for queries by cosine similarity.

    Args:
        query_emb: (Q, D) unit vectors; target_emb: (N, D) unit vectors.
        query_keys / target_keys: one key per row; a target is correct iff its key equals the query's.
        ks: the K of recall@K.
    Returns:
        {"recall@K": fraction of queries with a correct target in the top K, ...,
         "median_rank", "mean_rank", "mrr" (1-based ranks of the first correct target),
         "n_queries" (with at least one correct target), "n_targets", "n_unmatched"
         (queries whose key no target has; left out of every figure)}.
    Raises:
        ValueError on mismatched lengths or dimensions, NaN/Inf embeddings, a K < 1, or when no
        query has a match.
    """
    _check_pair(query_emb, target_emb, query_keys, target_keys, ks)
    codes = {key: i for i, key in enumerate(dict.fromkeys([*target_keys, *query_keys]))}
    q_codes = torch.tensor([codes[k] for k in query_keys])  # (Q,)
    t_codes = torch.tensor([codes[k] for k in target_keys])  # (N,)
    matched = torch.isin(q_codes, t_codes)
    if not bool(matched.any()):
        raise ValueError("no query key occurs among the target keys: nothing can be retrieved correctly")
    queries, q_codes = query_emb[matched].float(), q_codes[matched]
    targets = target_emb.float()
    ranks = torch.cat([
        _first_correct_rank(queries[s:s + _QUERY_BLOCK] @ targets.T, q_codes[s:s + _QUERY_BLOCK], t_codes)
        for s in range(0, queries.shape[0], _QUERY_BLOCK)
    ]).double()  # (Q_matched,)
    out = {f"recall@{k}": float((ranks <= k).double().mean()) for k in ks}
    out.update(median_rank=float(ranks.quantile(0.5)), mean_rank=float(ranks.mean()),
               mrr=float((1 / ranks).mean()), n_queries=int(ranks.numel()), n_targets=int(targets.shape[0]),
               n_unmatched=int((~matched).sum()))
    return out


def _first_correct_rank(scores: Tensor, q_codes: Tensor, t_codes: Tensor) -> Tensor:
    """scores (B, N) -> (B,) 1-based rank of the best correct target (ties count against it)."""
    correct = q_codes[:, None] == t_codes[None, :]  # (B, N)
    best = scores.masked_fill(~correct, float("-inf")).amax(dim=1, keepdim=True)  # (B, 1)
    # "at least as high" up to float rounding: one item embedded at two places of a batch differs by ~1e-8
    return 1 + ((scores >= best - _TIE) & ~correct).sum(dim=1)


def _check_pair(q: Tensor, t: Tensor, q_keys: Sequence, t_keys: Sequence, ks: Sequence[int]) -> None:
    if q.dim() != 2 or t.dim() != 2 or q.shape[1] != t.shape[1]:
        raise ValueError(f"embeddings must be (Q, D) and (N, D) with equal D, got {tuple(q.shape)}, {tuple(t.shape)}")
    if len(q_keys) != q.shape[0] or len(t_keys) != t.shape[0]:
        raise ValueError(f"{len(q_keys)} query keys for {q.shape[0]} queries, "
                         f"{len(t_keys)} target keys for {t.shape[0]} targets")
    if not (bool(torch.isfinite(q).all()) and bool(torch.isfinite(t).all())):
        raise ValueError("embeddings contain NaN or Inf (a diverged model?); ranks would be meaningless")
    if not ks or any(isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1 for k in ks):
        raise ValueError(f"ks must be positive integers, got {list(ks)}")  # 1.5 was taken as 1, 0.5 "not positive"


def pairwise_report(embeddings: dict[Modality, Tensor], keys: dict[Modality, Sequence[str]],
                    ks: Sequence[int] = (1, 5, 10)) -> dict[str, dict[str, float]]:
    """`retrieval_metrics` for every ordered pair of distinct modalities, e.g. "text→image".

    A pair whose keys never match (e.g. row ids of disjoint rows) is left out and logged.
    """
    report = {}
    for a, b in itertools.permutations(embeddings, 2):
        name = f"{a}→{b}"
        try:
            report[name] = retrieval_metrics(embeddings[a], embeddings[b], keys[a], keys[b], ks)
        except ValueError as e:
            if "no query key" not in str(e):
                raise
            log.info("%s: left out, %s", name, e)
    return report


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


EvalKey = Literal["auto", "label", "row"]


def evaluate_manifest(model: Any, manifest_path: str | Path, *, ks: Sequence[int] = (1, 5, 10),
                      batch_size: int = 64, key: EvalKey = "auto", modalities: Sequence[Modality | str] | None = None,
                      progress: bool = False) -> dict[str, dict[str, float]]:
    """Embed each modality of a manifest once and return `pairwise_report` over them.

    Args:
        key: "label" (the label column: scene/class retrieval), "row" (manifest line:
            instance retrieval), or "auto" (labels when every row has one, else rows).
    """
    return manifest_report(model, manifest_path, ks=ks, batch_size=batch_size, key=key, modalities=modalities,
                           progress=progress)["pairs"]


def manifest_report(model: Any, manifest_path: str | Path, *, ks: Sequence[int] = (1, 5, 10), batch_size: int = 64,
                    key: EvalKey = "auto", modalities: Sequence[Modality | str] | None = None,
                    zero_shot_labels: Sequence[str] | None = None,
                    template: str | Sequence[str] = "a photo of a {label}", label_column: str = "label",
                    prompt_modality: Modality | str = Modality.TEXT, progress: bool = False) -> dict[str, Any]:
    """The pairwise report plus provenance and, with `zero_shot_labels`, zero-shot accuracy.

    Returns:
        {"manifest", "fingerprint", "key" ("label" or "row"), "counts" (vectors per modality),
         "skipped" (rows left out: malformed, or with an unreadable item, which leaves the whole
         row out as training's validation does, so a logged val/recall is reproduced),
         "skipped_rows" ([{"line", "reason"}] of those, in line order), "ks", "pairs"
         (`pairwise_report`), and with labels "zero_shot": {modality: {"accuracy", "n"}} for every
         non-prompt modality, the truth being each row's `label_column` (rows whose truth is not
         a label are left out, as in `zero_shot_classify`)}.
    Raises:
        UserError when labels are given and the manifest has no modality but the prompts'.
    """
    if key not in ("auto", "label", "row"):
        raise UserError(f"unknown eval key {key!r} (valid: auto, label, row)")
    if zero_shot_labels:  # before the manifest is embedded
        check_templates(template)
        check_labels(zero_shot_labels)
    emb = embed_manifest(model, manifest_path, modalities=modalities, batch_size=batch_size, progress=progress,
                         skip="row")
    if zero_shot_labels and not set(emb.by_modality) - {Modality.parse(prompt_modality)}:  # was dropped silently
        raise UserError(f"{emb.path}: zero-shot has nothing to classify: the manifest's only modality, "
                        f"{prompt_modality}, is the side of the label prompts; give a manifest with another "
                        "modality's column")
    rows = [r for part in emb.by_modality.values() for r in part.rows]
    use_label = key == "label" or (key == "auto" and bool(rows) and all(r.label is not None for r in rows))
    if use_label and (missing := next((r for r in rows if r.label is None), None)):
        raise UserError(f"{emb.path}:{missing.line}: row has no label (use key='row' or 'auto')")
    keys = {m: [r.label if use_label else f"line:{r.line}" for r in part.rows] for m, part in emb.by_modality.items()}
    vectors = {m: part.vectors for m, part in emb.by_modality.items()}
    report = {"manifest": str(emb.path), "fingerprint": getattr(model, "fingerprint", None),
              "key": "label" if use_label else "row", "counts": {str(m): int(v.shape[0]) for m, v in vectors.items()},
              "skipped": len(emb.skipped), "ks": list(ks), "pairs": pairwise_report(vectors, keys, ks),
              "skipped_rows": [{"line": line, "reason": why} for line, _, why in emb.skipped]}
    if zero_shot_labels:
        labels, prompt_modality = list(zero_shot_labels), Modality.parse(prompt_modality)
        classes = class_embeddings(model, labels, template, prompt_modality)  # (L, D)
        report["zero_shot"] = {str(m): _zero_shot_part(part.vectors, part.rows, classes, labels, label_column)
                               for m, part in emb.by_modality.items() if m != prompt_modality}
    return report


def _zero_shot_part(vectors: Tensor, rows: list, classes: Tensor, labels: list[str], column: str) -> dict[str, Any]:
    truth = [r.label if column == "label" else r.meta.get(column) for r in rows]
    predicted = [labels[i] for i in (vectors @ classes.T).argmax(dim=1).tolist()]  # (n,)
    accuracy, n = _accuracy(predicted, truth, labels)
    return {"accuracy": accuracy, "n": n}


def run_eval(run: str | Path | Any, manifest_path: str | Path, *, labels: Sequence[str] | None = None,
             template: str = "a photo of a {label}", label_column: str = "label", ks: Sequence[int] = (1, 5, 10),
             batch_size: int = 64, key: EvalKey = "auto", out: str | Path | None = None,
             progress: bool = True) -> tuple[str, dict[str, Any]]:
    """What `mmembed eval` runs: load the run (or take a model), report, and render the tables.

    Returns:
        (markdown tables, `manifest_report` dict); the report is also written to `out` as JSON.
    """
    if isinstance(run, (str, Path)):
        from mmembed.model import load

        model = load(run)
    else:
        model = run
    report = manifest_report(model, manifest_path, ks=ks, batch_size=batch_size, key=key, zero_shot_labels=labels,
                             template=template, label_column=label_column, progress=progress)
    _check_measured(report)
    if out is not None:
        atomic_write_json(Path(out), report)
    return format_table(report), report


def format_table(report: dict[str, Any], ks: Sequence[int] | None = None) -> str:
    """Markdown: one line per modality pair with recall@K, median rank, MRR and query count.

    Accepts a `pairwise_report` or a `manifest_report` (its "pairs", plus zero-shot accuracy).
    """
    pairs = report.get("pairs", report)
    if ks is None:
        ks = sorted({int(name.split("@")[1]) for m in pairs.values() for name in m if name.startswith("recall@")})
        ks = ks or list(report.get("ks", []))  # no pair measured: the report's own K
    header = ["pair", *(f"R@{k} %" for k in ks), "median rank", "MRR", "queries"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for name, m in pairs.items():
        cells = [name, *(f"{100 * m[f'recall@{k}']:.1f}" for k in ks), f"{m['median_rank']:g}", f"{m['mrr']:.3f}",
                 str(m["n_queries"])]
        lines.append("| " + " | ".join(cells) + " |")
    if not pairs:
        lines.append(f"| ({_no_pair(report)}) |" + " |" * (len(header) - 1))
    if report.get("zero_shot"):
        lines += ["", "| zero-shot | accuracy % | items |", "|---|---:|---:|"]
        for modality, z in report["zero_shot"].items():
            acc = "n/a" if z["accuracy"] is None else f"{100 * z['accuracy']:.1f}"
            lines.append(f"| {modality} | {acc} | {z['n']} |")
        if not any(z["n"] for z in report["zero_shot"].values()):
            lines.append("\nno item's label is one of the class names: zero-shot needs --labels equal to the "
                         "manifest's label column (a built-in world's label names a whole scene)")
    if note := _skipped_note(report):
        lines.append(f"\n{note}")
    return "\n".join(lines)


def _no_pair(report: dict[str, Any]) -> str:
    """Why a report has no pair: one modality embedded, or keys that never match across modalities."""
    embedded = [m for m, n in report.get("counts", {}).items() if n]
    if len(embedded) == 1:
        return f"only one modality ({embedded[0]}) in the manifest: no pair to retrieve between"
    return "no modality pair with matching keys"


def _skipped_note(report: dict[str, Any]) -> str:
    """The rows left out of every figure, as `mmembed eval --instructions` says its bad rows."""
    if not (skipped := report.get("skipped") or 0):
        return ""
    first = report.get("skipped_rows") or []
    where = f" (first, line {first[0]['line']}: {first[0]['reason']})" if first else ""
    return f"not measured: {skipped} bad row(s), left out whole as validation leaves them{where}"


def _check_measured(report: dict[str, Any], prompt_modality: Modality = Modality.TEXT) -> None:
    """UserError when no pair and no zero-shot item was measured: an empty table exited 0."""
    zero_shot = report.get("zero_shot") or {}
    if report["pairs"] or any(z["n"] for z in zero_shot.values()):
        return
    why = _no_pair(report)
    embedded = [m for m, n in report.get("counts", {}).items() if n]
    if zero_shot:
        why += "; and no item's label is one of the class names of --labels"
    elif embedded == [str(prompt_modality)]:  # the prompts' side: --labels has nothing to classify either
        why += "; give a manifest with a second modality"
    elif len(embedded) == 1:
        why += "; give --labels to classify its items, or a manifest with a second modality"
    note = _skipped_note(report)
    raise UserError(f"{report['manifest']}: nothing measured: {why}" + (f"; {note}" if note else ""))


def _check_json_out(out: Path, inputs: list[Path], run: Path) -> None:
    """UserError unless the report can go to `out`: not a folder, not under a file, not one of the
    files it is made from (a manifest: it was overwritten after the work), and, in the run folder,
    nothing under checkpoints/ and no existing file but an earlier report (trainer.json was replaced
    silently, and --resume broke)."""
    from mmembed.train.run_dir import CHECKPOINTS

    check_output_file(out, "--json")  # before the evaluation, not after it
    target, run = out.resolve(), run.resolve()
    if any(target == p.resolve() for p in inputs):
        raise UserError(f"--json {out} would overwrite an input of this evaluation (a manifest); name another file")
    if not target.is_relative_to(run):
        return
    if CHECKPOINTS in target.relative_to(run).parts:  # --resume reads every file of a checkpoint
        raise UserError(f"--json {out} is inside the run's {CHECKPOINTS}/ folder, which --resume reads; "
                        "name a file outside it")
    if target.is_file() and not _is_report(target):  # a report may replace an earlier report only
        raise UserError(f"--json {out} would overwrite an input of this evaluation (one of the run's files, "
                        "not an eval report); name another file")


_REPORT_KEYS = ({"ks", "pairs"}, {"tasks", "answers"})  # manifest_report's, instruction_report's


def _is_report(path: Path) -> bool:
    """Whether `path` holds a report `mmembed eval --json` wrote: one of the two, or both by name."""
    if path.suffix != ".json":  # unread: it may be the run's weights, gigabytes of them
        return False
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    both = isinstance(report, dict) and report and set(report) <= {"retrieval", "instructions"}
    parts = list(report.values()) if both else [report]
    return all(isinstance(part, dict) and any(keys <= part.keys() for keys in _REPORT_KEYS) for part in parts)


def run_eval_command(args: argparse.Namespace) -> int:
    """`mmembed eval RUN --manifest M --instructions I`: print retrieval and/or the decoder's answers;
    `--json F` keeps the report. The options are defined in `mmembed.cli`."""
    import mmembed as mm
    from mmembed.evaluate_instructions import run_instruction_eval

    if args.manifest is None and args.instructions is None:
        raise UserError("give --manifest (retrieval), --instructions (the decoder's answers), or both")
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.manifest is None and (args.labels or args.template is not None):  # they were ignored
        raise UserError("--labels and --template classify the items of --manifest: give --manifest too")
    if args.template is not None and not args.labels:
        raise UserError("--template words the zero-shot classes of --labels: give --labels too")
    if args.json_out is not None and not args.json_out.strip():  # it was written nowhere, without a word
        raise UserError("--json is empty; name the file to write")
    if args.json_out:  # refused before the evaluation, not after it
        _check_json_out(Path(args.json_out), [Path(p) for p in (args.manifest, args.instructions) if p], Path(args.run))
    model = mm.load(args.run)
    reports = {}
    if args.manifest is not None:
        template = "a photo of a {label}" if args.template is None else args.template  # "" is refused, not replaced
        table, reports["retrieval"] = run_eval(model, args.manifest, labels=args.labels, template=template)
        print(table)
    if args.instructions is not None:
        table, reports["instructions"] = run_instruction_eval(model, args.instructions,
                                                              max_new_tokens=args.max_new_tokens)
        print(table)
    if args.json_out:  # atomically, its folder made if need be, as run_eval's own --json
        atomic_write_json(Path(args.json_out), reports if len(reports) > 1 else next(iter(reports.values())))
    return 0
