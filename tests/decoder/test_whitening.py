"""Whitening before the projector: the fitted map whitens its samples, the fused LM reads the
whitened vectors, and a decoder stage with `decoder.whiten` fits it to the space and saves it."""

import dataclasses

import pytest
import torch

import mmembed as mm
from mmembed.checkpoint import load_tensors
from mmembed.config import load_config
from mmembed.data import read_manifest
from mmembed.data.instructions import read_instructions
from mmembed.decoder import DECODER_WEIGHTS
from mmembed.decoder.whitening import Whitening
from mmembed.errors import ConfigError
from mmembed.train import train
from mmembed.train.decoder import train_decoder
from tests.decoder.helpers import prompt_model
from tests.train.test_decoder_stage import decoder_config, first


def low_rank_samples(n=4000, d=16, seed=0):
    """Unit-ish vectors whose variance sits in 3 of 16 directions, as a contrastive space's does."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.tensor([1.0, 0.5, 0.3] + [0.01] * (d - 3))
    basis = torch.linalg.qr(torch.randn(d, d, generator=g))[0]
    return torch.randn(n, d, generator=g) * scales @ basis.T + 0.2 * basis[:, 0]


def test_fitted_whitening_gives_its_samples_zero_mean_and_unit_covariance():
    x = low_rank_samples()
    w = Whitening(16)
    w.fit(x, eps=1e-9)
    y = w(x)
    assert y.mean(0).abs().max() < 1e-4
    assert torch.allclose(torch.cov(y.T), torch.eye(16), atol=1e-3)
    # the map is (z - mean) @ W with W = U (Λ + eps)^(-1/2)
    ev, u = torch.linalg.eigh(torch.cov(x.T.double()))
    assert torch.allclose(w.matrix.double(), u / (ev + 1e-9).sqrt(), atol=1e-4 * float(w.matrix.abs().max()))


def test_eps_caps_how_much_an_empty_direction_is_amplified():
    x = low_rank_samples()
    x = x - x @ torch.eye(16)[:, -1:] @ torch.eye(16)[-1:]  # no variance at all along the last axis
    w = Whitening(16)
    w.fit(x, eps=1e-3)
    y = w(x + 0.01 * torch.eye(16)[-1])  # a nudge along the empty axis
    assert y.isfinite().all()
    assert float(w(torch.eye(16)[-1:] * 0.01 + w.mean).norm()) <= 0.01 / 1e-3 ** 0.5 + 1e-4
    assert float(torch.cov(w(x).T).diagonal()[-3:].min()) > 0.98  # the big directions (last in eigh order) near unit variance


@pytest.mark.parametrize("samples, eps", [(torch.zeros(1, 16), 1e-3), (torch.zeros(5, 8), 1e-3),
                                          (torch.zeros(5, 16), 0.0), (torch.zeros(5, 16), float("nan"))])
def test_fit_refuses_too_few_wrong_width_or_a_non_positive_eps(samples, eps):
    with pytest.raises(ValueError):
        Whitening(16).fit(samples, eps)


def test_the_fused_lm_projects_the_whitened_vectors():
    pm = prompt_model(whiten=True)
    d = pm.lm.projector.embed_dim
    pm.lm.whitening.fit(torch.randn(200, d) * torch.linspace(0.01, 1.0, d), eps=1e-3)
    ids = torch.tensor([pm.fmt.encode(["look", mm.decoder.Slot("image"), "and", mm.decoder.Slot("audio")])])
    media = torch.nn.functional.normalize(torch.randn(2, d), dim=-1)
    x = pm.lm.embed(ids, media)
    slots = ids[0] == pm.fmt.placeholder_id
    expected = pm.lm.projector(pm.lm.whitening(media)).reshape(-1, x.shape[-1])
    assert torch.equal(x[0, slots], expected)
    assert not torch.allclose(expected, pm.lm.projector(media).reshape(-1, x.shape[-1]))


def test_whiten_eps_and_rows_are_checked(tiny_world, tmp_path):
    with pytest.raises(ConfigError, match="whiten_eps"):
        decoder_config(tiny_world, tmp_path / "a", whiten=True, whiten_eps=0)
    with pytest.raises(ConfigError, match="whiten_rows"):
        decoder_config(tiny_world, tmp_path / "b", whiten=True, whiten_rows=1)


def test_decoder_stage_fits_the_whitening_to_the_space_and_saves_it(tiny_world, tmp_path):
    run = tmp_path / "run"
    train(decoder_config(tiny_world, run, whiten=True, whiten_rows=20))
    model = mm.load(run)
    w = model.prompt_model.lm.whitening
    # the statistics of the space's vectors of every modality of the manifest's first 20 rows
    rows = read_manifest(tiny_world / "train.jsonl").rows[:20]
    sample = torch.cat([model.embed(m, [r.items[m] for r in rows if m in r.items]) for m in model.modalities])
    ref = Whitening(sample.shape[1])
    ref.fit(sample, eps=1e-3)
    assert torch.allclose(w.mean, ref.mean, atol=1e-6) and torch.allclose(w.matrix, ref.matrix, atol=1e-3)
    saved = load_tensors(run / DECODER_WEIGHTS)
    assert torch.equal(saved["whitening.matrix"], w.matrix.cpu()) and torch.equal(saved["whitening.mean"], w.mean.cpu())
    prompt = ["what do you hear in", mm.Audio(first(tiny_world, "audio"))]
    before = model.generate(prompt, max_new_tokens=6, temperature=1.0, seed=1)
    model.save(tmp_path / "copy")
    after = mm.load(tmp_path / "copy").generate(prompt, max_new_tokens=6, temperature=1.0, seed=1)
    assert after.token_ids == before.token_ids and after.logprobs == pytest.approx(before.logprobs, abs=1e-6)
    assert load_config(run / "config.yaml").decoder.whiten is True


def test_without_the_align_manifest_the_whitening_fits_the_decoders_training_media(tiny_world, tmp_path):
    """A decoder stage whose align manifest is gone fits the whitening to the media of its own
    training rows: never to those of its validation rows."""
    config = decoder_config(tiny_world, tmp_path / "run", whiten=True)
    train(config)
    gone = dataclasses.replace(config, data=dataclasses.replace(config.data, train="gone.jsonl"))
    train_decoder(gone, overwrite=True)
    model = mm.load(tmp_path / "run")

    def vectors(name):
        refs = dict.fromkeys(ref for row in read_instructions(tiny_world / name).rows for ref in row.media)
        return torch.cat([model.embed(m, [path for mod, path in refs if mod == m]) for m in {r[0] for r in refs}])

    own, val = vectors("instruct-train.jsonl"), vectors("instruct-val.jsonl")
    w = model.prompt_model.lm.whitening
    assert torch.allclose(w.mean, own.mean(dim=0), atol=1e-5)
    assert not torch.allclose(w.mean, torch.cat([own, val]).mean(dim=0), atol=1e-4)
