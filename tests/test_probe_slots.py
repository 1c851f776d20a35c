"""benchmarks.probe_slots: the labels it reads, and that its probe finds what a vector holds."""

import torch

from benchmarks.probe_slots import ATTRIBUTES, CLASSES, items_of, probe_modality, read_splits, slot_labels
from mmembed.data.synth.rules import COLOURS, POSITIONS, SHAPES


def test_slot_labels_put_each_object_at_its_position():
    rows = [{"objects": [{"shape": "star", "colour": "red", "position": "right", "size": "small"}]}]
    y = slot_labels(rows)
    assert y.shape == (1, len(POSITIONS), len(ATTRIBUTES))
    right = POSITIONS.index("right")
    assert y[0, right].tolist() == [1 + SHAPES.index("star"), 1 + COLOURS.index("red")]
    assert y[0].sum() == y[0, right].sum()  # the other slots are empty (0)


class _Oracle:
    """Embeds an item as the one-hot code of its scene's slots, with the colour part optionally
    blanked: what the probe reads must be exactly what the vectors hold."""

    def __init__(self, world, colour_blind: bool):
        self.code = {}
        for rows in read_splits(world).values():
            onehot = torch.nn.functional.one_hot(slot_labels([r.meta for r in rows]), CLASSES).float()  # (N, slots, attrs, C)
            if colour_blind:
                onehot[:, :, 1] = 0
            self.code.update(zip(items_of(rows, "image"), onehot.flatten(1)))

    def embed(self, modality, items, batch_size=64):
        g = torch.Generator().manual_seed(0)
        return torch.stack([self.code[i] for i in items]) + 0.01 * torch.randn(len(items), 3 * 2 * CLASSES, generator=g)


def test_the_probe_reads_what_the_vectors_hold_and_nothing_else(tiny_world):
    """64 scenes: the probe fits every training slot from a code that holds it; on the unseen
    rows, a code without colours reads colours near chance while the full code reads most."""
    full = probe_modality(_Oracle(tiny_world, colour_blind=False), "image", tiny_world, epochs=60, seed=0)
    blind = probe_modality(_Oracle(tiny_world, colour_blind=True), "image", tiny_world, epochs=60, seed=0)
    assert set(full) >= {"train", "test"}
    assert full["train"] == {"shape": 1.0, "colour": 1.0, "every slot": 1.0}
    assert blind["train"]["shape"] == 1.0
    assert full["test"]["colour"] > 0.8, full["test"]
    assert blind["test"]["colour"] < 0.5, blind["test"]
    assert blind["test"]["every slot"] < full["test"]["every slot"]
