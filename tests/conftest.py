"""Shared fixtures: a tiny synthetic world and a tiny tri-modal config that trains in seconds."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

TINY_MODEL = {
    "embed_dim": 32,
    "towers": {
        "text": {"encoder": "text_transformer",
                 "encoder_args": {"width": 32, "layers": 1, "heads": 2, "max_len": 48, "dropout": 0.1},
                 "preprocess": {"max_length": 48}},
        "image": {"encoder": "vit",
                  "encoder_args": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "heads": 2},
                  "preprocess": {"size": 32, "interpolation": "bilinear"}},
        "audio": {"encoder": "audio_transformer",
                  "encoder_args": {"n_mels": 32, "patch_freq": 16, "patch_time": 16, "width": 32, "layers": 1,
                                   "heads": 2, "max_frames": 256},
                  "preprocess": {"n_mels": 32, "max_seconds": 2.0, "random_crop": False}},
    },
}


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory) -> Path:
    """64 scenes of the built-in world (shared by every test in the session; read-only)."""
    from mmembed.data.synth import generate_world

    root = tmp_path_factory.mktemp("world")
    generate_world(root, n=64, seed=0, image_size=32)
    return root


def tiny_config(world: Path, out_dir: Path, model: dict | None = None, **train) -> Path:
    """Write a tiny config for `world` (model: TINY_MODEL unless given) to out_dir/../<name>.yaml
    and return its path."""
    raw = {
        "model": model or TINY_MODEL,
        "tokenizer": {"vocab_size": 300},
        "data": {"root": str(world), "cache": True},
        "train": {"out_dir": str(out_dir), "batch_size": 16, "epochs": 2, "lr": 3e-3, "warmup_steps": 2,
                  "checkpoint_every": 2, "log_every": 1, "keep_last": 100, **train},
    }
    path = out_dir.parent / f"{out_dir.name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw))
    return path


def tiny_model(seed: int = 0):
    """An untrained model of TINY_MODEL's towers (eval mode) with a 300-token tokenizer: for tests that
    embed, search or remember without training."""
    import torch

    import mmembed as mm
    from mmembed.config import ModelConfig, from_dict
    from mmembed.model import build_model

    torch.manual_seed(seed)
    cfg = mm.load_config("demo")
    cfg.model = from_dict(ModelConfig, TINY_MODEL, "model", "test")
    tok = mm.Tokenizer.train(["a large red circle on the left", "a small blue star"] * 20, vocab_size=300)
    model = build_model(cfg, tok)
    model.space.eval()
    return model


def lock_holder(run: Path):
    """Another process holding `run`'s trainer lock (as a trainer does while it trains), started and
    locked; the caller kills it. Returns the `subprocess.Popen`."""
    import subprocess
    import sys
    import textwrap

    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from mmembed.train.run_dir import run_lock
        with run_lock({str(run)!r}):
            print("locked", flush=True)
            time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder
