"""The decoder stage on a space copied with model.init_from: the whitening falls back to the decoder's
own media when data.train is no align manifest, and a resume that changes decoder.context says that
the context, not the data, changed the rows."""

import copy
import logging

import pytest
import torch

from mmembed.decoder import build_prompt_model
from mmembed.errors import UserError
from mmembed.train import copy_space, train
from mmembed.train.decoder import fit_whitening
from tests.conftest import tiny_model
from tests.train.test_decoder_stage import decoder_config, interrupt_decoder


@pytest.fixture(scope="module")
def space(tmp_path_factory):
    """An untrained tiny space saved as a run: what model.init_from copies (no align stage needed)."""
    run = tmp_path_factory.mktemp("space") / "run"
    tiny_model().save(run)
    return run


def test_whitening_fits_the_decoders_media_when_data_train_is_no_align_manifest(tiny_world, tmp_path, caplog):
    """With only instruction files (data.train = one of them), the stage embedded every media item, then
    stopped: "<root>/train.jsonl: no modality column"."""
    model = tiny_model()
    config = decoder_config(tiny_world, tmp_path / "run", whiten=True, whiten_rows=20)
    pm = build_prompt_model(config.decoder, model.tokenizer, model.embed_dim)
    own = torch.randn(50, model.embed_dim, generator=torch.Generator().manual_seed(0))
    config.data.train = "instruct-train.jsonl"  # an instruction manifest: prompt / answer, no modality column
    with caplog.at_level(logging.INFO):
        fit_whitening(config, pm, model, own)
    assert torch.allclose(pm.lm.whitening.mean, own.mean(dim=0), atol=1e-6)
    assert "data.train is not an align manifest" in caplog.text and "no modality column" in caplog.text
    assert "50 vectors of the decoder's training media" in caplog.text
    config.data.train = "train.jsonl"  # a real align manifest is still the one sampled
    fit_whitening(config, pm, model, own)
    assert not torch.allclose(pm.lm.whitening.mean, own.mean(dim=0), atol=1e-3)


def test_whitening_with_no_media_vector_says_what_to_set(tiny_world, tmp_path):
    """A text-only instruction set over a copied space stopped at "0 readable media vector(s) to fit
    the whitening to; it needs at least 2", after the copy, with nothing said of a way out."""
    model = tiny_model()
    config = decoder_config(tiny_world, tmp_path / "run", whiten=True)
    pm = build_prompt_model(config.decoder, model.tokenizer, model.embed_dim)
    config.data.train = "missing.jsonl"
    with pytest.raises(UserError, match=r"0 readable media vector\(s\) to fit the whitening to, from the decoder's "
                                        r"training media; .*point data\.train at an align manifest of the space.*"
                                        r"set decoder\.whiten=false"):
        fit_whitening(config, pm, model, torch.empty(0, model.embed_dim))


def test_a_resume_that_changes_decoder_context_blames_the_context_not_the_data(space, tiny_world, tmp_path):
    """`--resume decoder.context=...` was told "the training rows (decoder.data) are not those the
    checkpoint was trained on ... restore them", though decoder.data was untouched."""
    cfg = decoder_config(tiny_world, tmp_path / "run")
    cfg.model.init_from = str(space)
    cfg = copy_space(cfg)
    interrupt_decoder(cfg, at_step=2)
    shorter = copy.deepcopy(cfg)
    shorter.decoder.context = 40  # the longer rows no longer fit: other rows, another epoch order
    with pytest.raises(UserError, match=r"^--resume: decoder\.context 160 -> 40 changed which training rows fit, so "
                                        r"the checkpoint's place in the epoch no longer matches their order: resume "
                                        r"without the change, or start a new run"):
        train(shorter, resume=True)
    other = copy.deepcopy(cfg)  # the data itself changed: its message is as it was
    other.decoder.data.tasks = ["describe"]
    with pytest.raises(UserError, match=r"^--resume: the training rows \(decoder\.data\) are not those the checkpoint"):
        train(other, resume=True)
