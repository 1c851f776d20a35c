"""Activation checkpointing (`train.grad_checkpointing`): the same output and gradients as a
plain backward, dropout included, with far fewer tensors kept for backward."""

import torch

from encoders.blocks import Transformer, set_grad_checkpointing


def _run(checkpointing: bool):
    torch.manual_seed(0)
    model = Transformer(32, depth=3, heads=4, dropout=0.1, positional="rotary", max_len=64)
    model.train()
    assert set_grad_checkpointing(model, checkpointing) == 1
    x = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(1), requires_grad=True)
    mask = torch.ones(2, 16, dtype=torch.bool)
    mask[1, 12:] = False
    saved = []
    torch.manual_seed(5)  # the dropout masks
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t,
                                                  lambda t: t):
        y = model(x, mask, is_causal=True)
    y.square().mean().backward()
    grads = [p.grad.clone() for p in model.parameters()] + [x.grad.clone()]
    return y.detach(), grads, sum(saved)


def test_checkpointing_gives_the_same_output_and_gradients_and_keeps_less():
    y0, g0, kept0 = _run(False)
    y1, g1, kept1 = _run(True)
    torch.testing.assert_close(y1, y0, atol=0, rtol=0)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert kept1 < 0.3 * kept0  # each block keeps its input, not its attention and MLP activations


def test_checkpointing_is_off_for_inference_and_cached_decoding(monkeypatch):
    """Recomputing is for a training backward only: not in eval, not without grad, and never with
    KV caches (the checkpointed call passes none, so a cached step would attend to nothing)."""
    import encoders.blocks as blocks
    from mmembed.decoder.kv_cache import allocate_caches

    calls = []
    real = blocks.checkpoint
    monkeypatch.setattr(blocks, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(0)
    model = Transformer(16, depth=2, heads=2, positional="rotary", max_len=16)
    set_grad_checkpointing(model)
    x = torch.randn(1, 6, 16)
    model.train()
    model(x, is_causal=True)
    assert len(calls) == 2  # the patch sees a training forward's recomputation

    calls.clear()
    model.eval()
    with torch.no_grad():
        full = model(x, is_causal=True)
    model.train()
    with torch.no_grad():
        model(x, is_causal=True)
    caches = allocate_caches(2, 1, 2, 16, 8, torch.float32, torch.device("cpu"))
    model.eval()  # a cached decode under grad (as a training-time sample would be), token by token
    steps = [model(x[:, t:t + 1], is_causal=True, positions=torch.tensor([t]), kv_caches=caches) for t in range(6)]
    assert calls == []
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
    model.train()
    caches = allocate_caches(2, 1, 2, 16, 8, torch.float32, torch.device("cpu"))
    steps = [model(x[:, t:t + 1], is_causal=True, positions=torch.tensor([t]), kv_caches=caches) for t in range(6)]
    assert calls == []  # training mode, grad on, caches given: still no recomputation
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
