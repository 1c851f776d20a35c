"""Training: one engine (`engine.Trainer`) and its stages (`align`: the shared space)."""

from __future__ import annotations

from pathlib import Path

from mmembed.config import Config


def train(config: Config, resume: bool = False) -> Path:
    """Run the stage the config describes (today: the align stage). Returns the run directory."""
    from mmembed.train.align import train_align

    return train_align(config, resume=resume)


__all__ = ["train"]
