"""Build a tiny tri-modal model, embed one image, one sound and one caption, compare them.

The model is untrained (random weights), so the similarities are meaningless — the point is the
data flow: raw input → preprocess → encoder → projection head → unit vector in one shared space,
where cosine similarity is a plain dot product. Runs in well under 30 seconds on a CPU.

    python examples/01_embed_three_modalities.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

import mmembed as mm
from mmembed.data.synth import generate_world

torch.manual_seed(0)
with tempfile.TemporaryDirectory() as tmp:  # the 8-scene world goes when the script ends
    world = Path(tmp) / "world"
    generate_world(world, n=8, seed=0, image_size=64)

    config = mm.load_config("demo", ["model.embed_dim=64"])
    tokenizer = mm.Tokenizer.train(["a large red circle on the left", "a small blue star on the right"] * 10,
                                   vocab_size=300)
    model = mm.build_model(config, tokenizer)

    image, sound = sorted((world / "images").glob("*.png"))[0], sorted((world / "audio").glob("*.wav"))[0]
    z_image = model.embed("image", [image])  # (1, D)
    z_audio = model.embed("audio", [sound])  # (1, D)
    z_text = model.embed("text", ["a large red circle on the left"])  # (1, D)

    print(f"shared space: D = {model.embed_dim}; every vector has unit norm:",
          [round(float(z.norm()), 4) for z in (z_image, z_audio, z_text)])
    print(f"cos(image, text)  = {float(z_image @ z_text.T):+.3f}")
    print(f"cos(audio, text)  = {float(z_audio @ z_text.T):+.3f}")
    print(f"cos(image, audio) = {float(z_image @ z_audio.T):+.3f}")
