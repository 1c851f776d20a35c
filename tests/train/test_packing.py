"""Packed decoder batches: every prompt gets exactly the logits it gets alone, and the loss is the
padded batch's."""

import pytest
import torch
import torch.nn.functional as F

from mmembed.decoder import Slot, answer_logits
from mmembed.train.decoder_data import collate_prompts, pack_prompts
from tests.decoder.helpers import DIM, lively, prompt_model

PROMPTS = [  # (segments, answer): lengths from 8 to ~40 tokens, 0-2 media items
    (["what colour is", Slot("image"), "?"], "red"),
    (["describe", Slot("audio"), "and", Slot("image")], "a small red circle on the left and a large green square"),
    (["yes or no"], "no"),
    ([Slot("vector"), "count"], "two"),
    (["describe the picture and the sound", Slot("image"), Slot("audio")], "a large green square in the centre"),
    (["what colour is the star?", Slot("audio")], "blue"),
    (["one two", Slot("image"), "three"], "yes"),
]


def items(pm):
    fmt, out, n_media = pm.fmt, [], 0
    for segments, answer in PROMPTS:
        prompt = fmt.encode(segments)
        k = sum(isinstance(s, Slot) for s in segments)
        out.append((prompt + fmt.encode_answer(answer), len(prompt), list(range(n_media, n_media + k))))
        n_media += k
    vectors = F.normalize(torch.randn(n_media, DIM, generator=torch.Generator().manual_seed(1)), dim=-1)
    return out, vectors


@pytest.mark.parametrize("positional, window, conv_kernel", [
    ("rotary", None, 0), ("learned", None, 0), ("sinusoidal", None, 0),
    ("rotary", 8, 0),  # a sliding window counts within each prompt too
    ("rotary", None, 3)])  # and so does a short convolution
def test_a_packed_prompt_gets_the_logits_it_gets_alone(positional, window, conv_kernel):
    pm = lively(prompt_model(positional, window=window, conv_kernel=conv_kernel), std=0.3)
    batch_items, vectors = items(pm)
    context = 64
    packed = pack_prompts(batch_items, pm.fmt.pad_id, context)
    assert len(packed) == len(batch_items) and packed.ids.shape[0] < len(batch_items)  # rows were shared
    assert packed.ids.shape[1] <= context
    with torch.no_grad():
        logits = pm.lm(packed.ids, vectors[packed.media], mask=packed.mask, positions=packed.positions)
    found = 0
    for r in range(packed.ids.shape[0]):
        starts = (packed.positions[r] == 0).nonzero().flatten().tolist()
        for start in starts:
            for ids, _, media in batch_items:  # which prompt begins here
                span = packed.ids[r, start:start + len(ids)].tolist()
                if span == ids and (start + len(ids) == packed.ids.shape[1] or packed.positions[r, start + len(ids)] == 0):
                    with torch.no_grad():
                        alone = pm.lm(torch.tensor([ids]), vectors[media] if media else None)[0]
                    torch.testing.assert_close(logits[r, start:start + len(ids)], alone, atol=1e-5, rtol=1e-5)
                    found += 1
                    break
    assert found == len(batch_items)


@pytest.mark.parametrize("conv_kernel", [0, 3])
def test_packed_loss_equals_the_padded_batch_loss_and_gradients(conv_kernel):
    pm = lively(prompt_model(conv_kernel=conv_kernel), std=0.3)
    pm.lm.train()
    batch_items, vectors = items(pm)

    def loss_and_grads(batch):
        pm.lm.zero_grad()
        logits, targets = answer_logits(pm.lm, batch.ids, vectors[batch.media], batch.targets, batch.loss_mask,
                                        mask=batch.mask, positions=batch.positions)
        loss = F.cross_entropy(logits, targets)
        loss.backward()
        return float(loss.detach()), {n: p.grad.clone() for n, p in pm.lm.named_parameters() if p.grad is not None}

    padded = collate_prompts(batch_items, pm.fmt.pad_id)
    assert padded.mask is None and padded.ids.shape[0] == len(padded) == len(batch_items)
    loss_padded, grads_padded = loss_and_grads(padded)
    loss_packed, grads_packed = loss_and_grads(pack_prompts(batch_items, pm.fmt.pad_id, 64))
    assert loss_packed == pytest.approx(loss_padded, rel=1e-5)
    assert grads_packed.keys() == grads_padded.keys()
    for name in grads_padded:
        torch.testing.assert_close(grads_packed[name], grads_padded[name], atol=1e-5, rtol=1e-4, msg=name)


def test_packing_keeps_every_prompt_within_the_context():
    pm = prompt_model()
    batch_items, _ = items(pm)
    longest = max(len(ids) for ids, _, _ in batch_items)
    packed = pack_prompts(batch_items, pm.fmt.pad_id, longest)  # room for the longest prompt alone
    assert packed.ids.shape[1] == longest
    assert sorted(packed.media.tolist()) == list(range(sum(len(m) for _, _, m in batch_items)))
    assert int(packed.loss_mask.sum()) == sum(len(ids) - start for ids, start, _ in batch_items)
    with pytest.raises(ValueError, match="does not fit"):
        pack_prompts(batch_items, pm.fmt.pad_id, longest - 1)
