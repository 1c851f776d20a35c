"""The captioning loss beside the contrastive one (`loss.caption_weight`, CoCa): the loss reads
only real caption tokens of the rows that have one; the align stage trains the captioner with the
space, checkpoints and resumes it exactly, and saves the space alone."""

import json

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

import mmembed as mm
from mmembed.checkpoint import load_tensors
from mmembed.config import load_config
from mmembed.errors import ConfigError
from mmembed.modality import Modality
from mmembed.space import SharedSpace, Tower
from mmembed.train.align import train_align
from mmembed.train.align_step import WithCaptioner, captioned_forward
from mmembed.train.captioning import Captioner, caption_losses
from mmembed.train.state import latest_checkpoint
from tests.conftest import tiny_config

TEXT, IMAGE = Modality.TEXT, Modality.IMAGE


def captioner(seed=0):
    torch.manual_seed(seed)
    return Captioner(embed_dim=8, vocab_size=50, width=16, layers=1, heads=2, soft_tokens=2).eval()


def test_loss_is_the_mean_cross_entropy_of_the_real_caption_tokens():
    cap = captioner()
    z = torch.randn(3, 8)
    ids = torch.tensor([[1, 5, 6, 7, 2], [1, 9, 2, 0, 0], [1, 4, 4, 2, 0]])
    mask = ids != 0
    loss = cap(z, ids, mask)
    terms = []
    for b in range(3):  # one row at a time, without padding: the soft tokens, then the caption
        n = int(mask[b].sum())
        x = torch.cat([cap.projector(z[b:b + 1]), cap.decoder.token_embedding(ids[b:b + 1, : n - 1])], 1)
        logits = cap.decoder(inputs_embeds=x)[0, 2:]  # after the 2 soft tokens: predicts ids[1:n]
        terms.append(F.cross_entropy(logits, ids[b, 1:n], reduction="none"))
    assert torch.allclose(loss, torch.cat(terms).mean(), atol=1e-5)
    padded = ids.masked_fill(~mask, 33)  # what sits under the padding does not count
    assert torch.allclose(cap(z, padded, mask), loss, atol=1e-6)


class _Flat(nn.Module):
    """A tower encoder for the test: the first 3 numbers of each row, mapped to width 8."""

    width = 8

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 8)

    def pooled(self, x, mask=None):
        return self.lin(x.float().reshape(x.shape[0], -1)[:, :3])


def test_each_modality_is_scored_against_the_captions_of_its_own_rows():
    """A batch where rows lack a modality, through the space's forward as the align stage calls it."""
    torch.manual_seed(0)
    space = SharedSpace({TEXT: Tower(_Flat(), nn.Linear(8, 8)), IMAGE: Tower(_Flat(), nn.Linear(8, 8))}, 8)
    net = WithCaptioner(space, captioner())
    present = {TEXT: torch.tensor([True, False, True, True]), IMAGE: torch.tensor([True, True, False, True])}
    ids = torch.tensor([[1, 5, 2], [1, 6, 2], [1, 7, 2]])  # the captions of rows 0, 2, 3
    mask = torch.ones_like(ids, dtype=torch.bool)
    inputs = {TEXT: ids, IMAGE: torch.randn(3, 3)}  # image rows 0, 1, 3
    emb, _, _, out = captioned_forward(net, inputs, {TEXT: mask, IMAGE: None}, present)
    cap = net.captioner
    z_image = space.encode(IMAGE, inputs[IMAGE])  # (3, D): rows 0, 1, 3
    assert torch.allclose(out[IMAGE].mean, cap(z_image[[0, 2]], ids[[0, 2]], mask[[0, 2]]))  # rows 0 and 3
    assert torch.allclose(out[TEXT].mean, cap(emb[TEXT][present[TEXT]], ids, mask))
    assert out[IMAGE].tokens == 4 and out[TEXT].tokens == 6
    assert caption_losses(cap, {IMAGE: emb[IMAGE]}, {IMAGE: present[IMAGE]}, None, None) == {}


def caption_config(world, out, **train):
    path = tiny_config(world, out, **train)
    raw = yaml.safe_load(path.read_text())
    raw["loss"] = {"caption_weight": 1.0, "captioner": {"width": 16, "layers": 1, "heads": 2, "soft_tokens": 2}}
    path.write_text(yaml.safe_dump(raw))
    return load_config(path)


def test_align_stage_trains_the_captioner_and_saves_the_space_alone(tiny_world, tmp_path):
    run = train_align(caption_config(tiny_world, tmp_path / "run", epochs=1))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert steps and all({f"caption/{m}" for m in ("text", "image", "audio")} <= r.keys() for r in steps)
    ckpt = load_tensors(latest_checkpoint(run) / "model.safetensors")
    assert any(k.startswith("captioner.") for k in ckpt) and any(k.startswith("space.") for k in ckpt)
    saved = load_tensors(run / "model.safetensors")
    assert not any("captioner" in k for k in saved)
    for k, v in saved.items():  # the saved space is the trained one
        assert torch.equal(v, ckpt[f"space.{k}"]), k
    assert mm.load(run).embed("text", ["a red star"]).shape[0] == 1
    # a checkpoint folder of it loads as a run and seeds another (it was a CheckpointError, and
    # init_from copied 0 tensors without a word)
    from_ckpt = mm.load(latest_checkpoint(run))
    assert torch.equal(from_ckpt.embed("text", ["a red star"]), mm.load(run).embed("text", ["a red star"]))
    seeded = load_config(tiny_config(tiny_world, tmp_path / "seeded", epochs=1),
                         [f"model.init_from={latest_checkpoint(run)}"])
    from mmembed.model import build_model
    from mmembed.tokenizer import load_tokenizer

    space = build_model(seeded, load_tokenizer(run / "tokenizer.json")).space
    assert all(torch.equal(v, saved[k]) for k, v in space.state_dict().items())


def test_a_crashed_captioning_run_resumes_to_the_uninterrupted_weights(tiny_world, tmp_path):
    ref = train_align(caption_config(tiny_world, tmp_path / "ref", epochs=2, checkpoint_every=1))

    def crash(event, trainer, info):
        if event == "step" and trainer.progress.step == 3:
            raise KeyboardInterrupt

    cfg = caption_config(tiny_world, tmp_path / "crashed", epochs=2, checkpoint_every=1)
    with pytest.raises(KeyboardInterrupt):
        train_align(cfg, callbacks=[crash])
    train_align(cfg, resume=True)
    a = load_tensors(latest_checkpoint(ref) / "model.safetensors")
    b = load_tensors(latest_checkpoint(tmp_path / "crashed") / "model.safetensors")
    assert a.keys() == b.keys() and any(k.startswith("captioner.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_caption_settings_are_checked(tiny_world, tmp_path):
    with pytest.raises(ConfigError, match="caption_weight"):
        load_config(tiny_config(tiny_world, tmp_path / "a"), ["loss.caption_weight=-1"])
    path = tiny_config(tiny_world, tmp_path / "b")
    raw = yaml.safe_load(path.read_text())
    raw["loss"] = {"caption_weight": 1.0, "captioner": {"depth": 3}}
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="depth"):
        load_config(path)


def test_the_captioner_reads_captions_as_long_as_the_text_tower_allows(tiny_world, tmp_path):
    """Its decoder was 256 positions whatever the captions: text max_length 300 died at the first
    long caption ("sequence of 303 positions exceeds max_len=256"). The align stage sizes it from
    the text preprocessor's max_length."""
    from mmembed.model import build_model
    from mmembed.train.align_step import with_captioner
    from tests.decoder import helpers

    torch.manual_seed(0)
    cap = Captioner(embed_dim=8, vocab_size=50, width=16, layers=1, heads=2, soft_tokens=2, caption_len=300)
    ids = torch.randint(3, 50, (2, 300))
    assert torch.isfinite(cap(torch.randn(2, 8), ids, torch.ones_like(ids, dtype=torch.bool)))
    cfg = caption_config(tiny_world, tmp_path / "run", epochs=1)
    cfg.model.towers["text"].preprocess["max_length"] = 300
    tokenizer = helpers.tokenizer()
    net = with_captioner(cfg, build_model(cfg, tokenizer).space, tokenizer, torch.device("cpu"))
    assert net.captioner.decoder.max_len == 2 + 300 - 1  # 2 soft tokens, every caption id but the last
