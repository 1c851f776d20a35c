"""`mm.load` and what a loaded run says it cannot do: a config.yaml edited after training, the
device it is asked to run on, and the advice for a decoder stage that has not finished."""

import re
import shlex
import shutil

import pytest
import torch
import yaml

import mmembed as mm
from mmembed.cli import main
from mmembed.config import apply_override, load_config
from mmembed.errors import CheckpointError, UserError
from tests.conftest import tiny_model


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny untrained run whose config has a decoder section but no decoder trained yet."""
    out = tmp_path_factory.mktemp("runs") / "r1"
    model = tiny_model()
    model.config.train.out_dir = "runs/r1"  # relative: as trained from another folder
    model.save(out)
    return out


def _copy(run, dest, edit=None):
    dest.mkdir(parents=True)
    for name in ("model.safetensors", "tokenizer.json", "config.yaml"):
        shutil.copy(run / name, dest / name)
    if edit is not None:
        raw = yaml.safe_load((dest / "config.yaml").read_text())
        edit(raw["model"]["towers"])
        (dest / "config.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return dest


@pytest.mark.parametrize("edit, refusal", [
    (lambda t: t["image"]["preprocess"].update(size=16), r"expected 32x32 images, got 16x16"),
    (lambda t: t["audio"]["preprocess"].update(n_mels=16), r"model\.towers\.audio: the encoder refuses"),
    (lambda t: t["text"]["preprocess"].update(max_length=100), r"text of 100 tokens exceeds max_len=48"),
], ids=["image-size", "n-mels", "max-length"])
def test_a_config_yaml_that_disagrees_with_its_encoders_is_refused_at_load(run, tmp_path, edit, refusal):
    """Such a run loaded, then every embed raised the encoder's ValueError (a traceback, exit 1)."""
    edited = _copy(run, tmp_path / "edited", edit)
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(edited / 'config.yaml'))} does not fit .*{refusal}"):
        mm.load(edited)
    assert mm.load(_copy(run, tmp_path / "same")).embed("image", [torch.rand(3, 32, 32)]).shape == (1, 32)


def test_eval_of_a_run_with_an_edited_config_is_one_line(run, tiny_world, tmp_path, capsys):
    """`mmembed eval` printed the encoder's traceback and exited 1."""
    edited = _copy(run, tmp_path / "edited", lambda t: t["image"]["preprocess"].update(size=16))
    assert main(["eval", str(edited), "--manifest", str(tiny_world / "test.jsonl")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("mmembed: error: ") and "config.yaml does not fit" in err


def test_device_auto_is_accepted_and_a_device_no_model_runs_on_is_refused(run):
    """device="auto" was refused by a message listing it as valid; "meta" loaded, then failed at embed."""
    model = mm.load(run, device="auto")
    assert model.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    for device in ("meta", torch.device("meta")):
        with pytest.raises(UserError, match=r"^device 'meta' is not one a model runs on \(auto, cpu, cuda"):
            mm.load(run, device=device)


def test_embed_takes_a_batch_size_of_any_integer_type(run):
    """batch_size=np.int64(8) (or torch.tensor(8)) was refused as "must be an integer"."""
    import numpy as np

    model = mm.load(run)
    want = model.embed("text", ["a red circle", "a blue star"], batch_size=1)
    for size in (np.int64(1), torch.tensor(1)):
        assert torch.equal(model.embed("text", ["a red circle", "a blue star"], batch_size=size), want)
    for size in (True, 0, 1.0, torch.tensor([1])):
        with pytest.raises(UserError, match="batch_size must be an integer >= 1"):
            model.embed("text", ["a red circle"], batch_size=size)


def _advice(model) -> str:
    with pytest.raises(UserError) as e:
        model.generate("hi")
    return str(e.value)


@pytest.mark.parametrize("name", ["r1", "my run: #1"])
def test_the_resume_advice_names_the_runs_folder(run, tmp_path, name):
    """`mmembed train RUN/config.yaml --resume` resumed ./runs/r1 (or found none) from another folder."""
    folder = _copy(run, tmp_path / name)
    command = re.search(r"`(mmembed train [^`]+)`", _advice(mm.load(folder))).group(1)
    words = shlex.split(command)  # as a shell reads it
    assert words[:4] == ["mmembed", "train", str(folder.resolve() / "config.yaml"), "--resume"]
    raw = {}
    apply_override(raw, words[4])
    assert raw == {"train": {"out_dir": str(folder.resolve())}}
    assert load_config(words[2], words[4:]).train.out_dir == str(folder.resolve())


def test_a_checkpoint_of_the_align_stage_is_not_told_to_resume(run, tmp_path):
    """A folder under checkpoints/ (loadable) was told to resume `checkpoints/step_N/config.yaml`."""
    parent = _copy(run, tmp_path / "r1")
    step = _copy(run, parent / "checkpoints" / "step_0000002")
    advice = _advice(mm.load(step))
    assert advice.startswith(f"{step.resolve()} is a checkpoint of the align stage, which holds no decoder")
    assert str(parent.resolve()) in advice and "--resume" not in advice


def test_a_zero_d_sample_rate_keeps_the_pair_one_item(run):
    """A rate from np.load(...)["sr"] or torch.tensor(16000) made model.embed read the pair as two
    clips, and the rate was refused as a clip "of unsupported dtype int64"."""
    import numpy as np

    model = mm.load(run)
    wave = np.sin(np.arange(16000, dtype=np.float32) * 0.05) * 0.5
    plain = model.embed("audio", (wave, 16000))
    for rate in (np.array(16000), torch.tensor(16000), np.int64(16000)):
        z = model.embed("audio", (wave, rate))
        assert z.shape == plain.shape == (1, model.embed_dim) and torch.equal(z, plain)
    assert torch.equal(model.embed("audio", [(wave, np.array(16000))]), plain)


@pytest.fixture(scope="module")
def run_with_decoder(tmp_path_factory):
    """A tiny untrained run with a decoder stage (random weights, saved as a finished stage's)."""
    from mmembed.decoder import build_prompt_model

    out = tmp_path_factory.mktemp("runs") / "r2"
    model = tiny_model()
    model.prompt_model = build_prompt_model(model.config.decoder, model.tokenizer, model.embed_dim)
    model.save(out)
    return out


def test_opening_a_decoder_leaves_the_callers_random_stream_and_gives_the_saved_weights(run_with_decoder):
    """Opening a run's decoder drew its random initial weights from the caller's global generator."""
    from mmembed.decoder import load_prompt_model
    from mmembed.model_load import _load_decoder

    model = mm.load(run_with_decoder)
    args = (model.config, model.tokenizer, model.embed_dim)
    saved = load_prompt_model(run_with_decoder, model.config.decoder, *args[1:]).lm.state_dict()
    torch.manual_seed(0)
    want = torch.rand(3)
    torch.manual_seed(0)
    state = _load_decoder(run_with_decoder, *args).lm.state_dict()
    assert torch.equal(torch.rand(3), want)
    assert state.keys() == saved.keys() and all(torch.equal(state[k], saved[k]) for k in saved)


def test_mm_load_leaves_the_callers_random_stream_as_it_was(run_with_decoder):
    """mm.load drew from the global generator (random initial weights the files then replace)."""
    torch.manual_seed(0)
    want = torch.rand(3)
    torch.manual_seed(0)
    model = mm.load(run_with_decoder)
    assert model.prompt_model is not None and torch.equal(torch.rand(3), want)
