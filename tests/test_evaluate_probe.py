"""The linear probe (mmembed/evaluate_probe.py) and `mmembed eval --linear-probe`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mmembed.cli import main
from mmembed.data.splits import deal
from mmembed.data import read_manifest
from mmembed.errors import UserError
from mmembed.evaluate import run_eval
from mmembed.evaluate_probe import L2_GRID, fit_logistic, linear_probe
from mmembed.modality import Modality
from tests.conftest import tiny_model


def blobs(n_per_class: int, centres: torch.Tensor, spread: float, seed: int) -> tuple[torch.Tensor, list[str]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.cat([c + spread * torch.randn(n_per_class, centres.shape[1], generator=g) for c in centres])
    return x, [f"class{i}" for i in range(len(centres)) for _ in range(n_per_class)]


def test_a_fit_is_the_penalised_optimum():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(300, 8, generator=g), torch.randint(0, 3, (300,), generator=g)
    for l2 in (1e-3, 1e-1):
        weight, bias = fit_logistic(x, y, 3, l2)
        w, b = weight.clone().requires_grad_(), bias.clone().requires_grad_()
        loss = torch.nn.functional.cross_entropy(x.double() @ w.T + b, y) + l2 * w.pow(2).sum()
        grads = torch.autograd.grad(loss, (w, b))
        assert max(float(g.abs().max()) for g in grads) < 1e-6  # convex and smooth: the gradient vanishes there only
    assert weight.norm() < fit_logistic(x, y, 3, 1e-3)[0].norm()  # a larger penalty, smaller weights


def test_separable_classes_are_read_and_unscorable_items_left_out():
    centres = 3 * torch.eye(4, 16)
    train_x, train_labels = blobs(20, centres, 0.3, seed=0)
    test_x, test_labels = blobs(5, centres, 0.3, seed=1)
    train_labels[0] = None  # an unlabelled training item is not fitted on
    test_labels[:2] = ["a class never trained on", None]  # nor can these test items be right
    result = linear_probe(train_x, train_labels, test_x, test_labels)
    assert result.accuracy == 1.0 and result.n == 18 and result.n_train == 79
    assert result.classes == ["class0", "class1", "class2", "class3"]
    assert result.l2 in L2_GRID and result.val_accuracy == 1.0
    assert linear_probe(train_x, train_labels, test_x, test_labels) == result  # deterministic
    assert linear_probe(train_x, train_labels, test_x, [None] * 20).accuracy is None


def test_the_penalty_is_the_best_on_a_held_out_fifth_and_the_probe_is_refitted_on_every_item():
    centres = torch.eye(3, 32)
    train_x, train_labels = blobs(10, centres, 1.0, seed=0)
    test_x, test_labels = blobs(100, centres, 1.0, seed=1)
    result = linear_probe(train_x, train_labels, test_x, test_labels, seed=5)
    # the reference: the same per-label fifth held out (each class's 10 items dealt 8 / 2), every penalty tried
    y = torch.tensor([int(label[-1]) for label in train_labels])
    fit, held = deal(y.tolist(), (0.8, 0.2), 5)
    assert len(held) == 6 and sorted(y[held].tolist()) == [0, 0, 1, 1, 2, 2]
    scores = []
    for l2 in L2_GRID:
        w, b = fit_logistic(train_x[fit], y[fit], 3, l2)
        scores.append((float(((train_x[held].double() @ w.T + b).argmax(1) == y[held]).double().mean()), l2))
    assert (result.val_accuracy, result.l2) == max(scores)  # ties go to the larger penalty
    w, b = fit_logistic(train_x, y, 3, result.l2)
    truth = torch.tensor([int(label[-1]) for label in test_labels])
    assert result.accuracy == float(((test_x.double() @ w.T + b).argmax(1) == truth).double().mean())


def test_fewer_than_two_labels_are_refused():
    with pytest.raises(UserError, match="at least 2 labels"):
        linear_probe(torch.randn(4, 3), ["a", "a", None, "a"], torch.randn(2, 3), ["a", "a"])


def _colour_manifests(world: Path, out: Path) -> dict[str, Path]:
    """The world's train and test rows labelled by their first object's colour (6 classes)."""
    paths = {}
    for split in ("train", "test"):
        rows = [json.loads(line) for line in (world / f"{split}.jsonl").read_text().splitlines()]
        for r in rows:
            r["label"] = r["label"].split("|")[0].split()[1]
            for m in ("image", "audio"):
                r[m] = str(world / r[m])
        paths[split] = out / f"{split}.jsonl"
        paths[split].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths


def test_eval_probes_every_modality_as_the_probe_on_its_own_vectors_does(tiny_world, tmp_path):
    model = tiny_model()
    model.config.data.allow_outside_root = True  # the manifests name the world's files absolutely
    paths = _colour_manifests(tiny_world, tmp_path)
    table, report = run_eval(model, paths["test"], linear_probe=paths["train"], progress=False)
    assert set(report["linear_probe"]) == {"text", "image", "audio"}
    train, test = (read_manifest(paths[s], allow_outside_root=True) for s in ("train", "test"))
    for m in (Modality.TEXT, Modality.IMAGE):
        items = {s: [r.items[m] for r in manifest] for s, manifest in (("train", train), ("test", test))}
        expected = linear_probe(model.embed(m, items["train"]), [r.label for r in train],
                                model.embed(m, items["test"]), [r.label for r in test])
        got = report["linear_probe"][str(m)]
        assert (got["accuracy"], got["n"], got["train"], got["l2"]) == (expected.accuracy, len(test), len(train),
                                                                         expected.l2)
    text = report["linear_probe"]["text"]
    assert "| linear probe | accuracy % | test items | training items | classes | L2 |" in table
    assert f"| text | {100 * text['accuracy']:.1f} | {len(test)} | {len(train)} | 6 | {text['l2']:g} |" in table


def test_a_modality_of_one_manifest_only_is_left_out_and_a_bad_training_set_named(tiny_world, tmp_path):
    model = tiny_model()
    model.config.data.allow_outside_root = True
    paths = _colour_manifests(tiny_world, tmp_path)
    rows = [json.loads(line) for line in paths["train"].read_text().splitlines()]
    no_audio = tmp_path / "train-no-audio.jsonl"
    no_audio.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "audio"}) + "\n" for r in rows))
    _, report = run_eval(model, paths["test"], linear_probe=no_audio, progress=False)
    assert set(report["linear_probe"]) == {"text", "image"} and report["linear_probe_manifest"] == str(no_audio)
    one_class = tmp_path / "train-one-class.jsonl"
    one_class.write_text("".join(json.dumps({**r, "label": "red"}) + "\n" for r in rows))
    with pytest.raises(UserError, match=r"train-one-class.jsonl: text: a linear probe needs training items of at "
                                        r"least 2 labels, got 1 \(its classes are the 'label' column\)"):
        run_eval(model, paths["test"], linear_probe=one_class, progress=False)


def test_a_probe_fitted_on_the_items_it_is_scored_on_is_refused_and_a_partial_overlap_said(tiny_world, tmp_path,
                                                                                               caplog):
    """`--linear-probe` given the evaluated manifest itself fitted the probe on its test items (92.5 read
    for 91.1), without a word."""
    model = tiny_model()
    model.config.data.allow_outside_root = True
    paths = _colour_manifests(tiny_world, tmp_path)
    with pytest.raises(UserError, match="would be fitted on every image item it is scored on"):
        run_eval(model, paths["test"], linear_probe=paths["test"], progress=False)
    rows = paths["train"].read_text().splitlines() + paths["test"].read_text().splitlines()[:3]
    leaky = tmp_path / "train-and-some-test.jsonl"
    leaky.write_text("\n".join(rows) + "\n")
    with caplog.at_level("WARNING", logger="mmembed.evaluate_probe"):
        run_eval(model, paths["test"], linear_probe=leaky, progress=False)
    assert "linear probe: 3 of the" in caplog.text and "image items scored are also among its training" in caplog.text
    assert "text items" not in caplog.text  # a caption in both splits is the data's, not a mistake


def test_the_command_checks_its_probe_manifest_before_loading_the_run(tmp_path, capsys):
    manifest = tmp_path / "test.jsonl"
    manifest.write_text('{"text": "a", "label": "x"}\n')
    for argv, match in (([str(tmp_path / "run"), "--linear-probe", str(manifest)], "give --manifest too"),
                        ([str(tmp_path / "run"), "--manifest", str(manifest), "--linear-probe",
                          str(tmp_path / "nope.jsonl")], "linear probe's training manifest not found"),
                        ([str(tmp_path / "run"), "--manifest", str(manifest), "--linear-probe", " "],
                         "--linear-probe is empty")):
        assert main(["eval", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and match in err, err


def test_a_label_of_one_item_is_never_held_out():
    """The dealing put about a fifth of single-item labels in the held-out part, where no fitted item
    taught them: with every label single, every penalty scored 0 and the largest won."""
    x = torch.randn(10, 4, generator=torch.Generator().manual_seed(0))
    labels = [f"c{i}" for i in range(10)]
    result = linear_probe(x, labels, x, labels)
    assert result.val_accuracy is None and result.l2 == L2_GRID[len(L2_GRID) // 2]
    centres = 3 * torch.eye(3, 8)
    train_x, train_labels = blobs(10, centres, 0.3, seed=0)
    train_x, train_labels = torch.cat([train_x, torch.randn(5, 8)]), [*train_labels, *(f"one{i}" for i in range(5))]
    assert linear_probe(train_x, train_labels, train_x[:30], train_labels[:30]).val_accuracy == 1.0
