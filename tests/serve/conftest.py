"""Fixtures for the web app: a tiny run trained to retrieve by colour and to name colours, an
untrained one for the API's plumbing, servers in background threads, and headless Chromium."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import yaml

import mmembed as mm
from mmembed.config import load_config
from mmembed.config_decoder import DecoderConfig
from mmembed.decoder import build_prompt_model
from tests.conftest import TINY_MODEL, tiny_config

# TINY_MODEL with a convolutional image stem: 1 layer of 32 wide still learns colour, shape and
# position from 320 scenes in 30 short epochs (text→image recall@5 ≈ 0.95 on the test split).
TRAINED_MODEL = copy.deepcopy(TINY_MODEL)
TRAINED_MODEL["towers"]["image"]["encoder_args"].update(stem="conv", stem_depth=1, stem_channels=16, pool="mean")
# A decoder that only learns to answer "what colour is ..." (about 0.9 right on one-object scenes).
COLOUR_DECODER = {"width": 64, "layers": 2, "heads": 2, "context": 64, "soft_tokens": 2, "dropout": 0.1,
                  "media_noise": 0.05, "data": {"val_rows": 40, "tasks": ["colour"]},
                  "train": {"batch_size": 32, "epochs": 1000, "max_steps": 200, "lr": 3e-3, "warmup_steps": 10,
                            "checkpoint_every": 1000, "keep_last": 1, "log_every": 50, "eval_every": 100}}


@pytest.fixture(scope="session")
def colour_world(tmp_path_factory) -> Path:
    """400 scenes at 32 px (40 in the test split, which the server indexes)."""
    from mmembed.data.synth import generate_world

    root = tmp_path_factory.mktemp("serve-world")
    generate_world(root, n=400, seed=0, image_size=32)
    return root


@pytest.fixture(scope="session")
def trained_run(colour_world, tmp_path_factory) -> Path:
    """Align the three towers (30 epochs of batch 32), then the colour decoder (200 steps): ~25 s."""
    from mmembed.train import train

    out = tmp_path_factory.mktemp("serve-run") / "run"
    path = tiny_config(colour_world, out, model=TRAINED_MODEL, epochs=30, batch_size=32, eval_every=None,
                       checkpoint_every=10_000, keep_last=1, log_every=50)
    raw = yaml.safe_load(path.read_text())
    raw["decoder"] = COLOUR_DECODER
    path.write_text(yaml.safe_dump(raw))
    # One thread: on tensors this small it is about as fast as two, and it does not stall on a busy
    # machine (with two, this fixture once took 224 s instead of ~25 s while other jobs held the cores).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        train(load_config(path))
    finally:
        torch.set_num_threads(threads)
    return out


def manifest_rows(world: Path) -> list[dict]:
    return [json.loads(line) for line in (world / "test.jsonl").read_text().splitlines()]


def aiff_of(wav: bytes) -> bytes:
    """The same sound as AIFF (soundfile reads it; browsers do not play it)."""
    import io

    import soundfile as sf

    samples, rate = sf.read(io.BytesIO(wav))
    out = io.BytesIO()
    sf.write(out, samples, rate, format="AIFF")
    return out.getvalue()


def untrained_model(world: Path) -> mm.Model:
    """A random tiny model with a decoder, whose config points at `world` (its test manifest is indexed)."""
    from tests.conftest import tiny_model

    model = tiny_model(0)
    model.config.data.root = str(world)
    cfg = DecoderConfig(width=32, layers=1, heads=2, context=64, dropout=0.0, soft_tokens=2)
    model.config.decoder = cfg
    torch.manual_seed(0)
    model.prompt_model = build_prompt_model(cfg, model.tokenizer, model.embed_dim)
    model.prompt_model.lm.eval()
    return model
