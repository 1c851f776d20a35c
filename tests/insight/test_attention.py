"""Attention maps: rows are distributions, causal, inside the window, equal to what the layer computes,
labelled with the prompt's tokens and media; the hooks leave nothing behind."""

from __future__ import annotations

import threading

import pytest
import torch

from encoders.attention import MultiHeadAttention
from mmembed.decoder import Audio, Image, Sampling, Stops, generate, resolve_prompts
from mmembed.insight import attention_maps
from mmembed.insight.plotting import token_labels
from tests.decoder.helpers import DIM, fake_embed, lively, prompt_model

CPU = torch.device("cpu")
PROMPT = ["describe", Image("a.png"), "and the sound", Audio("b.wav"), "then", Image("c.png"), "in a few words"]


def resolved(prompt=PROMPT):
    (r,) = resolve_prompts([prompt], fake_embed, DIM, CPU)
    return r


def spread_model(positional: str = "rotary", **overrides):
    """Weights drawn wider than the usual init, whose attention is close to uniform over the past."""
    return lively(prompt_model(positional, **overrides), std=0.3)


def layers_of(pm) -> list[MultiHeadAttention]:
    return [b.attn for b in pm.lm.decoder.transformer.blocks]


@pytest.mark.parametrize("positional", ["rotary", "learned", "sinusoidal"])
def test_rows_are_distributions_and_causal(positional):
    pm = spread_model(positional)
    maps = attention_maps(pm, resolved(), CPU)
    T = len(pm.fmt.encode(resolved().parts))
    assert maps.weights.shape == (2, 4, T, T) and maps.weights.dtype == torch.float32
    torch.testing.assert_close(maps.weights.sum(-1), torch.ones(2, 4, T), atol=1e-5, rtol=0)
    future = torch.ones(T, T, dtype=torch.bool).triu(diagonal=1)
    assert bool((maps.weights[..., future] == 0).all())
    # not uniform over the past: the equalities above would also hold for a constant map
    uniform = torch.ones(T, T).tril() / torch.arange(1, T + 1)[:, None]
    assert float((maps.weights - uniform).abs().max()) > 0.05
    assert maps.window is None


@pytest.mark.parametrize("positional, window", [("rotary", None), ("learned", None), ("sinusoidal", None),
                                                ("rotary", 5)])
def test_weights_times_values_reproduce_the_layer_output(positional, window):
    """The explicit weights @ v equal the layer's fused-kernel output before its projection."""
    pm = spread_model(positional, window=window)
    inputs, outputs = {}, {}
    hooks = []
    for i, attn in enumerate(layers_of(pm)):
        hooks.append(attn.register_forward_pre_hook(lambda m, a, i=i: inputs.__setitem__(i, a[0].clone())))
        hooks.append(attn.proj.register_forward_pre_hook(lambda m, a, i=i: outputs.__setitem__(i, a[0].clone())))
    try:
        maps = attention_maps(pm, resolved(), CPU)
    finally:
        for h in hooks:
            h.remove()
    for i, attn in enumerate(layers_of(pm)):
        x = inputs[i].clone()  # (1, T, C); an inference tensor: cloned to use it outside inference mode
        B, T, C = x.shape
        with torch.no_grad():
            v = attn.qkv(x).view(B, T, 3, attn.heads, attn.head_dim)[:, :, 2].transpose(1, 2)  # (1, H, T, hd)
            mixed = (maps.weights[i][None] @ v).transpose(1, 2).reshape(B, T, C)
        torch.testing.assert_close(mixed, outputs[i], atol=1e-5, rtol=0)
        assert float(outputs[i].abs().max()) > 0.1  # a real signal, not zeros matching zeros


def test_sliding_window_weights_are_zero_outside_the_window():
    W = 5
    pm = spread_model(window=W)
    assert pm.lm.decoder.window == W
    maps = attention_maps(pm, resolved(), CPU)
    T = maps.weights.shape[-1]
    assert T > 3 * W and maps.window == W
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    inside = (j <= i) & (j > i - W)
    assert bool((maps.weights[..., ~inside] == 0).all())
    assert bool((maps.weights[..., inside] > 0).all())  # every key in the window is read
    torch.testing.assert_close(maps.weights.sum(-1), torch.ones(maps.weights.shape[:-1]), atol=1e-5, rtol=0)


def test_labels_name_every_position_and_the_media_items():
    pm = prompt_model()
    r = resolved()
    maps = attention_maps(pm, r, CPU)
    ids = pm.fmt.encode(r.parts)
    labels = maps.labels
    assert len(labels) == len(ids) == maps.weights.shape[-1]
    assert labels[0] == "<bos>" and labels[-1] == "<answer>"
    soft = [labels[p] for p, i in enumerate(ids) if i == pm.fmt.placeholder_id]
    assert soft == ["<image 1>"] * 3 + ["<audio 1>"] * 3 + ["<image 2>"] * 3  # k = 3 soft tokens per item
    assert [labels[p] for p, i in enumerate(ids) if i != pm.fmt.placeholder_id].count("<image>") == 2
    text = "".join(lab for p, lab in enumerate(labels) if ids[p] < pm.fmt.tokenizer.vocab_size
                   and ids[p] not in pm.fmt.tokenizer.special_tokens.values())
    assert text == "describeand the soundthenin a few words"  # text segments are tokenised stripped
    # control characters are escaped (a font has no glyph for them); ids past the tokenizer (markers) by name
    labels = token_labels(pm.fmt, [*pm.fmt.tokenizer.encode("a\nb\x08"), pm.fmt.answer_id])
    assert "".join(labels[:-1]) == "a\\nb\\x08" and labels[-1] == "<answer>"


def test_hooks_are_removed_and_the_mode_restored():
    pm = spread_model()
    pm.lm.train()
    before = [m.__dict__.get("_forward_hooks", {}).copy() for m in layers_of(pm)]
    attention_maps(pm, resolved(), CPU)
    assert pm.lm.training
    assert [dict(m._forward_hooks) for m in layers_of(pm)] == before == [{}, {}]
    assert all(not m._forward_hooks_with_kwargs for m in layers_of(pm))


def test_a_generate_in_another_thread_is_neither_broken_nor_recorded():
    """The hooks ran on another thread's generate: it raised (a KV-step mask) and its weights replaced the maps."""
    pm = spread_model()
    batch = resolve_prompts([["describe", Image("a.png")], ["the sound", Audio("b.wav"), "in a few words"]],
                            fake_embed, DIM, CPU)  # two lengths: a left-padded batch, a mask at every step

    def answers() -> list[list[int]]:
        return [g.token_ids for g in generate(pm.lm, pm.fmt, batch, 6, Sampling(), Stops(), None, CPU)]

    want_maps, want_answers = attention_maps(pm, resolved(), CPU).weights, answers()
    got: dict[str, object] = {}

    def other_thread() -> None:
        try:
            got["answers"] = answers()
        except Exception as e:  # noqa: BLE001 - the failure is what the test reports
            got["answers"] = e

    def meanwhile(module, args) -> None:  # the last layer's turn, the earlier ones recorded: run it all now
        if "answers" not in got and threading.current_thread() is threading.main_thread():
            thread = threading.Thread(target=other_thread)
            thread.start()
            thread.join()

    handle = layers_of(pm)[-1].register_forward_pre_hook(meanwhile)
    try:
        maps = attention_maps(pm, resolved(), CPU)
    finally:
        handle.remove()
    assert got["answers"] == want_answers and len(want_answers[1]) > 1  # decoding steps ran, not the prefill only
    torch.testing.assert_close(maps.weights, want_maps, atol=0, rtol=0)


def test_plot_writes_a_png(tmp_path):
    maps = attention_maps(spread_model(), resolved(), CPU)
    out = maps.plot(tmp_path / "sub" / "attention.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    small = maps.plot(tmp_path / "one.png", layers=[1], heads=[0])
    assert 0 < small.stat().st_size < out.stat().st_size
    with pytest.raises(ValueError, match="head indices"):
        maps.plot(tmp_path / "bad.png", heads=[4])
