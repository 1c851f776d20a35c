"""Evaluation of a shared space on a manifest: each modality embedded once, the pairwise recall
report and zero-shot accuracy (`manifest_report`), the markdown tables, and `mmembed eval`
(`run_eval`, `run_eval_command`).

A retrieval is correct when the target's key equals the query's key: the manifest's row ids
(instance retrieval) or its `label` column (class/scene retrieval, when every row has one). The
table says which; a manifest with some rows unlabelled is matched by row, with a warning.
Recall@K and ranks are evaluate_recall.py, zero-shot classification evaluate_zero_shot.py, the
decoder's answers evaluate_instructions.py.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from mmembed.checkpoint import atomic_write_json, check_output_file
from mmembed.errors import UserError
from mmembed.evaluate_probe import probe_report, row_labels
from mmembed.evaluate_recall import check_finite, pairwise_report, shared_files_note
from mmembed.evaluate_zero_shot import (
    _accuracy,
    check_labels,
    check_templates,
    class_embeddings,
)
from mmembed.modality import Modality
from mmembed.retrieval.embed import embed_manifest

EvalKey = Literal["auto", "label", "row"]
log = logging.getLogger(__name__)
# what a hit is under each key, said above the table: the two give very different figures
_MATCHED_BY = {"label": "an item of the same label counts as a hit", "row": "only the row's own items count"}


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
                    prompt_modality: Modality | str = Modality.TEXT, linear_probe: str | Path | None = None,
                    all_captions: bool = False, progress: bool = False) -> dict[str, Any]:
    """The pairwise report plus provenance and, with `zero_shot_labels`, zero-shot accuracy; with
    `linear_probe` (a training manifest), a linear probe's accuracy (evaluate_probe.py). With
    `all_captions`, each row's alternative `captions` are text items too, keyed as the row: every
    caption queries, and a query finds its row through any of them (the COCO / Flickr30k protocol,
    five captions an image); "captions" counts them.

    Returns:
        {"manifest", "fingerprint", "key" ("label" or "row"), "rows" (rows measured), "unlabelled" (of
         those, rows without a label: with "auto", any makes the key "row"), "counts" (vectors per modality),
         "skipped" (rows left out: malformed, or with an unreadable item, which leaves the whole
         row out as training's validation does, so a logged val/recall is reproduced),
         "skipped_rows" ([{"line", "reason"}] of those, in line order), "ks", "pairs"
         (`pairwise_report`), and with labels "zero_shot": {modality: {"accuracy", "n"}} for every
         non-prompt modality, the truth being each row's `label_column` (rows whose truth is not
         a label are left out, as in `zero_shot_classify`)}, and with `linear_probe` "linear_probe":
         {modality: {"accuracy", "n", "train", "classes", "l2", "val_accuracy"}} for every modality
         both manifests hold, fitted on the training manifest's items by their `label_column`.
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
    lines, unlabelled = {r.line for r in rows}, {r.line for r in rows if r.label is None}
    if not use_label and (note := shared_files_note(list({r.line: r for r in rows}.values()), str(emb.path))):
        log.warning("%s", note)
    if key == "auto" and 0 < len(unlabelled) < len(lines):  # one such row moved recall@1 from 100 % to 57 %
        log.warning("%s: %d of %d rows have no label, so recall is matched by row (only a row's own items count), "
                    "not by label; give every row a label to match by label", emb.path, len(unlabelled), len(lines))
    keys = {m: [r.label if use_label else f"line:{r.line}" for r in part.rows] for m, part in emb.by_modality.items()}
    vectors = {m: part.vectors for m, part in emb.by_modality.items()}
    text = emb.by_modality.get(Modality.TEXT)
    extra = alternative_captions(model, text.rows, keys[Modality.TEXT], batch_size) \
        if all_captions and text is not None else None
    if extra is not None:
        vectors[Modality.TEXT] = torch.cat([vectors[Modality.TEXT], extra[0]])
        keys[Modality.TEXT] = [*keys[Modality.TEXT], *extra[1]]
    report = {"manifest": str(emb.path), "fingerprint": getattr(model, "fingerprint", None),
              "key": "label" if use_label else "row", "rows": len(lines), "unlabelled": len(unlabelled),
              "counts": {str(m): int(v.shape[0]) for m, v in vectors.items()},
              "skipped": len(emb.skipped), "ks": list(ks), "pairs": pairwise_report(vectors, keys, ks),
              "skipped_rows": [{"line": line, "reason": why} for line, _, why in emb.skipped]}
    if all_captions:
        report["captions"] = 0 if extra is None else len(extra[1])
    if zero_shot_labels:
        labels, prompt_modality = list(zero_shot_labels), Modality.parse(prompt_modality)
        classes = class_embeddings(model, labels, template, prompt_modality)  # (L, D)
        report["zero_shot"] = {str(m): _zero_shot_part(part.vectors, part.rows, classes, labels, label_column)
                               for m, part in emb.by_modality.items() if m != prompt_modality}
        report["zero_shot_templates"] = check_templates(template)
    if linear_probe is not None:
        report["linear_probe_manifest"] = str(linear_probe)
        report["linear_probe"] = probe_report(model, linear_probe, emb.by_modality, label_column, batch_size,
                                              progress)
    return report


def alternative_captions(model: Any, rows: Sequence[Any], keys: Sequence[str], batch_size: int = 64
                         ) -> tuple[Tensor, list[str]] | None:
    """The rows' alternative captions (`Row.captions`) embedded, (n, D), each keyed as its row
    (`keys`, one per row); None when the rows give none."""
    extra = [(caption, key) for row, key in zip(rows, keys) for caption in row.captions]
    if not extra:
        return None
    texts = [caption for caption, _ in extra]
    with torch.inference_mode():
        z = torch.cat([model.embed(Modality.TEXT, texts[s:s + batch_size]).float()
                       for s in range(0, len(texts), batch_size)])
    return z, [key for _, key in extra]


def _zero_shot_part(vectors: Tensor, rows: list, classes: Tensor, labels: list[str], column: str) -> dict[str, Any]:
    truth = row_labels(rows, column)
    check_finite(vectors, classes, what="a classification")
    predicted = [labels[i] for i in (vectors @ classes.T).argmax(dim=1).tolist()]  # (n,)
    accuracy, n = _accuracy(predicted, truth, labels)
    return {"accuracy": accuracy, "n": n}


def run_eval(run: str | Path | Any, manifest_path: str | Path, *, labels: Sequence[str] | None = None,
             template: str | Sequence[str] = "a photo of a {label}", label_column: str = "label",
             ks: Sequence[int] = (1, 5, 10),
             batch_size: int = 64, key: EvalKey = "auto", out: str | Path | None = None,
             linear_probe: str | Path | None = None, all_captions: bool = False,
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
                             template=template, label_column=label_column, linear_probe=linear_probe,
                             all_captions=all_captions, progress=progress)
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
    lines = [*_matched_by(report), *_captions_note(report), "| " + " | ".join(header) + " |",
             "|---|" + "---:|" * (len(header) - 1)]
    for name, m in pairs.items():
        cells = [name, *(f"{100 * m[f'recall@{k}']:.1f}" for k in ks), f"{m['median_rank']:g}", f"{m['mrr']:.3f}",
                 str(m["n_queries"])]
        lines.append("| " + " | ".join(cells) + " |")
    if not pairs:
        lines.append(f"| ({_no_pair(report)}) |" + " |" * (len(header) - 1))
    if report.get("zero_shot"):
        lines += ["", "| zero-shot | accuracy % | items |", "|---|---:|---:|"]
        for modality, z in report["zero_shot"].items():
            lines.append(f"| {modality} | {_percent(z['accuracy'])} | {z['n']} |")
        if not any(z["n"] for z in report["zero_shot"].values()):
            lines.append("\nno item's label is one of the class names: zero-shot needs --labels equal to the "
                         "manifest's label column (a built-in world's label names a whole scene)")
    if report.get("linear_probe"):
        lines += ["", "| linear probe | accuracy % | test items | training items | classes | L2 |",
                  "|---|---:|---:|---:|---:|---:|"]
        for modality, p in report["linear_probe"].items():
            lines.append(f"| {modality} | {_percent(p['accuracy'])} | {p['n']} | {p['train']} | {p['classes']} | "
                         f"{p['l2']:g} |")
        if not all(p["n"] for p in report["linear_probe"].values()):
            lines.append("\nn/a: no test item's label is among the labels the probe was trained on (its manifest's "
                         "label column)")
    if note := _skipped_note(report):
        lines.append(f"\n{note}")
    return "\n".join(lines)


def _percent(accuracy: float | None) -> str:
    return "n/a" if accuracy is None else f"{100 * accuracy:.1f}"


def _matched_by(report: dict[str, Any]) -> list[str]:
    """"matched by: ..." and a blank line, above a manifest report's table (a bare pairwise report has no key)."""
    if (key := report.get("key")) not in _MATCHED_BY:
        return []
    unlabelled, rows = report.get("unlabelled") or 0, report.get("rows") or 0
    partly = f"; {unlabelled} of {rows} rows have no label" if key == "row" and 0 < unlabelled < rows else ""
    return [f"matched by: {key} ({_MATCHED_BY[key]}{partly})", ""]


def _captions_note(report: dict[str, Any]) -> list[str]:
    """"text items: ...", and a blank line, above the table of an `all_captions` report."""
    if "captions" not in report:
        return []
    n = report["captions"]
    return [f"text items: each row's caption and the rows' {n} alternative captions (a row is found through any "
            "of them)" if n else "text items: each row's caption (the manifest gives no alternative captions)", ""]


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
    """UserError when no pair, no zero-shot item and no probed item was measured: an empty table exited 0."""
    zero_shot, probe = report.get("zero_shot") or {}, report.get("linear_probe") or {}
    if report["pairs"] or any(part["n"] for part in [*zero_shot.values(), *probe.values()]):
        return
    why = _no_pair(report)
    embedded = [m for m, n in report.get("counts", {}).items() if n]
    if zero_shot:
        why += "; and no item's label is one of the class names of --labels"
    if probe:
        why += "; and no item's label is among the labels of the linear probe's training manifest"
    classified = bool(zero_shot or probe)
    if not classified and embedded == [str(prompt_modality)]:  # the prompts' side: --labels classifies nothing
        why += "; give a manifest with a second modality"
    elif not classified and len(embedded) == 1:
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
    from mmembed.data.manifest import check_file
    from mmembed.data.synth.world_folder import check_complete
    from mmembed.evaluate_instructions import run_instruction_eval

    if args.manifest is None and args.all_captions:
        raise UserError("--all-captions queries with the captions of --manifest's rows: give --manifest too")
    if args.manifest is None and args.linear_probe is not None:
        raise UserError("--linear-probe fits on its manifest and scores the items of --manifest: give --manifest too")
    if args.manifest is None and args.instructions is None:
        raise UserError("give --manifest (retrieval), --instructions (the decoder's answers), or both")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.manifest is None and (args.labels or args.template is not None):  # they were ignored
        raise UserError("--labels and --template classify the items of --manifest: give --manifest too")
    if args.template is not None and not args.labels:
        raise UserError("--template words the zero-shot classes of --labels: give --labels too")
    if args.json_out is not None and not args.json_out.strip():  # it was written nowhere, without a word
        raise UserError("--json is empty; name the file to write")
    if args.linear_probe is not None and not args.linear_probe.strip():  # "" was checked as the folder "."
        raise UserError("--linear-probe is empty; name the training manifest")
    if args.json_out:  # refused before the evaluation, not after it
        inputs = [Path(p) for p in (args.manifest, args.instructions, args.linear_probe) if p]
        _check_json_out(Path(args.json_out), inputs, Path(args.run))
    for path, what in ((args.manifest, "manifest"), (args.instructions, "instruction manifest"),
                       (args.linear_probe, "linear probe's training manifest")):
        if path is not None:  # before the model loads (seconds), as `mmembed index` checks its manifest
            check_file(Path(path), what)
            check_complete(Path(path).parent)
    from mmembed.retrieval.embed import allowing_outside_root

    model = allowing_outside_root(mm.load(args.run), args.allow_outside_root)
    reports = {}
    if args.manifest is not None:
        template = "a photo of a {label}" if args.template is None else args.template  # "" is refused, not replaced
        table, reports["retrieval"] = run_eval(model, args.manifest, labels=args.labels, template=template,
                                               linear_probe=args.linear_probe, all_captions=args.all_captions)
        print(table)
    if args.instructions is not None:
        table, reports["instructions"] = run_instruction_eval(model, args.instructions,
                                                              max_new_tokens=args.max_new_tokens)
        print(table)
    if args.json_out:  # atomically, its folder made if need be, as run_eval's own --json
        atomic_write_json(Path(args.json_out), reports if len(reports) > 1 else next(iter(reports.values())))
    return 0
