"""The decoder stage end to end on the tiny world: align then decoder, a loadable run that
generates, exact resume, save → load equality, skipped bad rows, and the `generate` CLI."""

import copy
import json
import logging
from pathlib import Path

import pytest
import torch
import yaml

import mmembed as mm
from mmembed.checkpoint import load_tensors
from mmembed.cli import main
from mmembed.config import load_config
from mmembed.decoder import DECODER_DIR, DECODER_WEIGHTS
from mmembed.errors import UserError
from mmembed.train import train
from mmembed.train.decoder import train_decoder
from tests.conftest import lock_holder, tiny_config

DECODER = {"width": 32, "layers": 1, "heads": 2, "context": 160, "soft_tokens": 2, "dropout": 0.1,
           "media_noise": 0.05, "vector_marker_prob": 0.3,
           "data": {"val_rows": 40},
           "train": {"batch_size": 16, "max_steps": 8, "lr": 3e-3, "warmup_steps": 2, "checkpoint_every": 1,
                     "keep_last": 100, "log_every": 1, "eval_every": 4}}


def decoder_config(world, out_dir, **decoder):
    path = tiny_config(world, out_dir, epochs=1)
    raw = yaml.safe_load(path.read_text())
    raw["decoder"] = {**DECODER, **decoder}
    path.write_text(yaml.safe_dump(raw))
    return load_config(path)


def interrupt_decoder(cfg, at_step: int) -> None:
    """Train the decoder stage of `cfg` until a Ctrl-C at step `at_step` (what a resume starts from)."""

    def stop(event, trainer, info):
        if event == "step" and trainer.progress.step == at_step:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_decoder(cfg, callbacks=[stop])


@pytest.fixture(scope="module")
def trained_run(tiny_world, tmp_path_factory):
    out = tmp_path_factory.mktemp("decoder-run") / "run"
    train(decoder_config(tiny_world, out))
    return out


def first(world, modality):
    return next((world / ("images" if modality == "image" else "audio")).iterdir())


def test_train_runs_align_then_decoder_and_the_run_generates(trained_run, tiny_world):
    assert (trained_run / "model.safetensors").is_file() and (trained_run / DECODER_WEIGHTS).is_file()
    rows = [json.loads(line) for line in (trained_run / DECODER_DIR / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 9))
    assert any("val/answer_accuracy" in r for r in rows)
    model = mm.load(trained_run)
    out = model.generate(["Describe", mm.Image(first(tiny_world, "image")), "and", mm.Audio(first(tiny_world, "audio"))],
                         max_new_tokens=6)
    assert isinstance(out, mm.Generation) and 1 <= len(out.token_ids) <= 6
    assert len(out.entropy) == len(out.logprobs) == len(out.token_ids)
    batch = model.generate([["what colour is", mm.Image(first(tiny_world, "image"))], ["count", mm.Text("a red star")]],
                           max_new_tokens=4)
    assert isinstance(batch, list) and len(batch) == 2


def test_save_then_load_gives_the_same_generation(trained_run, tiny_world, tmp_path):
    model = mm.load(trained_run)
    prompt = ["what do you hear in", mm.Audio(first(tiny_world, "audio"))]
    before = model.generate(prompt, max_new_tokens=8, temperature=1.0, seed=3)
    model.save(tmp_path / "copy")
    after = mm.load(tmp_path / "copy").generate(prompt, max_new_tokens=8, temperature=1.0, seed=3)
    assert after.token_ids == before.token_ids and after.logprobs == pytest.approx(before.logprobs, abs=1e-6)


def test_interrupted_decoder_stage_resumes_exactly(trained_run, tiny_world, tmp_path, caplog):
    """Stop inside step 5, resume: the weights equal an uninterrupted run's, bit for bit (the data
    order, the <vector> marker draws and the media noise are all restored)."""
    ref = tmp_path / "ref"
    cfg = decoder_config(tiny_world, ref)
    cfg.model.init_from = str(trained_run)  # copy the trained space; no align stage
    train(cfg)

    run = tmp_path / "interrupted"
    cfg = decoder_config(tiny_world, run)
    cfg.model.init_from = str(trained_run)

    from mmembed.train import copy_space

    cfg = copy_space(cfg)
    interrupt_decoder(cfg, at_step=5)
    assert not (run / DECODER_WEIGHTS).exists()
    from mmembed.config import started_in

    assert started_in(run / "config.yaml") == Path.cwd()  # the copied space's config, as the align stage's: the
    # resume command goes there (it said nothing of it when the decoder stage of a copied space stopped)
    other = copy.deepcopy(cfg)  # other rows: the saved place in the epoch would point into them
    other.decoder.data.tasks = ["describe"]
    with pytest.raises(UserError, match=r"training rows \(decoder.data\) are not those the checkpoint"):
        train(other, resume=True)
    # past the align stage, a changed train section trains nothing: said, and config.yaml keeps the one it ran
    ran = load_config(run / "config.yaml").train.epochs
    longer = copy.deepcopy(cfg)
    longer.train.epochs = ran + 5
    with caplog.at_level(logging.WARNING):
        train(longer, resume=True)
    assert f"train.epochs {ran} -> {ran + 5} changes nothing" in caplog.text
    assert load_config(run / "config.yaml").train.epochs == ran
    a, b = load_tensors(ref / DECODER_WEIGHTS), load_tensors(run / DECODER_WEIGHTS)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bad_instruction_rows_are_skipped_and_counted(tiny_world, trained_run, tmp_path, caplog):
    rows = [json.loads(line) for line in (tiny_world / "instruct-train.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["task"] != "recall"]  # memory dialogues of six items outgrow the tiny context
    rows[0]["prompt"] = ["describe", {"image": "images/missing.png"}]
    rows[1]["prompt"] = ["describe", {"image": "../outside.png"}]
    rows[2]["prompt"] = ["describe " * 200, rows[2]["prompt"][-1]]
    bad = tmp_path / "bad-instruct.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{not json\n")
    cfg = decoder_config(tiny_world, tmp_path / "run", data={"train": str(bad), "val": None},
                         train={**DECODER["train"], "max_steps": 2})
    cfg.model.init_from = str(trained_run)
    with caplog.at_level(logging.WARNING):
        train(cfg)
    text = " ".join(r.getMessage() for r in caplog.records)
    assert "skipped 4 row(s)" in text and "missing" in text and "escapes the data root" in text
    assert "tokens exceed the context" in text


def test_a_run_without_decoder_says_so(tiny_world, tmp_path):
    from mmembed.train.align import train_align

    run = train_align(load_config(tiny_config(tiny_world, tmp_path / "space", epochs=1)))
    with pytest.raises(UserError, match="no decoder"):
        mm.load(run).generate("hello")
    assert main(["generate", str(run), "--prompt", "hello"]) == 2


def test_generate_cli(trained_run, tiny_world, capsys):
    image = first(tiny_world, "image")
    assert main(["generate", str(trained_run), "--prompt", f"Describe <image:{image}>", "--json",
                 "--max-new-tokens", "5", "--temperature", "0.7", "--seed", "1"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) >= {"text", "token_ids", "logprobs", "entropy"} and len(out["entropy"]) == len(out["token_ids"])
    assert main(["generate", str(trained_run), "--prompt", f"Describe <image:{image}>", "--stream",
                 "--max-new-tokens", "5"]) == 0
    capsys.readouterr()
    for args, message in [(["--prompt", "look <image:/no/such.png>"], "missing image file"),
                          (["--prompt", "hi", "--temperature", "-1"], "temperature"),
                          (["--prompt", "hi", "--top-p", "2"], "top_p")]:
        assert main(["generate", str(trained_run), *args]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1


def test_demo_prompting_section_scores_every_prompt(trained_run, tiny_world):
    from mmembed.demo_prompting import HEADLINE, prompting, report_lines

    model = mm.load(trained_run)
    result = prompting(model, model, tiny_world)
    n_test = len((tiny_world / "instruct-test.jsonl").read_text().splitlines())
    scored, skipped = result["rows"]["test"], result["skipped (longer than the context)"]["test"]
    assert scored + skipped == n_test and scored > 0.8 * n_test  # a few memory dialogues outgrow the tiny context
    too_long = result["skipped by line (longer than the context)"]["test"]
    pooled_line = "attribute question (image or sound)"  # its image and sound lines counted once more
    assert sum(n for g, n in too_long.items() if g != pooled_line) == skipped and result["unreadable rows"]["test"] == 0
    for split, table in result["accuracy"].items():
        assert set(HEADLINE) <= set(table)
        assert all(0.0 <= row["accuracy"] <= 1.0 and row["correct"] <= row["n"] for row in table.values())
    counted = sum(v["n"] for k, v in result["accuracy"]["test"].items() if k != "attribute question (image or sound)")
    assert counted == scored  # every scored prompt lands in exactly one group
    for split, tasks in result["by task"].items():  # every scored row, split by its task
        assert sum(t["n"] for t in tasks.values()) == result["rows"][split]
        assert sum(t["correct"] for t in tasks.values()) == sum(
            v["correct"] for k, v in result["accuracy"][split].items() if k != "attribute question (image or sound)")
    for split, by in result["attribute questions by objects"].items():  # the attribute rows, split by objects
        pooled = result["accuracy"][split]["attribute question (image or sound)"]
        assert set(by) <= {"count", "exists", "colour", "shape", "size", "position"} and by
        assert sum(c["n"] for cells in by.values() for c in cells.values()) == pooled["n"]
        assert sum(c["correct"] for cells in by.values() for c in cells.values()) == pooled["correct"]
        assert all(set(cells) <= {"1", "2"} for cells in by.values())
        guesses = [cells["2"]["either object"] for t, cells in by.items() if t in ("colour", "shape") and "2" in cells]
        assert guesses and all(0.5 <= g <= 1.0 for g in guesses)  # a guess between two objects: at least half right
    assert result["transfer"]["test"]["image-only decoder"] == result["transfer"]["test"]["joint decoder"]  # same model
    assert [t["temperature"] for t in result["temperature"]] == [0.2, 1.5]
    joint, image_only = result["best of"]
    assert (joint["decoder"], joint["split"], joint["group"]) == ("joint", "held-out", "description from an image")
    assert (image_only["decoder"], image_only["split"]) == ("image-only", "test")
    for best in (joint, image_only):
        assert 0 < best["n"] <= 64 and 0 <= best["greedy"] <= 1 and 0 <= best["best"] <= 1
        scores = [c["score"] for c in best["sample"]["candidates"]]
        assert scores and scores == sorted(scores, reverse=True)
    assert image_only["greedy"] == pytest.approx(  # the transfer table's greedy answers, on the first rows
        result["transfer"]["test"]["image-only decoder"]) or image_only["n"] < result["transfer"]["test"]["n"]
    text = "\n".join(report_lines(result))
    assert "## Prompting" in text and "Cross-modal transfer" in text and "description from a sound" in text
    assert "### Accuracy per task" in text and all(f"| {task} | " in text for task in result["by task"]["test"])
    assert "### Best of 16, judged by the shared space" in text and joint["sample"]["candidates"][0]["text"] in text
    assert "| description from a sound, test | image-only |" in text
    assert "### Attribute questions by the objects in the item (test)" in text and "| question | one object |" in text
    assert result["whitened"] == {"joint decoder": False, "image-only decoder": False} and "raw vectors" not in text
    result["whitened"]["joint decoder"] = True  # as the demo's decoders are
    assert ". The image-only decoder reads the raw vectors, the joint one whitens them:" in "\n".join(report_lines(result))
    for group, cut in too_long.items():  # a line that lost rows to the context says how many it was scored on
        n = result["accuracy"]["test"][group]["n"]
        assert f"({n} of {n + cut})" in text


def test_a_world_without_held_out_scenes_is_prompted_on_its_test_split(trained_run, tiny_world, tmp_path):
    """A world made with n_heldout=0 writes an empty instruct-heldout.jsonl: the demo read it and
    failed ("no usable instruction row") after all its training."""
    import shutil

    from mmembed.demo_prompting import prompting, report_lines

    world = tmp_path / "world"
    shutil.copytree(tiny_world, world)
    rows = (world / "instruct-test.jsonl").read_text(encoding="utf-8").splitlines()
    (world / "instruct-test.jsonl").write_text("\n".join(rows[:24]) + "\n", encoding="utf-8")
    (world / "instruct-heldout.jsonl").write_text("", encoding="utf-8")
    result = prompting(mm.load(trained_run), None, world)
    assert set(result["accuracy"]) == {"test"} and result["rows"]["test"] > 0
    assert "## Prompting" in "\n".join(report_lines(result))


def test_the_prompting_report_shows_a_missing_line_as_a_dash_not_a_crash():
    """A split without some kind of prompt used to crash the report after the whole demo (KeyError,
    StopIteration) or print 0.000 for the pooled attribute line."""
    from mmembed.demo_prompting import report_lines

    only_images = {"description from an image": {"n": 10, "correct": 7, "accuracy": 0.7}}
    result = {"accuracy": {"test": only_images}, "rows": {"test": 10}, "samples": [], "temperature": [],
              "skipped by line (longer than the context)": {"test": {"description from an image": 2}}}
    text = "\n".join(report_lines(result))
    assert "| **description from an image** | 0.700 (10 of 12) (≥ 0.90) |" in text
    assert "| **description from a sound** | – (≥ 0.85) |" in text
    assert "Temperature and entropy" not in text


def test_evaluation_answers_each_row_as_it_would_alone(trained_run, tiny_world):
    """A left-padded batch shares one context: a long memory dialogue in a batch of descriptions used to
    cut their answers short. answer_rows keeps every row's room, so its answers are the rows' own."""
    from mmembed.data.instructions import read_instructions
    from mmembed.decoder.evaluate import answer_rows, fitting, row_prompt

    model = mm.load(trained_run)
    rows = fitting(model, read_instructions(tiny_world / "instruct-test.jsonl").rows)
    length = {id(r): model.prompt_model.fmt.length(row_prompt(r)) for r in rows}
    rows.sort(key=lambda r: length[id(r)])
    picked = rows[:6] + rows[-3:]  # the shortest prompts, then the longest
    assert length[id(picked[-1])] > model.prompt_model.lm.decoder.max_len - 48  # long enough to cap a shared batch
    together = answer_rows(model, picked, max_new_tokens=48)
    alone = [model.generate(row_prompt(r), max_new_tokens=48) for r in picked]
    assert [a.token_ids for a in together] == [a.token_ids for a in alone]
    assert max(len(a.token_ids) for a in alone[:6]) > model.prompt_model.lm.decoder.max_len - length[id(picked[-1])]


def test_the_transfer_decoder_reads_raw_vectors_when_the_joint_one_whitens(tiny_world, tmp_path):
    from mmembed.demo import TRANSFER_MAX_STEPS, image_only_config

    joint = decoder_config(tiny_world, tmp_path / "run", whiten=True)
    joint.decoder.data.task_weights = {"larger": 3.0}  # a comparison task: no image-only row has it
    transfer = image_only_config(joint, tmp_path / "run")
    assert transfer.decoder.data.prompt_modalities == ["image"] and transfer.decoder.whiten is False
    assert transfer.decoder.data.task_weights == {} and joint.decoder.data.task_weights == {"larger": 3.0}
    assert transfer.model.init_from == str(tmp_path / "run")
    assert transfer.train.out_dir == str(tmp_path / "run" / "decoder-image-only")
    assert transfer.decoder.train.max_steps == joint.decoder.train.max_steps == 8  # under the cap: as configured
    joint.decoder.train.max_steps = None
    assert image_only_config(joint, tmp_path / "run").decoder.train.max_steps == TRANSFER_MAX_STEPS
    assert joint.decoder.whiten is True and joint.decoder.data.prompt_modalities != ["image"]  # left as it was


def test_evaluation_skips_rows_longer_than_the_context(trained_run, tiny_world, monkeypatch):
    from mmembed.data.instructions import read_instructions
    from mmembed.decoder.evaluate import fitting, row_prompt

    model = mm.load(trained_run)
    rows = read_instructions(tiny_world / "instruct-test.jsonl").rows
    lengths = [model.prompt_model.fmt.length(row_prompt(r)) for r in rows]
    outs = model.generate([row_prompt(r) for r in rows[:6]], max_new_tokens=1)
    assert [o.prompt_tokens for o in outs] == lengths[:6]  # the count is the ids generate builds
    answers = [len(model.prompt_model.fmt.encode_answer(r.answer)) for r in rows]  # with the end token
    cut = sorted(n + a for n, a in zip(lengths, answers))[len(lengths) // 2]
    monkeypatch.setattr(model.prompt_model.lm.decoder, "max_len", cut)
    kept = fitting(model, rows)
    # as in training: a row is kept when its prompt and its reference answer fit
    assert 0 < len(kept) < len(rows) and len(kept) == sum(n + a <= cut for n, a in zip(lengths, answers))
    model.generate([row_prompt(r) for r in kept], max_new_tokens=1)  # every kept row fits


def test_decoder_stage_from_a_pretrained_gpt2(trained_run, tiny_world, tmp_path):
    """`decoder.init_from_gpt2`: GPT-2's weights, architecture and tokenizer. At a negligible
    learning rate the trained decoder still gives GPT-2's logits, and the run loads without the
    GPT-2 folder."""
    transformers = pytest.importorskip("transformers")
    from tests.decoder.helpers import save_tiny_gpt2

    gpt2 = save_tiny_gpt2(tmp_path / "gpt2", layer_norm_epsilon=1e-3)  # not the default: the run must keep it
    hf = transformers.GPT2LMHeadModel.from_pretrained(gpt2).eval()
    cfg = decoder_config(tiny_world, tmp_path / "run", init_from_gpt2=str(gpt2), width=999,
                         train={**DECODER["train"], "max_steps": 3, "lr": 1e-9, "weight_decay": 0.0})
    cfg.model.init_from = str(trained_run)
    train(cfg)
    run = tmp_path / "run"
    saved = load_config(run / "config.yaml").decoder
    assert (saved.width, saved.layers, saved.positional, saved.activation) == (64, 2, "learned", "gelu_tanh")
    assert saved.norm_eps == 1e-3
    (gpt2 / "model.safetensors").unlink()  # the run must not need the folder any more
    model = mm.load(run)
    assert model.prompt_model.own_tokenizer and (run / "decoder_tokenizer.json").is_file()
    vocab = hf.config.vocab_size
    ids = torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model.prompt_model.lm.decoder(ids)[..., :vocab], hf(ids).logits, atol=1e-4, rtol=0)
    out = model.generate(["Describe", mm.Image(first(tiny_world, "image"))], max_new_tokens=4)
    assert 1 <= len(out.token_ids) <= 4


@pytest.mark.parametrize("freeze", [True, False])
def test_freeze_lm_trains_the_projector_and_the_added_token_rows_only(trained_run, tiny_world, tmp_path, freeze):
    """`decoder.freeze_lm`: every weight GPT-2 brought stays bit for bit (weight decay included),
    the rows of the markers the prompt format adds and the projector train. Without it (the
    control) the same steps move GPT-2's weights."""
    pytest.importorskip("transformers")
    from mmembed.decoder import load_gpt2
    from tests.decoder.helpers import save_tiny_gpt2

    gpt2 = save_tiny_gpt2(tmp_path / "gpt2")
    cfg = decoder_config(tiny_world, tmp_path / "run", init_from_gpt2=str(gpt2), freeze_lm=freeze,
                         train={**DECODER["train"], "max_steps": 3, "lr": 1e-2, "weight_decay": 0.1})
    cfg.model.init_from = str(trained_run)
    train(cfg)
    loaded = {f"decoder.{k}": v for k, v in load_gpt2(gpt2).state_dict().items()}
    saved = load_tensors(tmp_path / "run" / DECODER_WEIGHTS)
    vocab = loaded["decoder.token_embedding.weight"].shape[0]  # GPT-2's rows; the markers come after
    table = saved["decoder.token_embedding.weight"]
    assert table.shape[0] > vocab
    same = [k for k in loaded if k in saved and k != "decoder.token_embedding.weight" and torch.equal(saved[k], loaded[k])]
    lm_keys = [k for k in loaded if k in saved and k != "decoder.token_embedding.weight"]
    old_rows_same = torch.equal(table[:vocab], loaded["decoder.token_embedding.weight"])
    if freeze:
        assert same == lm_keys and old_rows_same
        start = loaded["decoder.token_embedding.weight"].mean(dim=0)  # what the added rows start as
        assert not torch.allclose(table[vocab:], start.expand_as(table[vocab:]))  # the markers trained
    else:
        assert len(same) < len(lm_keys) and not old_rows_same


def test_freeze_lm_with_a_padded_table_trains_the_marker_rows_and_the_added_convolutions(trained_run, tiny_world,
                                                                                         tmp_path):
    """A GPT-2 whose table is padded past its tokenizer (320 rows, 300 tokens) holds the markers
    in its padding rows: they start as the mean of the real rows and train, while the padding
    rows after them stay as loaded (all 20 moved). `decoder.conv_kernel` adds zero-initialised
    convolutions to the frozen blocks: they train (they stayed zero: freezing froze them too)."""
    pytest.importorskip("transformers")
    from mmembed.decoder import load_gpt2
    from mmembed.decoder.builder import build_prompt_model, decoder_tokenizer
    from tests.decoder.helpers import save_tiny_gpt2

    gpt2 = save_tiny_gpt2(tmp_path / "gpt2", vocab_size=320)
    cfg = decoder_config(tiny_world, tmp_path / "run", init_from_gpt2=str(gpt2), freeze_lm=True, conv_kernel=3,
                         train={**DECODER["train"], "max_steps": 3, "lr": 1e-2, "weight_decay": 0.1})
    cfg.model.init_from = str(trained_run)
    fresh = build_prompt_model(cfg.decoder, decoder_tokenizer(cfg.decoder, None), 32)
    words, rows = fresh.fmt.tokenizer.vocab_size, fresh.fmt.vocab_size
    assert words == 300 and 300 < rows < 320
    table = fresh.lm.decoder.token_embedding.weight
    torch.testing.assert_close(table[words:rows], table[:words].mean(dim=0).expand(rows - words, -1))
    train(cfg)
    loaded = load_gpt2(gpt2).token_embedding.weight
    saved = load_tensors(tmp_path / "run" / DECODER_WEIGHTS)
    moved = [i for i in range(320) if not torch.equal(saved["decoder.token_embedding.weight"][i], loaded[i])]
    assert moved == list(range(words, rows))
    convs = [k for k in saved if ".conv." in k]
    assert convs and any(saved[k].abs().max() > 0 for k in convs)


def test_lora_adapts_a_frozen_gpt2_and_saves_the_adapters_merged(trained_run, tiny_world, tmp_path):
    """`decoder.lora_rank`: GPT-2 stays frozen while rank-4 adapters on its blocks' linear layers
    train; the saved decoder is a plain one (no adapter keys) whose linear weights moved by the
    merged update while everything else GPT-2 brought is as loaded, and the run generates."""
    pytest.importorskip("transformers")
    from mmembed.decoder import load_gpt2
    from tests.decoder.helpers import save_tiny_gpt2

    gpt2 = save_tiny_gpt2(tmp_path / "gpt2")
    cfg = decoder_config(tiny_world, tmp_path / "run", init_from_gpt2=str(gpt2), lora_rank=4,
                         train={**DECODER["train"], "max_steps": 3, "lr": 1e-2, "weight_decay": 0.1})
    cfg.model.init_from = str(trained_run)
    train(cfg)
    loaded = {f"decoder.{k}": v for k, v in load_gpt2(gpt2).state_dict().items()}
    saved = load_tensors(tmp_path / "run" / DECODER_WEIGHTS)
    assert not any("lora" in k for k in saved) and set(loaded) - {"decoder.lm_head.weight"} <= set(saved)
    adapted = [k for k in loaded if k.endswith((".qkv.weight", ".proj.weight", ".fc.weight"))]
    assert len(adapted) == 2 * 4  # 2 blocks: attention qkv + proj, MLP fc + proj
    moved = [k for k in adapted if not torch.equal(saved[k], loaded[k])]
    assert moved == adapted
    kept = [k for k in loaded if k in saved and k not in adapted and k != "decoder.token_embedding.weight"]
    assert kept and all(torch.equal(saved[k], loaded[k]) for k in kept)  # norms, biases, positions
    vocab = loaded["decoder.token_embedding.weight"].shape[0]
    assert torch.equal(saved["decoder.token_embedding.weight"][:vocab], loaded["decoder.token_embedding.weight"])
    out = mm.load(tmp_path / "run").generate(["Describe", mm.Image(first(tiny_world, "image"))], max_new_tokens=4)
    assert 1 <= len(out.token_ids) <= 4


def test_a_media_file_that_fails_to_decode_names_its_segment(trained_run, tiny_world, tmp_path):
    from mmembed.errors import BadInput

    fake = tmp_path / "not-an-image.png"
    fake.write_bytes(b"<html>this is not a picture</html>")
    model = mm.load(trained_run)
    with pytest.raises(BadInput, match=r"^prompt segment 3 \(image\): "):
        model.generate(["Compare", mm.Audio(first(tiny_world, "audio")), "with", mm.Image(fake)])
    with pytest.raises(BadInput, match=r"prompt 1 segment 1 \(image\)"):
        model.generate([["Describe", mm.Image(first(tiny_world, "image"))], ["Describe", mm.Image(fake)]])


def test_demo_memory_section_runs_three_processes_on_one_file(trained_run, tiny_world):
    from mmembed.demo_memory import cross_process_recall, memory_lines, probes

    items = probes(tiny_world, "test", n=3)
    assert len(items) == 3 and all(p["answer"] not in p["question"].lower().split() for p in items)
    result = cross_process_recall(trained_run, tiny_world, n=3)
    assert result["n"] == 3 and 0 <= result["memory off"] <= 1 and 0 <= result["memory on"] <= 1
    assert [s["truth"] for s in result["samples"]] == [p["answer"] for p in items]
    assert all(s["said"] is not None for s in result["samples"])  # process 1 answered every show turn
    assert "## Memory across processes" in "\n".join(memory_lines(result))


def test_demo_memory_phases_take_the_asking_sessions_settings(trained_run, tiny_world, tmp_path, monkeypatch):
    """`memory_horizon --history-turns H --recall-k K` reaches the asking Session; memory off stays off."""
    from mmembed.demo_memory import probes, run_phase

    items = probes(tiny_world, "test", n=2)
    run_phase("show", trained_run, tmp_path / "memory.db", items)
    seen, real = [], mm.Session.__init__

    def spy(self, *args, **kw):
        seen.append((kw["history_turns"], kw["recall_k"]))
        real(self, *args, **kw)

    monkeypatch.setattr(mm.Session, "__init__", spy)
    run_phase("ask", trained_run, tmp_path / "memory.db", items, history_turns=1, recall_k=2)
    run_phase("ask-without-memory", trained_run, tmp_path / "memory.db", items, history_turns=1, recall_k=2)
    assert seen == [(1, 2)] * 2 + [(0, 0)] * 2


def test_a_collapse_restart_of_the_align_stage_is_what_config_yaml_records_after_the_decoder(
        tiny_world, tmp_path, monkeypatch):
    from tests.train.test_align import _collapse_on

    lrs = _collapse_on(monkeypatch, attempts={0})
    cfg = decoder_config(tiny_world, tmp_path / "run", train={**DECODER["train"], "max_steps": 2})
    run = train(cfg)
    assert lrs == pytest.approx([3e-3, 1e-3])
    saved = load_config(run / "config.yaml")
    assert saved.train.lr == pytest.approx(1e-3) and saved.decoder.train.max_steps == 2


# ------------------------------------------------------------------------------------------------
# `mmembed eval RUN --instructions M`: the decoder's accuracy per task, every answer in the JSON
# ------------------------------------------------------------------------------------------------


def test_eval_instructions_scores_every_row_as_the_demo_does(trained_run, tiny_world, tmp_path, capsys):
    from mmembed.data.instructions import read_instructions
    from mmembed.data.synth import score
    from mmembed.decoder.evaluate import answer_rows, fitting

    manifest = tiny_world / "instruct-test.jsonl"
    assert main(["eval", str(trained_run), "--instructions", str(manifest), "--json", str(tmp_path / "r.json")]) == 0
    table = capsys.readouterr().out
    report = json.loads((tmp_path / "r.json").read_text())
    model = mm.load(trained_run)
    rows = read_instructions(manifest).rows
    kept = fitting(model, rows)
    assert report["rows"] == len(kept) and report["too_long"] == len(rows) - len(kept)
    assert report["scoring"].startswith("built-in world")
    # the answers are the demo's (the same batched greedy path), scored by the world's reader
    reference = answer_rows(model, kept)
    assert [a["answer"] for a in report["answers"]] == [g.text for g in reference]
    truth = [score({"task": r.task, "answer": r.answer, **r.meta}, g.text) for r, g in zip(kept, reference)]
    assert [a["correct"] for a in report["answers"]] == truth
    tasks = report["tasks"]
    assert sum(t["n"] for name, t in tasks.items() if name != "(all tasks)") == len(kept)
    for name, t in tasks.items():
        assert t["accuracy"] == pytest.approx(t["correct"] / t["n"])
        assert f"| {name} | {t['accuracy']:.3f} | {t['correct']} / {t['n']} |" in table
    assert tasks["(all tasks)"]["correct"] == sum(truth)


def test_eval_instructions_scores_other_manifests_by_normalised_exact_match(trained_run, tiny_world, tmp_path):
    """A manifest of the user's own: right answers that differ only in case, spaces and final
    punctuation count, others do not; the accuracy is known exactly."""
    from mmembed.evaluate_instructions import run_instruction_eval

    model = mm.load(trained_run)
    (tmp_path / "picture.png").write_bytes(first(tiny_world, "image").read_bytes())
    prompts = [["What is in", "picture.png", "?"], ["Name the colour of", "picture.png"], ["Describe", "picture.png"],
               ["What do you see?", "picture.png"]]
    said = [g.text for g in model.generate([[p[0], mm.Image(tmp_path / p[1]), *p[2:]] for p in prompts],
                                           max_new_tokens=6)]
    assert all(s.strip() for s in said)
    rows = [{"prompt": [p[0], {"image": p[1]}, *p[2:]], "task": "mine",
             "answer": f"  {s.upper()}. " if i % 2 == 0 else "zebra"} for i, (p, s) in enumerate(zip(prompts, said))]
    (tmp_path / "mine.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    table, report = run_instruction_eval(model, tmp_path / "mine.jsonl", max_new_tokens=6)
    assert report["scoring"] == "exact match (normalised)"
    assert report["tasks"]["mine"] == {"n": 4, "correct": 2, "accuracy": 0.5}
    assert [a["correct"] for a in report["answers"]] == [True, False, True, False]
    # a row whose picture is missing or broken is skipped and counted; it stopped the whole evaluation
    (tmp_path / "broken.png").write_bytes(b"<html>not a picture</html>")
    extra = [{"prompt": ["What is in", {"image": name}], "answer": "x"} for name in ("missing.png", "broken.png")]
    extra.append({"prompt": ["What is in", {"image": str(tmp_path / "picture.png")}], "answer": "x"})  # absolute
    (tmp_path / "mine.jsonl").write_text("\n".join(json.dumps(r) for r in [*rows, *extra]))
    table, report = run_instruction_eval(model, tmp_path / "mine.jsonl", max_new_tokens=6)
    assert report["skipped"] == 3 and report["tasks"]["mine"] == {"n": 4, "correct": 2, "accuracy": 0.5}
    assert "3 bad row(s) (first, line 5: " in table  # the reasons were dropped: a file of bad rows looked small
    assert [r["line"] for r in report["skipped_rows"]] == [5, 6, 7]
    assert "absolute path" in report["skipped_rows"][2]["reason"]
    assert report["too_long"] == 0 and "0 row(s) longer than the context" in table  # they were counted there too


def test_eval_without_a_decoder_or_a_manifest_is_one_clear_line(trained_run, tiny_world, capsys):
    from types import SimpleNamespace

    from mmembed.evaluate_instructions import instruction_report

    with pytest.raises(UserError, match="no decoder stage"):
        instruction_report(SimpleNamespace(prompt_model=None), tiny_world / "instruct-test.jsonl")
    model = mm.load(trained_run)  # -3 answered one token a row and reported its accuracy; "8" was a TypeError
    for bad in ({"max_new_tokens": -3}, {"max_new_tokens": "8"}, {"batch_size": 0}):
        with pytest.raises(ValueError, match="must be an integer >= 1"):
            instruction_report(model, tiny_world / "instruct-test.jsonl", **bad)
    assert main(["eval", str(trained_run)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--manifest" in err and "--instructions" in err


def test_a_pipeline_stopped_before_the_decoders_first_checkpoint_resumes(trained_run, tiny_world, tmp_path):
    """`mmembed train --resume` refused ("decoder already holds a run: continue it with --resume")
    and only --overwrite, which deletes the trained space too, got out."""
    from mmembed.train import copy_space

    cfg = decoder_config(tiny_world, tmp_path / "run", train={**DECODER["train"], "checkpoint_every": 1000})
    cfg.model.init_from = str(trained_run)
    cfg = copy_space(cfg)
    interrupt_decoder(cfg, at_step=2)
    assert (tmp_path / "run" / DECODER_DIR / "metrics.jsonl").is_file()
    train(cfg, resume=True)
    assert (tmp_path / "run" / DECODER_WEIGHTS).is_file()


def test_overwriting_a_decoder_stage_another_trainer_runs_deletes_nothing(trained_run, tiny_world, tmp_path):
    run = tmp_path / "run"
    cfg = decoder_config(tiny_world, run)
    cfg.model.init_from = str(trained_run)
    train(cfg)
    before = sorted(p.name for p in (run / DECODER_DIR).iterdir())
    holder = lock_holder(run)
    try:
        with pytest.raises(UserError, match="in use by a trainer"):
            train_decoder(cfg, overwrite=True)
    finally:
        holder.kill()
        holder.wait()
    assert sorted(p.name for p in (run / DECODER_DIR).iterdir()) == before  # its checkpoints were deleted



def test_the_pooled_attribute_line_counts_the_rows_its_parts_lost_to_the_context():
    """The headline line pools the image and sound attribute questions; it showed no "(n of m)"
    while its parts did ("80 of 100"): the line that carries the goal hid the shortfall."""
    from mmembed.demo_prompting import report_lines, with_pooled

    cut = with_pooled({"attribute question (image)": 20, "attribute question (sound)": 5, "description from an image": 1})
    assert cut["attribute question (image or sound)"] == 25 and with_pooled({"recall": 3}) == {"recall": 3}
    table = {"attribute question (image)": {"n": 80, "correct": 60, "accuracy": 0.75},
             "attribute question (sound)": {"n": 95, "correct": 76, "accuracy": 0.8},
             "attribute question (image or sound)": {"n": 175, "correct": 136, "accuracy": 136 / 175}}
    text = "\n".join(report_lines({"accuracy": {"test": table}, "rows": {"test": 175}, "samples": [],
                                    "temperature": [], "skipped by line (longer than the context)": {"test": cut}}))
    assert "| **attribute question (image or sound)** | 0.777 (175 of 200) (≥ 0.90) |" in text


def test_a_missing_instruction_manifest_is_named_before_the_align_stage(tiny_world, tmp_path):
    """It was found after the align stage had trained (minutes, on the demo)."""
    for data in ({"train": "nope.jsonl"}, {"val": "nope-val.jsonl"}):
        cfg = decoder_config(tiny_world, tmp_path / "run", data={**DECODER.get("data", {}), **data})
        with pytest.raises(UserError, match=r"decoder\.data\.(train|val): instruction manifest not found"):
            train(cfg)
        assert not (tmp_path / "run" / "model.safetensors").exists()  # nothing trained


def test_a_resumed_decoder_stage_keeps_the_space_it_copied_in_config_yaml(trained_run, tiny_world, tmp_path):
    """A space copied from model.init_from: the resume wrote the user's own model section (not the
    copied run's) into config.yaml, and the run no longer loaded."""
    from mmembed.train import copy_space

    run = tmp_path / "run"
    mine = decoder_config(tiny_world, run)
    mine.model.init_from = str(trained_run)
    mine.model.embed_dim = 48  # the user's section; the space is the copied run's

    interrupt_decoder(copy_space(copy.deepcopy(mine)), at_step=3)
    train(mine, resume=True)
    assert load_config(run / "config.yaml").model.embed_dim == load_config(trained_run / "config.yaml").model.embed_dim
    mm.load(run).generate("describe", max_new_tokens=2)


def test_the_decoder_stages_device_error_names_its_key(tiny_world, tmp_path):
    """train_decoder called directly (the demo does) said "device 'gpu' is not a device name", without the key."""
    from mmembed.errors import ConfigError

    cfg = decoder_config(tiny_world, tmp_path / "run", train={**DECODER["train"], "device": "gpu"})
    (tmp_path / "run").mkdir()  # the decoder stage trains in an align stage's folder (the device comes first)
    (tmp_path / "run" / "model.safetensors").touch()
    with pytest.raises(ConfigError, match=r"^decoder\.train\.device 'gpu' is not a device name \(auto, cpu, "):
        train_decoder(cfg)


def test_the_decoder_stage_on_a_folder_without_a_space_makes_nothing(tiny_world, tmp_path):
    """train_decoder on a folder that does not exist said "drop --resume" (which no one had passed), after
    the resume check; before that check it made the folder and left a .lock and decoder/ in it."""
    cfg = decoder_config(tiny_world, tmp_path / "nodir")
    with pytest.raises(UserError, match=r"nodir holds no model\.safetensors \(is it a run directory\?"):
        train_decoder(cfg)
    assert not (tmp_path / "nodir").exists()


def test_a_space_copied_from_a_bound_run_saves_a_config_that_reloads(trained_run, tiny_world, tmp_path):
    """copy_space kept the source's init_towers (a bound run's [image, text]), which the copied run's own
    config.yaml was then refused for ("a decoder config copies model.init_from's whole space")."""
    import shutil

    from mmembed.config import save_config
    from mmembed.train import copy_space
    from mmembed.train.preflight import check_config

    bound = tmp_path / "bound"
    shutil.copytree(trained_run, bound, ignore=shutil.ignore_patterns("checkpoints", DECODER_DIR))
    source = load_config(bound / "config.yaml")
    source.model.init_from, source.model.init_towers = str(trained_run), ["image", "text"]
    save_config(source, bound / "config.yaml")
    cfg = decoder_config(tiny_world, tmp_path / "run")
    cfg.model.init_from = str(bound)
    copied = copy_space(cfg)
    assert copied.model.init_towers is None
    check_config(load_config(tmp_path / "run" / "config.yaml"))  # what `mmembed train RUN/config.yaml` checks


def _val_rows(tiny_world, path, val_lines):
    """A validation manifest: the world's own rows (no memory dialogue) and `val_lines` at their line numbers."""
    rows = [json.loads(line) for line in (tiny_world / "instruct-val.jsonl").read_text().splitlines()]
    rows = [json.dumps(r) for r in rows if r["task"] != "recall"]
    for line, text in sorted(val_lines.items()):
        rows.insert(line - 1, text)
    path.write_text("".join(f"{r}\n" for r in rows))
    return path


def test_bad_validation_rows_are_counted_in_the_validation_warning(tiny_world, trained_run, tmp_path, caplog):
    """Bad validation rows were dropped without a word, and the warning called the 8 lines that gave
    6 rows "the first 6 rows" ("1 of the first 6 rows ... left out; 5 scored")."""
    world_rows = [json.loads(line) for line in (tiny_world / "instruct-val.jsonl").read_text().splitlines()]
    long = next(r for r in world_rows if r["task"] != "recall")
    long = json.dumps({**long, "prompt": ["describe " * 200, long["prompt"][-1]]})
    val = _val_rows(tiny_world, tmp_path / "val.jsonl", {2: "{not json", 4: "{not json", 5: long, 9: "[1]"})
    cfg = decoder_config(tiny_world, tmp_path / "run", data={"val": str(val), "val_rows": 6},
                         train={**DECODER["train"], "max_steps": 2, "eval_every": 2})
    cfg.model.init_from = str(trained_run)
    with caplog.at_level(logging.WARNING):
        train(cfg)
    assert f"validation manifest {val}: 3 row(s) skipped at read time (first, line 2: invalid JSON" in caplog.text
    # lines 1-8 gave the 6 rows: the bad lines 2 and 4 and the long row 5 left out; line 9 was never reached
    assert (f"validation: 3 of 8 rows of {val} left out (2 bad, 1 the decoder cannot take; first, line 2: invalid "
            "JSON") in caplog.text and "; 5 scored" in caplog.text


def _interrupted(tiny_world, trained_run, run):
    """A decoder stage on a space copied from `trained_run`, killed after its step 2 (checkpoints, no decoder)."""
    from mmembed.train import copy_space

    cfg = decoder_config(tiny_world, run)
    cfg.model.init_from = str(trained_run)

    def stop(event, trainer, info):
        if event == "step" and trainer.progress.step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_decoder(copy_space(cfg), callbacks=[stop])
    assert not (run / DECODER_WEIGHTS).exists() and any((run / DECODER_DIR / "checkpoints").iterdir())
    return cfg


def test_an_interrupted_decoder_stage_is_called_unfinished_with_the_way_to_resume(trained_run, tiny_world, tmp_path,
                                                                                    capsys):
    """`generate` and `eval --instructions` said "this run has no decoder (stage): train one", of a
    run whose decoder stage was killed half way."""
    from mmembed.evaluate_instructions import instruction_report

    run = tmp_path / "run"
    _interrupted(tiny_world, trained_run, run)
    model = mm.load(run)
    resume = (rf"continue it with `mmembed train {run / 'config.yaml'} --resume train\.out_dir={run}` "
              rf"\(its checkpoints are in {run}/decoder/")
    with pytest.raises(UserError, match=rf"^the decoder stage of {run} has not finished \(no decoder\.safetensors\), "
                                        rf"so it cannot generate: {resume}"):
        model.generate("hello")
    with pytest.raises(UserError, match=rf"has not finished .* so it cannot answer prompts: {resume}"):
        instruction_report(model, tiny_world / "instruct-test.jsonl")
    assert main(["generate", str(run), "--prompt", "hello"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "has not finished" in err and "--resume" in err
    train(load_config(run / "config.yaml"), resume=True)  # what the message says to run
    assert mm.load(run).generate("hello", max_new_tokens=2).token_ids


def test_resuming_the_decoder_stage_with_another_init_from_says_it_changes_nothing(trained_run, tiny_world, tmp_path,
                                                                                    caplog):
    """The resume kept the space it had copied and replaced model.init_from without a word."""
    import shutil

    run, other = tmp_path / "run", tmp_path / "other"
    cfg = _interrupted(tiny_world, trained_run, run)
    shutil.copytree(trained_run, other, ignore=shutil.ignore_patterns("checkpoints", DECODER_DIR))
    cfg.model.init_from = str(other)
    with caplog.at_level(logging.WARNING):
        train(cfg, resume=True)
    assert (f"the decoder stage began on the space copied from {trained_run}, so model.init_from '{trained_run}' -> "
            f"'{other}' changes nothing") in caplog.text
    assert load_config(run / "config.yaml").model.init_from == str(trained_run)
    caplog.clear()
    cfg.model.init_from = f"{trained_run}/"  # the same folder, spelt otherwise
    with caplog.at_level(logging.WARNING):
        train(cfg, resume=True)
    assert "changes nothing" not in caplog.text


def test_a_resume_before_the_decoder_stage_keeps_where_the_space_came_from(trained_run, tiny_world, tmp_path):
    """A run that trained its space, stopped before the decoder's first checkpoint and resumed with
    model.init_from newly set had that run's space copied over its own (its align stage lost)."""
    import shutil

    run, other = tmp_path / "run", tmp_path / "other"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns(DECODER_DIR, DECODER_WEIGHTS))
    shutil.copytree(trained_run, other, ignore=shutil.ignore_patterns("checkpoints", DECODER_DIR))
    before = (run / "model.safetensors").read_bytes()
    cfg = decoder_config(tiny_world, run)
    cfg.model.init_from = str(other)
    with pytest.raises(UserError, match=r"its space was trained here, so --resume with model.init_from=.*other "
                                        "would replace it with that run's: drop model.init_from"):
        train(cfg, resume=True)
    assert (run / "model.safetensors").read_bytes() == before
    from mmembed.train import copy_space

    copied = decoder_config(tiny_world, tmp_path / "copied")
    copied.model.init_from = str(trained_run)
    copy_space(copied)  # stopped before the decoder stage's first checkpoint
    copied = decoder_config(tiny_world, tmp_path / "copied")
    with pytest.raises(UserError, match=r"its space was copied from .*: resume with model.init_from="):
        train(copied, resume=True)
