"""Recall@K and ranks on hand-made examples, the pairwise report, zero-shot, manifest evaluation."""

import json
import math

import pytest
import torch

from mmembed.cli import main
from mmembed.errors import UserError
from mmembed.evaluate import evaluate_manifest, format_table, run_eval
from mmembed.evaluate_recall import pairwise_report, retrieval_metrics
from mmembed.evaluate_zero_shot import zero_shot_classify
from mmembed.modality import Modality
from tests.retrieval.fakes import FakeModel

normalize = torch.nn.functional.normalize
E = torch.eye(4)


def test_hand_made_ranks_and_recall():
    targets = E  # keys a, b, c, d
    queries = normalize(torch.stack([
        E[0],                         # key a: its target scores 1.0 -> rank 1
        2 * E[2] + E[1],              # key b: c scores higher than b -> rank 2
        3 * E[3] + 2 * E[0] + E[2],   # key c: d and a score higher -> rank 3
        E[1],                         # key z: no target has it -> unmatched
    ]), dim=1)
    m = retrieval_metrics(queries, targets, ["a", "b", "c", "z"], ["a", "b", "c", "d"], ks=(1, 2, 5))
    assert m["recall@1"] == pytest.approx(1 / 3) and m["recall@2"] == pytest.approx(2 / 3)
    assert m["recall@5"] == 1.0
    assert m["median_rank"] == 2.0 and m["mean_rank"] == 2.0
    assert m["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 3) / 3)
    assert (m["n_queries"], m["n_targets"], m["n_unmatched"]) == (3, 4, 1)


def test_class_level_keys_and_even_median():
    # two targets share key "x": the better one counts
    targets = torch.stack([E[0], E[1], E[2], E[3]])
    queries = normalize(torch.stack([E[1] + 0.1 * E[0], E[2] + 0.5 * E[0], E[3],
                                     3 * E[1] + 2 * E[2] + E[0]]), dim=1)
    m = retrieval_metrics(queries, targets, ["x", "x", "w", "w"], ["x", "y", "x", "w"], ks=(1,))
    # ranks: q0 -> t0 behind t1: 2; q1 -> t2 first: 1; q2 -> t3: 1; q3 -> t3 behind t1, t2, t0: 4
    assert m["median_rank"] == 1.5 and m["mean_rank"] == 2.0 and m["recall@1"] == 0.5


def test_ties_count_against_the_query():
    collapsed = torch.ones(5, 3) / math.sqrt(3)  # every score equal
    m = retrieval_metrics(collapsed, collapsed, list("abcde"), list("abcde"), ks=(1, 5))
    assert m["recall@1"] == 0.0 and m["median_rank"] == 5.0 and m["recall@5"] == 1.0


def test_float_rounding_never_decides_a_tie():
    """One item embedded at two places of a batch differs by ~1e-8: a duplicate target scoring a hair
    above the correct one ties with it (pessimistically), whatever the batch size rounded."""
    query = E[:1, :3]
    target = torch.tensor([0.6, 0.8, 0.0])
    for wrong in (torch.tensor([0.6 - 1e-7, 0.8, 0.0]), torch.tensor([0.6 + 1e-7, 0.8, 0.0])):  # scores 1e-7 apart
        assert float(query @ wrong) != float(query @ target)
        m = retrieval_metrics(query, torch.stack([target, wrong]), ["a"], ["a", "b"], ks=(1,))
        assert m["recall@1"] == 0.0 and m["median_rank"] == 2.0


def test_equals_argsort_reference_on_random_data():
    g = torch.Generator().manual_seed(0)
    q, t = normalize(torch.randn(300, 8, generator=g), dim=1), normalize(torch.randn(200, 8, generator=g), dim=1)
    q_keys = [str(i % 50) for i in range(300)]
    t_keys = [str(i % 60) for i in range(200)]
    m = retrieval_metrics(q, t, q_keys, t_keys, ks=(1, 10))
    order = torch.argsort(q @ t.T, dim=1, descending=True).tolist()
    ranks = [next(pos + 1 for pos, j in enumerate(row) if t_keys[j] == key) for row, key in zip(order, q_keys)]
    assert m["recall@10"] == pytest.approx(sum(r <= 10 for r in ranks) / 300)
    assert m["median_rank"] == pytest.approx(float(torch.tensor(ranks, dtype=torch.float64).quantile(0.5)))


def test_the_score_blocks_stay_bounded_by_the_number_of_targets(monkeypatch):
    """Blocks of 1,024 queries were scored against every target at once: ~13 GB at 1M targets."""
    import mmembed.evaluate_recall as er

    g = torch.Generator().manual_seed(0)
    q, t = normalize(torch.randn(700, 8, generator=g), dim=1), normalize(torch.randn(5000, 8, generator=g), dim=1)
    q_keys, t_keys = [str(i % 40) for i in range(700)], [str(i % 90) for i in range(5000)]
    whole = retrieval_metrics(q, t, q_keys, t_keys)
    seen, rank = [], er._first_correct_rank
    monkeypatch.setattr(er, "_first_correct_rank", lambda s, *a: seen.append(s.numel()) or rank(s, *a))
    monkeypatch.setattr(er, "_BLOCK_SCORES", 300_000, raising=False)  # 60 queries a block
    assert retrieval_metrics(q, t, q_keys, t_keys) == whole
    assert max(seen) <= 300_000 and sum(seen) == 700 * 5000


def test_bad_arguments():
    with pytest.raises(ValueError, match="no query key"):
        retrieval_metrics(E, E, list("abcd"), list("wxyz"))
    with pytest.raises(ValueError, match="3 query keys for 4 queries"):
        retrieval_metrics(E, E, list("abc"), list("abcd"))
    with pytest.raises(ValueError, match="equal D"):
        retrieval_metrics(E, torch.eye(3), list("abcd"), list("abc"))
    with pytest.raises(ValueError, match="NaN or Inf"):
        retrieval_metrics(E * float("nan"), E, list("abcd"), list("abcd"))
    for ks in ((0,), (1.5,), (0.5,)):  # 1.5 was taken (recall@1 reported as recall@1.5)
        with pytest.raises(ValueError, match="ks must be positive integers"):
            retrieval_metrics(E, E, list("abcd"), list("abcd"), ks=ks)


def test_pairwise_report_covers_every_ordered_pair():
    emb = {Modality.TEXT: E, Modality.IMAGE: E, Modality.AUDIO: E[:2]}
    keys = {Modality.TEXT: list("abcd"), Modality.IMAGE: list("abcd"), Modality.AUDIO: list("ab")}
    report = pairwise_report(emb, keys, ks=(1,))
    assert set(report) == {"text→image", "image→text", "text→audio", "audio→text", "image→audio", "audio→image"}
    assert report["text→audio"]["n_queries"] == 2 and report["text→audio"]["n_unmatched"] == 2
    assert all(m["recall@1"] == 1.0 for m in report.values())
    keys[Modality.AUDIO] = ["p", "q"]  # disjoint keys: the audio pairs are left out
    assert set(pairwise_report(emb, keys)) == {"text→image", "image→text"}
    table = format_table(report)
    assert table.splitlines()[0] == "| pair | R@1 % | median rank | MRR | queries |"
    assert "| text→image | 100.0 | 1 | 1.000 | 4 |" in table


def test_zero_shot_classify():
    model = FakeModel(noise=0.2)
    items = ["img/c2.png", "img/c0.png", "img/c1.png", "img/c2.png"]
    result = zero_shot_classify(model, items, "image", ["c0", "c1", "c2"], truth=["c2", "c0", "c1", "c0"])
    assert result.predictions == ["c2", "c0", "c1", "c2"] and result.accuracy == 0.75
    ensembled = zero_shot_classify(model, items, "image", ["c0", "c1", "c2"], ["a photo of {label}", "{label}"],
                                   batch_size=3)
    assert ensembled.predictions == result.predictions and ensembled.accuracy is None
    with pytest.raises(UserError, match="must contain"):
        zero_shot_classify(model, items, "image", ["c0"], template="a photo")
    with pytest.raises(UserError, match="a list of class names, got the one string 'circle'"):
        zero_shot_classify(model, items, "image", "circle")
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):  # range() arg 3 must not be zero
        zero_shot_classify(model, items, "image", ["c0", "c1"], batch_size=0)
    with pytest.raises(UserError, match="must contain"):  # literal braces: every class would get one prompt
        zero_shot_classify(model, items, "image", ["c0"], template="a {{label}}")
    for bad in ("{label} {x}", "{label}{}", "{label}{"):  # KeyError, IndexError, ValueError tracebacks before
        with pytest.raises(UserError, match="does not format with {label} alone"):
            zero_shot_classify(model, items, "image", ["c0"], template=bad)
    with pytest.raises(UserError, match="unique"):
        zero_shot_classify(model, items, "image", ["c0", "c0"])


def test_a_classification_of_nan_embeddings_is_refused_as_retrieval_is():
    """Zero-shot and the probe took an argmax of NaN rows (index 0): a diverged model scored 0.75, every
    item given the first label, where retrieval refused it."""
    from mmembed.evaluate_probe import linear_probe

    class Diverged(FakeModel):
        def embed(self, modality, items):
            z = super().embed(modality, items)
            return torch.full_like(z, float("nan")) if str(modality) == "image" else z

    items = ["img/c0.png"] * 3 + ["img/c1.png"]
    with pytest.raises(ValueError, match="NaN or Inf .* a classification would be meaningless"):
        zero_shot_classify(Diverged(noise=0.2), items, "image", ["c0", "c1"], truth=["c0", "c0", "c0", "c1"])
    clean = torch.nn.functional.normalize(torch.randn(8, 4, generator=torch.Generator().manual_seed(0)), dim=1)
    with pytest.raises(UserError, match="NaN or Inf .* a probe would be meaningless"):
        linear_probe(clean, list("aabbaabb"), torch.full((4, 4), float("nan")), list("aaab"))


def test_duplicate_zero_shot_labels_are_refused_before_the_manifest_is_embedded(monkeypatch, tmp_path):
    from mmembed import evaluate

    monkeypatch.setattr(evaluate, "embed_manifest", lambda *a, **k: pytest.fail("embedded before the check"))
    with pytest.raises(UserError, match="unique"):
        evaluate.manifest_report(object(), tmp_path / "m.jsonl", zero_shot_labels=["a", "a"])


@pytest.fixture
def manifest(tmp_path):
    rows = [{"text": f"a c{i}", "image": f"img/c{i}.png", "label": f"s{i % 3}"} for i in range(9)]
    rows.append({"text": "a c9"})  # a row with one modality
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_evaluate_manifest_instance_and_label_keys(manifest, tmp_path):
    model = FakeModel(noise=0.1)
    by_row = evaluate_manifest(model, manifest, key="row", ks=(1, 5))
    assert set(by_row) == {"text→image", "image→text"}
    assert by_row["text→image"]["recall@1"] == 1.0 and by_row["text→image"]["n_unmatched"] == 1
    assert by_row["image→text"]["n_targets"] == 10
    by_label = evaluate_manifest(model, manifest, key="auto", ks=(1,))  # rows lack labels -> row ids
    assert by_label == evaluate_manifest(model, manifest, key="row", ks=(1,))
    with pytest.raises(UserError, match=":10: row has no label"):
        evaluate_manifest(model, manifest, key="label")
    _, report = run_eval(model, manifest, key="row", out=tmp_path / "eval.json", progress=False)
    assert report["key"] == "row" and report["counts"] == {"text": 10, "image": 9}
    assert json.loads((tmp_path / "eval.json").read_text())["pairs"] == json.loads(json.dumps(report["pairs"]))
    assert "text→image" in format_table(report)
    one_modality = {"ks": [1, 5], "pairs": {}}
    assert "R@1 % | R@5 %" in format_table(one_modality)  # the header kept its K columns


def test_zero_shot_labels_that_match_no_item_say_so():
    """`eval --labels circle square` on the built-in world (whose labels name whole scenes) printed
    "n/a | 0" rows and nothing else."""
    report = {"pairs": {}, "zero_shot": {"image": {"accuracy": None, "n": 0}, "audio": {"accuracy": None, "n": 0}}}
    assert "no item's label is one of the class names" in format_table(report)
    report["zero_shot"]["image"] = {"accuracy": 0.5, "n": 4}
    assert "no item's label" not in format_table(report)


def test_a_table_without_pairs_or_zero_shot_items_says_when_items_were_unreadable():
    """Every image missing: the table blamed the keys and the --labels values, not the skipped files."""
    report = {"ks": [1], "pairs": {}, "skipped": 2, "zero_shot": {}}
    table = format_table(report)
    assert "(no modality pair with matching keys)" in table and "not measured: 2 bad row(s)" in table
    report["zero_shot"] = {"image": {"accuracy": None, "n": 0}}
    assert "class names" in format_table(report) and "not measured: 2 bad row(s)" in format_table(report)
    assert "bad row" not in format_table({"ks": [1], "pairs": {}, "skipped": 0})


@pytest.mark.parametrize("labels", [["circle", ""], ["  ", "square"], [], ["a", "a"], "circle"])
def test_zero_shot_labels_are_unique_non_blank_names(labels):
    """`eval --labels ""` was a class: every item could be "a photo of a "."""
    from mmembed.evaluate_zero_shot import check_labels

    with pytest.raises(UserError, match="zero-shot labels must be"):
        check_labels(labels)


def test_a_json_report_never_replaces_a_run_file_nor_goes_under_checkpoints(tmp_path):
    """--json RUN/checkpoints/step_N/trainer.json (then --resume broke) or RUN/demo.json was silently replaced."""
    from mmembed.evaluate import _check_json_out

    run = tmp_path / "run"
    step = run / "checkpoints" / "step_0000010"
    step.mkdir(parents=True)
    (step / "trainer.json").write_text(json.dumps({"optimizer": {}, "progress": {}, "python_rng": []}))
    (run / "demo.json").write_text(json.dumps({"test": {}, "heldout": {}}))
    for out, why in [(step / "trainer.json", "inside the run's checkpoints/ folder"),
                     (step / "report.json", "inside the run's checkpoints/ folder"),
                     (run / "demo.json", "one of the run's files, not an eval report")]:
        with pytest.raises(UserError, match=why) as refused:
            _check_json_out(out, [], run)
        assert str(out) in str(refused.value) and "\n" not in str(refused.value)
    retrieval, instructions = {"ks": [1], "pairs": {}}, {"tasks": {}, "answers": []}
    for name, earlier in [("r.json", retrieval), ("i.json", instructions),
                          ("b.json", {"retrieval": retrieval, "instructions": instructions})]:
        (run / name).write_text(json.dumps(earlier))
        _check_json_out(run / name, [], run)  # an earlier report may be replaced
    _check_json_out(run / "new.json", [], run)
    _check_json_out(tmp_path / "demo.json", [], run)  # outside the run: the user's own file


def _write(path, rows, extra: str = ""):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + extra)
    return path


def test_a_one_modality_manifest_says_so_and_measuring_nothing_is_an_error(tmp_path):
    """An image-only manifest printed "(no modality pair with matching keys)" and exited 0; a text-only
    one with --labels dropped the asked zero-shot without a word ("pairs": {}, "zero_shot": {})."""
    from mmembed.evaluate import manifest_report

    images = _write(tmp_path / "img.jsonl", [{"image": f"img/c{i}.png", "label": f"c{i}"} for i in range(4)])
    with pytest.raises(UserError, match=r"nothing measured: only one modality \(image\) in the manifest: no pair "
                                        "to retrieve between; give --labels"):
        run_eval(FakeModel(), images, progress=False)
    table, report = run_eval(FakeModel(), images, labels=["c0", "c1", "c2", "c3"], template="{label}", progress=False)
    assert report["zero_shot"]["image"]["n"] == 4  # zero-shot measured something: no error
    assert "| (only one modality (image) in the manifest: no pair to retrieve between) |" in table
    with pytest.raises(UserError, match="no item's label is one of the class names"):
        run_eval(FakeModel(), images, labels=["x", "y"], template="{label}", progress=False)
    texts = _write(tmp_path / "text.jsonl", [{"text": f"a c{i}", "label": f"c{i}"} for i in range(4)])
    with pytest.raises(UserError, match=r"zero-shot has nothing to classify: the manifest's only modality, text, "):
        manifest_report(FakeModel(), texts, zero_shot_labels=["c0", "c1"], template="{label}")
    with pytest.raises(UserError, match=r"only one modality \(text\) .*; give a manifest with a second modality$"):
        run_eval(FakeModel(), texts, progress=False)  # not "give --labels": text is the prompts' side


def test_both_zero_shot_entry_points_score_the_same_items(tmp_path):
    """An item whose truth is not a class counted as wrong in `zero_shot_classify` and was left out by
    `manifest_report`: the same items gave two accuracies (0.3425 on 146 against 0.3906 on 128)."""
    from mmembed.evaluate import manifest_report

    truth = ["c0", "c1", "c2", "c9", "c9", "c1"]  # c9 is no class: it cannot be predicted
    items = [f"img/{t}.png" for t in truth]
    result = zero_shot_classify(FakeModel(noise=0.1), items, "image", ["c0", "c1", "c2"], "{label}", truth=truth)
    assert (result.accuracy, result.n) == (1.0, 4) and len(result.predictions) == 6
    path = _write(tmp_path / "m.jsonl", [{"image": item, "label": t} for item, t in zip(items, truth)])
    report = manifest_report(FakeModel(noise=0.1), path, zero_shot_labels=["c0", "c1", "c2"], template="{label}")
    assert report["zero_shot"]["image"] == {"accuracy": result.accuracy, "n": result.n}
    none = zero_shot_classify(FakeModel(), items[3:5], "image", ["c0", "c1"], "{label}", truth=truth[3:5])
    assert (none.accuracy, none.n) == (None, 0)


def test_the_retrieval_table_says_how_many_rows_were_left_out(tmp_path):
    """The table named no skipped row unless no pair was measured; `--instructions` names them always."""
    rows = [{"text": f"a c{i}", "image": f"img/c{i}.png"} for i in range(5)]
    rows[1]["image"] = "img/broken1.png"
    path = _write(tmp_path / "m.jsonl", rows, "{not json\n")
    table, report = run_eval(FakeModel(), path, key="row", progress=False)
    assert report["counts"] == {"text": 4, "image": 4} and report["skipped"] == 2
    assert table.splitlines()[-1] == ("not measured: 2 bad row(s), left out whole as validation leaves them "
                                      f"(first, line 2: image: cannot read {tmp_path / 'img/broken1.png'})")
    assert "bad row" not in run_eval(FakeModel(), _write(tmp_path / "ok.jsonl", rows[:1] + rows[2:]),
                                      progress=False)[0]


def test_the_table_says_how_items_were_matched_and_a_partly_labelled_manifest_warns(tmp_path, caplog):
    """One unlabelled row switched the whole report from label to row matching (recall@1 100 % -> 57 %)
    without a word; only `--json` showed "key"."""
    import logging

    rows = [{"text": f"a c{i}", "image": f"img/c{i}.png", "label": f"s{i % 2}"} for i in range(4)]
    with caplog.at_level(logging.WARNING):
        table, report = run_eval(FakeModel(), _write(tmp_path / "all.jsonl", rows), progress=False)
    assert table.splitlines()[:2] == ["matched by: label (an item of the same label counts as a hit)", ""]
    assert (report["key"], report["rows"], report["unlabelled"]) == ("label", 4, 0) and not caplog.text
    partly = _write(tmp_path / "partly.jsonl", [*rows, {"text": "a c9", "image": "img/c9.png"}])
    with caplog.at_level(logging.WARNING):
        table, report = run_eval(FakeModel(), partly, progress=False)
    assert table.splitlines()[0] == "matched by: row (only the row's own items count; 1 of 5 rows have no label)"
    assert (report["key"], report["rows"], report["unlabelled"]) == ("row", 5, 1)
    assert "partly.jsonl: 1 of 5 rows have no label, so recall is matched by row" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # asked for by row: nothing to warn about
        table, _ = run_eval(FakeModel(), _write(tmp_path / "rows.jsonl", rows), key="row", progress=False)
        run_eval(FakeModel(), partly, key="row", progress=False)
    assert table.splitlines()[0] == "matched by: row (only the row's own items count)" and not caplog.text
    assert format_table({"ks": [1], "pairs": {}}).startswith("| pair |")  # a bare pairwise report has no key


def test_all_captions_query_with_every_caption_and_find_a_row_through_any(tmp_path, capsys):
    """COCO / Flickr30k: each caption a query; an image is found by its row's captions, any of them."""
    from mmembed.evaluate import manifest_report

    rows = [{"image": f"img/c{i}.png", "text": f"a c{i}", "captions": [f"the c{i}", f"one c{9 - i}"]}
            for i in range(4)]  # the second alternative names a concept no image shows: a wrong caption
    path = _write(tmp_path / "m.jsonl", rows)
    plain = manifest_report(FakeModel(), path)
    both = manifest_report(FakeModel(), path, all_captions=True)
    assert plain["pairs"]["text→image"]["n_queries"] == 4 and "captions" not in plain
    assert both["captions"] == 8 and both["pairs"]["text→image"]["n_queries"] == 12
    assert both["pairs"]["text→image"]["recall@1"] == pytest.approx(8 / 12)  # the wrong captions miss
    assert both["pairs"]["image→text"]["recall@1"] == 1.0  # found through either of its right captions
    assert main(["eval", str(tmp_path), "--all-captions"]) == 2
    assert "--all-captions queries with the captions of --manifest's rows" in capsys.readouterr().err
    table, _ = run_eval(FakeModel(), path, all_captions=True, progress=False)
    assert "text items: each row's caption and the rows' 8 alternative captions" in table


def test_unlabelled_rows_sharing_a_media_file_are_warned_about(tmp_path, caplog):
    """One row per caption of an image, no label: matched by row, each row's identical twin is a wrong
    hit (text->image recall@1 0.000 on the world's scenes written twice, 0.967 once), without a word."""
    from mmembed.data import read_manifest
    from mmembed.evaluate_recall import shared_files_note

    rows = [{"image": f"img/c{i}.png", "text": t} for i in range(3) for t in (f"c{i}", f"shape {i}")]
    manifest = read_manifest(_write(tmp_path / "m.jsonl", rows + [{"image": "img/c9.png", "text": "c9"}]),
                             allow_outside_root=True, bad_items="row")
    assert shared_files_note(manifest.rows, "m.jsonl").startswith("m.jsonl: 6 rows without a label share their")
    labelled = read_manifest(_write(tmp_path / "l.jsonl", [{**r, "label": r["image"]} for r in rows]),
                             allow_outside_root=True, bad_items="row")
    assert shared_files_note(labelled.rows, "l.jsonl") is None  # one label per item: matched by it
    with caplog.at_level("WARNING", logger="mmembed.evaluate"):
        evaluate_manifest(FakeModel(noise=0.0), tmp_path / "m.jsonl")
    assert "6 rows without a label share their media file with another row" in caplog.text
