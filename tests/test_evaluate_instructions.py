"""`mmembed eval --instructions`: rows an answer budget could not hold and manifests whose media are
elsewhere are said, never scored as they are."""

import json

import pytest
from PIL import Image

from mmembed.cli import main
from mmembed.decoder.evaluate import ANSWER_SLACK
from mmembed.errors import UserError
from mmembed.evaluate_instructions import instruction_report, run_instruction_eval
from tests.decoder.test_evaluate import LONG, decoder_model


def _manifest(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_a_reference_longer_than_max_new_tokens_is_not_scored_and_said_so(tmp_path):
    """Every answer longer than 48 tokens was cut short and scored wrong, without a word (0.000 where
    validation read 1.000); by default each row now writes its reference's length and more."""
    model = decoder_model()
    path = _manifest(tmp_path / "m.jsonl", [{"prompt": ["Describe it:"], "answer": LONG, "task": "long"},
                                            {"prompt": ["Its colour?"], "answer": "red", "task": "short"}])
    need = len(model.prompt_model.fmt.encode_answer(LONG)) - 1  # its end token not needed to be right
    table, report = run_instruction_eval(model, path, max_new_tokens=need - 1)
    assert report["cut_short"] == 1 and report["rows"] == 1 and [a["line"] for a in report["answers"]] == [2]
    assert f"not scored: 0 row(s) longer than the context, 1 row(s) whose reference answer is longer than " \
           f"max_new_tokens={need - 1}, 0 bad row(s)" in table
    _, report = run_instruction_eval(model, path, max_new_tokens=need)  # room for the answer
    assert report["cut_short"] == 0 and report["rows"] == 2
    alone = model.generate(["Describe it:"], max_new_tokens=need + 1 + ANSWER_SLACK).text  # an untrained model
    table, report = run_instruction_eval(model, path)  # the default (the CLI's too): its reference and slack
    assert report["cut_short"] == 0 and report["rows"] == 2 and "max_new_tokens=" not in table
    assert report["answers"][0]["answer"] == alone
    _manifest(path, [{"prompt": ["Describe it:"], "answer": LONG}])
    with pytest.raises(UserError, match=rf"every row's reference answer takes more than max_new_tokens={need - 1} "
                                        rf"tokens \(the shortest, {need}\): raise --max-new-tokens, or leave it out"):
        instruction_report(model, path, max_new_tokens=need - 1)


def test_a_manifest_none_of_whose_media_is_found_says_where_they_were_looked_for(tmp_path, capsys):
    """A manifest in a subfolder, its paths relative to data.root as training reads them: every media row was
    a bad row, the one text-only row scored, and the table showed 1.000 with exit 0."""
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    Image.new("RGB", (32, 32), (200, 30, 30)).save(root / "images" / "a.png")
    rows = [{"prompt": ["What is in", {"image": "images/a.png"}, "?"], "answer": "red"},
            {"prompt": ["Describe", {"image": "images/a.png"}], "answer": "a red square"},
            {"prompt": ["Say yes."], "answer": "yes"},
            # a caption is never missing: such rows made the check pass, and they scored 1.000 alone
            {"prompt": ["Which colour is", {"text": "a red square"}, "?"], "answer": "red"}]
    path = _manifest(root / "sub" / "m.jsonl", rows)
    model = decoder_model()
    model.config.data.root = str(root)
    with pytest.raises(UserError, match=r"m\.jsonl: no row's media could be read \(2 row\(s\) with media files; first, "
                                        r"line 1: .*missing file.*\); media paths resolve against the manifest's "
                                        r"folder .*sub \('images/a\.png' is not there\); it is under the run's "
                                        r"data\.root .*data, which training resolved them against: .*; its 2 row\(s\) "
                                        r"without a media file were not scored alone$"):
        instruction_report(model, path)
    model.save(tmp_path / "run")
    assert main(["eval", str(tmp_path / "run"), "--instructions", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mmembed: error: ") and "\n" not in err and "data.root" in err
    # one of them found: the rest are bad rows, counted, and the readable ones scored
    _manifest(path, [rows[0], {"prompt": ["What is in", {"image": "../images/a.png"}], "answer": "red"}, rows[2]])
    model.config.data.allow_outside_root = True
    report = instruction_report(model, path)
    assert report["rows"] == 2 and report["skipped"] == 1 and report["skipped_rows"][0]["line"] == 1


def test_a_world_whose_generation_was_interrupted_is_refused(tmp_path):
    """`eval --instructions` of a half-written world skipped its unrendered rows with a warning and exited
    0, where index, eval --manifest and train refuse the world."""
    from mmembed.data.synth.world_folder import INCOMPLETE

    path = _manifest(tmp_path / "w" / "instruct-test.jsonl", [{"prompt": ["Its colour?"], "answer": "red"}])
    (tmp_path / "w" / INCOMPLETE).write_text("")
    with pytest.raises(UserError, match=r"w holds a synthetic world whose generation was interrupted .*"
                                        r"`mmembed data synth --out .*w --overwrite`"):
        run_instruction_eval(decoder_model(), path)
    (tmp_path / "w" / INCOMPLETE).unlink()
    assert run_instruction_eval(decoder_model(), path)[1]["rows"] == 1


@pytest.mark.parametrize("flag", ["--instructions", "--manifest"])
def test_a_missing_or_unfinished_manifest_is_said_before_the_model_loads(tmp_path, capsys, flag):
    """`mmembed eval` loaded the run first (seconds of a large one), then named the missing file; a run
    that is no run shows the order: the manifest's error comes first."""
    from mmembed.data.synth.world_folder import INCOMPLETE

    what = "instruction manifest" if flag == "--instructions" else "manifest"
    assert main(["eval", str(tmp_path / "no-run"), flag, str(tmp_path / "nope.jsonl")]) == 2
    assert capsys.readouterr().err.strip() == f"mmembed: error: {what} not found: {tmp_path / 'nope.jsonl'}"
    path = _manifest(tmp_path / "w" / "m.jsonl", [{"prompt": ["Its colour?"], "answer": "red"}])
    (tmp_path / "w" / INCOMPLETE).write_text("")
    assert main(["eval", str(tmp_path / "no-run"), flag, str(path)]) == 2
    assert "generation was interrupted" in capsys.readouterr().err
