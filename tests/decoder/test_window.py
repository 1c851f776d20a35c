"""Sliding-window attention: the mask, rolling-cache generation equal to full recomputation under the
same window (past the window, past the context, left-padded batches), bounded cache memory, a true
window in training, the learned-positions error, and the config round trip."""

from __future__ import annotations

import importlib
import math

import pytest
import torch
import yaml

from encoders import MultiHeadAttention, build_attention_mask, build_positional
from mmembed.config import load_config, save_config
from mmembed.decoder import (Choice, Decoder, Sampling, Stops, build_prompt_model, choose, decode_steps,
                             generate, load_prompt_model, resolve_prompts, save_prompt_model)
from mmembed.decoder.decode import pad_left
from mmembed.decoder.kv_cache import KVCache, RollingKVCache
from mmembed.errors import BadInput, ConfigError
from tests.decoder.helpers import DIM, fake_embed, prompt_model, tokenizer
from tests.decoder.test_generate import PROMPTS

CPU = torch.device("cpu")
DECODE = importlib.import_module("mmembed.decoder.decode")  # the module where `decode_steps` looks up `choose`
LONG = ["one two three large green square in the centre, describe the picture and the sound, what colour "
        "is the star? blue"]  # 48 tokens


def prompt_length(pm, prompt) -> int:
    (resolved,) = resolve_prompts([prompt], fake_embed, DIM, CPU)
    return len(pm.fmt.encode(resolved.parts))


def spy_caches(pm, monkeypatch) -> list:
    """Record the caches every generation allocates."""
    made, new_caches = [], pm.lm.decoder.new_caches
    monkeypatch.setattr(pm.lm.decoder, "new_caches", lambda b, n: made.append(new_caches(b, n)) or made[-1])
    return made


def cached_run(pm, prompt, n, seed):
    """Our generation (prefill + rolling cache), with the logits of every step."""
    logits = []
    hook = pm.lm.decoder.lm_head.register_forward_hook(lambda m, i, out: logits.append(out.clone()))
    try:
        (resolved,) = resolve_prompts([prompt], fake_embed, DIM, CPU)
        (out,) = generate(pm.lm, pm.fmt, [resolved], n, Sampling(temperature=1.0), Stops(), seed, CPU)
    finally:
        hook.remove()
    return out, torch.cat(logits)


def recomputed_run(pm, prompt, n, seed):
    """Reference: at every step the whole sequence so far through the decoder, no cache, the window
    mask applied by the decoder itself (positions 0..T-1, past the context too)."""
    (resolved,) = resolve_prompts([prompt], fake_embed, DIM, CPU)
    ids, media = pm.fmt.encode(resolved.parts), resolved.vectors
    g = torch.Generator().manual_seed(seed)
    tokens, logits = [], []
    with torch.no_grad():
        for _ in range(n):
            last = pm.lm(torch.tensor([ids + tokens]), media)[:, -1]  # (1, V)
            logits.append(last)
            writable = last.index_fill(-1, torch.tensor(pm.fmt.prompt_only_ids), float("-inf"))  # as generation
            tokens.append(int(choose(writable, Sampling(temperature=1.0), g).tokens[0]))
    return tokens, torch.cat(logits)


def assert_equals_recomputation(pm, prompt, n, past: int, seed=5):
    """Token for token and logits within 1e-5, over a sequence that grew beyond `past` tokens."""
    out, logits = cached_run(pm, prompt, n, seed)
    tokens, ref_logits = recomputed_run(pm, prompt, n, seed)
    done = len(out.token_ids)
    assert done == n or out.finish_reason == "eos"  # never capped by the context
    assert prompt_length(pm, prompt) + done > past
    assert out.token_ids == tokens[:done]
    torch.testing.assert_close(logits, ref_logits[:done], atol=1e-5, rtol=0)
    assert len(set(out.token_ids)) > 3  # a varied sequence, not one repeated id


# ------------------------------------------------------------------------------------------------
# The mask
# ------------------------------------------------------------------------------------------------


def loop_mask(tq: int, tk: int, window: int, padding: torch.Tensor | None) -> torch.Tensor:
    """(B, Tq, Tk) by loops: query i (at key index i + tk - tq) sees key j iff i' - window < j <= i'."""
    B = 1 if padding is None else padding.shape[0]
    out = torch.zeros(B, tq, tk, dtype=torch.bool)
    for b in range(B):
        for i in range(tq):
            at = i + tk - tq
            for j in range(tk):
                out[b, i, j] = at - window < j <= at and (padding is None or bool(padding[b, j]))
    return out


@pytest.mark.parametrize("tq,tk", [(1, 1), (7, 7), (1, 9), (3, 10), (10, 10)])
@pytest.mark.parametrize("window", [1, 2, 4, 12])
def test_window_mask_equals_loops(tq, tk, window):
    padding = torch.arange(tk)[None, :] >= torch.tensor([0, 2, tk - 1])[:, None]  # left padding
    got = build_attention_mask(None, True, tq, tk, CPU, window)
    assert torch.equal(got.expand(1, tq, tk), loop_mask(tq, tk, window, None))
    got = build_attention_mask(padding, True, tq, tk, CPU, window)
    assert torch.equal(got.expand(3, 1, tq, tk)[:, 0], loop_mask(tq, tk, window, padding))
    with pytest.raises(ValueError, match="causal"):
        build_attention_mask(None, False, tq, tk, CPU, window)


def test_windowed_attention_equals_naive_float64_reference():
    torch.manual_seed(0)
    attn = MultiHeadAttention(32, 4, window=3).double().eval()
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    q, k, v = (x @ attn.qkv.weight.T + attn.qkv.bias).view(2, 9, 3, 4, 8).permute(2, 0, 3, 1, 4)
    scores = (q @ k.transpose(-1, -2) / math.sqrt(8)).masked_fill(~loop_mask(9, 9, 3, None)[:, None], -math.inf)
    ref = (scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 9, 32) @ attn.proj.weight.T + attn.proj.bias
    torch.testing.assert_close(attn(x, is_causal=True), ref, atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="is_causal"):
        attn(x)


def formula(positional: str, positions: torch.Tensor) -> torch.Tensor:
    """The encoding written out with `math`: rotary's (cos, sin) of p·10000^(-2c/8) for a head of 8,
    the sinusoidal (sin, cos) pairs of p / 10000^(2i/32)."""
    rows = []
    for p in positions.flatten().tolist():
        if positional == "rotary":
            angles = [p * 10000 ** (-2 * c / 8) for c in range(4)]
            rows.append([math.cos(a) for a in angles] + [math.sin(a) for a in angles])
        else:
            rows.append([(math.cos if i % 2 else math.sin)(p / 10000 ** (2 * (i // 2) / 32)) for i in range(32)])
    return torch.tensor(rows, dtype=torch.float64).view(*positions.shape, -1)


@pytest.mark.parametrize("positional", ["rotary", "sinusoidal"])
def test_positions_past_the_table_follow_the_formula(positional):
    short = build_positional(positional, 32, 4, 16, unbounded=True)
    positions = torch.tensor([[15, 16, 17, 4000], [0, 3, 900, 901]])  # per row, past the table or not
    # Rotating (1, ..., 1, 0, ..., 0) gives (cos, sin); adding to zeros gives the sinusoidal rows.
    if positional == "rotary":
        got = short(torch.cat([torch.ones(2, 4, 4, 4), torch.zeros(2, 4, 4, 4)], dim=-1), positions)[:, 0]
    else:
        got = short(torch.zeros(2, 4, 32), positions)
    torch.testing.assert_close(got.double(), formula(positional, positions), atol=1e-6, rtol=0)
    longer = build_positional(positional, 32, 4, 128)
    x = torch.randn(1, 4, 100, 8) if positional == "rotary" else torch.randn(1, 100, 32)
    assert torch.equal(short(x), longer(x))  # positions 0..99: the rows a longer table holds, bit for bit
    with pytest.raises(ValueError, match="max_len=16"):
        build_positional(positional, 32, 4, 16)(x)  # bounded: past the table is an error
    # A whole windowed decoder: a 100-token sequence, a 32- or a 256-position table, the same logits.
    ids = torch.randint(0, 300, (1, 100))
    with torch.no_grad():
        logits = [prompt_model(positional, window=8, context=n).lm.decoder(ids) for n in (32, 256)]
    assert torch.equal(*logits)


# ------------------------------------------------------------------------------------------------
# Rolling-cache generation = full recomputation under the same window
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("window", [16, 20])
def test_prompt_shorter_than_the_window_generating_past_it(window, monkeypatch):
    pm = prompt_model(window=window)
    caches = spy_caches(pm, monkeypatch)
    assert prompt_length(pm, PROMPTS[0]) < window
    assert_equals_recomputation(pm, PROMPTS[0], 40, past=2 * window)  # the buffer compacted too
    assert all(isinstance(c, RollingKVCache) for c in caches[0])


@pytest.mark.parametrize("window", [1, 6, 24])  # prompts longer than the buffer (2W), and one within it
def test_prompt_longer_than_the_window(window, monkeypatch):
    pm = prompt_model(window=window, context=128)
    caches = spy_caches(pm, monkeypatch)
    assert prompt_length(pm, PROMPTS[1]) > window
    assert_equals_recomputation(pm, PROMPTS[1], 30, past=41 + window)  # the prompt rolled out of reach
    assert isinstance(caches[0][0], RollingKVCache)


@pytest.mark.parametrize("positional", ["rotary", "sinusoidal"])
def test_generation_past_the_context(positional):
    pm = prompt_model(positional, window=8, context=32)
    assert_equals_recomputation(pm, PROMPTS[0], 60, past=32 + 8)
    assert prompt_length(pm, LONG) > 32  # a prompt longer than the context itself
    assert_equals_recomputation(pm, LONG, 20, past=48 + 8, seed=2)


def forced_decode(pm, resolved, script: torch.Tensor, monkeypatch) -> torch.Tensor:
    """Cached generation of a left-padded batch fed the tokens of `script` (B, n) instead of its own
    picks (random tokens: greedy picks of an untrained model repeat one id), with every step's logits.

    Returns:
        (B, n, V).
    """
    rows = [pm.fmt.encode(r.parts) for r in resolved]
    ids, mask = pad_left(pm.fmt, rows, CPU)
    media = [r.vectors for r in resolved if r.vectors.shape[0]]
    logits = []

    def force(step_logits, sampling, generator):
        logits.append(step_logits.clone())
        tokens = script[:, len(logits) - 1]
        return Choice(tokens, torch.zeros(len(tokens)), torch.zeros(len(tokens)))

    monkeypatch.setattr(DECODE, "choose", force)
    with torch.no_grad():
        embeds = pm.lm.embed(ids, torch.cat(media) if media else None)
        for _ in decode_steps(pm.lm.decoder, embeds, mask, script.shape[1], Sampling(), None):
            pass
    return torch.stack(logits, dim=1)


def test_left_padded_batch_equals_each_row_alone_and_the_recomputation(monkeypatch):
    pm = prompt_model(window=6, context=32)
    resolved = resolve_prompts(PROMPTS, fake_embed, DIM, CPU)
    lengths = [prompt_length(pm, p) for p in PROMPTS]
    assert len(set(lengths)) == 3 and max(lengths) > 32  # different lengths, one longer than the context
    script = torch.randint(0, pm.fmt.vocab_size, (3, 40), generator=torch.Generator().manual_seed(0))
    batch = forced_decode(pm, resolved, script, monkeypatch)  # (3, 40, V)
    for b, r in enumerate(resolved):
        alone = forced_decode(pm, [r], script[b: b + 1], monkeypatch)[0]
        torch.testing.assert_close(batch[b], alone, atol=1e-5, rtol=0)
        ids = pm.fmt.encode(r.parts)
        with torch.no_grad():  # the whole sequence through the decoder at every step
            ref = torch.stack([pm.lm(torch.tensor([ids + script[b, :t].tolist()]), r.vectors)[0, -1]
                               for t in range(script.shape[1])])
        torch.testing.assert_close(alone, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["full", "rolling"])
@pytest.mark.parametrize("conv_kernel", [0, 4])  # a short convolution's history crosses every chunk boundary too
def test_chunked_decoding_with_either_cache_equals_the_windowed_pass(kind, conv_kernel):
    """Chunks of any size (a chunk longer than the rolling buffer, compactions that overlap), and a
    full cache holding more keys than the window: the window still applies, float64-exactly."""
    torch.manual_seed(0)
    W, B, T = 4, 2, 40
    decoder = Decoder(300, width=32, layers=2, heads=4, max_len=64, window=W, conv_kernel=conv_kernel).double().eval()
    for block in decoder.transformer.blocks:
        if block.conv is not None:  # they start at zero, where they would change nothing
            torch.nn.init.normal_(block.conv.weight, std=0.5)
    ids = torch.randint(0, 300, (B, T))
    if kind == "full":
        caches = [KVCache(B, 4, T, 8, torch.float64) for _ in range(decoder.layers)]
    else:
        caches = [RollingKVCache(B, 4, W, 8, torch.float64) for _ in range(decoder.layers)]
    outs, start = [], 0
    with torch.no_grad():
        for n in (7, 1, 3, 9, 1, 1, 12, 6):
            outs.append(decoder(ids[:, start: start + n], positions=torch.arange(start, start + n), kv_caches=caches))
            start += n
        torch.testing.assert_close(torch.cat(outs, dim=1), decoder(ids), atol=1e-10, rtol=0)
        for cache in caches:  # a reset cache starts a new sequence: no keys, no convolution history
            cache.reset()
        torch.testing.assert_close(decoder(ids[:, 5:9], kv_caches=caches), decoder(ids[:, 5:9]), atol=1e-10, rtol=0)


# ------------------------------------------------------------------------------------------------
# A window that never bites: no window, bit for bit; without a window: today's errors
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("positional", ["rotary", "learned", "sinusoidal"])
def test_a_window_longer_than_everything_changes_nothing_bit_for_bit(positional):
    """Against a decoder built without the argument: where the window cannot bite, the fast paths
    and the full cache are kept, and every number is the same."""
    plain, wide = prompt_model(positional), prompt_model(positional, window=64)
    assert plain.lm.decoder.window is None and isinstance(wide.lm.decoder.new_caches(1, 64)[0], KVCache)
    resolved = resolve_prompts(PROMPTS, fake_embed, DIM, CPU)
    a = generate(plain.lm, plain.fmt, resolved, 20, Sampling(1.0), Stops(), 3, CPU)
    b = generate(wide.lm, wide.fmt, resolved, 20, Sampling(1.0), Stops(), 3, CPU)
    assert [(o.token_ids, o.logprobs) for o in a] == [(o.token_ids, o.logprobs) for o in b]
    ids = torch.randint(0, 300, (2, 64))
    with torch.no_grad():
        assert torch.equal(plain.lm.decoder(ids), wide.lm.decoder(ids))


def test_without_a_window_the_context_errors_are_unchanged(caplog):
    pm = prompt_model()  # context 64
    with pytest.raises(BadInput, match=r"prompt of \d+ tokens exceeds the decoder's context of 64"):
        generate(pm.lm, pm.fmt, resolve_prompts([[" ".join(["one two"] * 64)]], fake_embed, DIM, CPU), 5,
                 Sampling(), Stops(), None, CPU)
    (out,) = generate(pm.lm, pm.fmt, resolve_prompts([LONG], fake_embed, DIM, CPU), 50, Sampling(1.0), Stops(), 1, CPU)
    assert len(out.token_ids) <= 65 - 48 and "capped at 17 new tokens" in caplog.text  # the 48-token LONG


# ------------------------------------------------------------------------------------------------
# Learned positions; bounded memory; a true window in training
# ------------------------------------------------------------------------------------------------


def test_learned_positions_cap_the_answer_at_the_context_as_without_a_window(caplog):
    """A window with learned positions (a GPT-2 given one) refused any answer that would run past
    the context ("sliding past the 32-token context needs rotary ..."), where the same decoder
    without a window answers, capped: it now caps too, and a prompt past the context is refused
    as without a window."""
    pm = prompt_model("learned", window=8, context=32)
    (resolved,) = resolve_prompts([PROMPTS[0]], fake_embed, DIM, CPU)
    (out,) = generate(pm.lm, pm.fmt, [resolved], 40, Sampling(1.0), Stops(), 1, CPU)
    room = 32 + 1 - pm.fmt.length(resolved.parts)
    assert 1 <= len(out.token_ids) <= room < 40 and f"capped at {room} new tokens" in caplog.text
    with pytest.raises(BadInput, match=r"^prompt of 48 tokens exceeds the decoder's context of 32 tokens"):
        generate(pm.lm, pm.fmt, resolve_prompts([LONG], fake_embed, DIM, CPU), 1, Sampling(), Stops(), None, CPU)
    two = resolve_prompts([PROMPTS[0], LONG], fake_embed, DIM, CPU)
    with pytest.raises(BadInput, match=r"^prompt 1 of 48 tokens exceeds"):  # named by its place in the batch
        generate(pm.lm, pm.fmt, two, 1, Sampling(), Stops(), None, CPU)


def test_instruction_evaluation_caps_answers_of_a_window_decoder_with_learned_positions():
    """GPT-2 with a window cannot write past its context: evaluation treated every window as
    sliding, asked for 48 tokens after a long prompt and failed with "sliding past ..."; it now
    asks for the room there is, as without a window, and keeps only rows that fit."""
    from mmembed.data.instructions import InstructionRow
    from mmembed.decoder.evaluate import answer_rows, fitting

    pm = prompt_model("learned", window=8, context=32)

    class Stub:  # the part of a Model that answer_rows uses
        prompt_model = pm

        def generate(self, prompts, max_new_tokens):
            resolved = resolve_prompts(prompts, fake_embed, DIM, CPU)
            return generate(pm.lm, pm.fmt, resolved, max_new_tokens, Sampling(), Stops(), None, CPU)

    rows = [InstructionRow(1, ("what colour is the star?",), "blue"),
            InstructionRow(2, (" ".join(["one two"] * 5),), "yes")]
    lengths = [pm.fmt.length(list(r.prompt)) for r in rows]
    assert lengths[0] + 48 > 32 and lengths[1] < 32  # both need the cap
    answers = answer_rows(Stub(), rows, max_new_tokens=48)
    assert [len(a.token_ids) <= 33 - n for a, n in zip(answers, lengths)] == [True, True]
    too_long = InstructionRow(3, (" ".join(["one two"] * 40),), "no")
    assert fitting(Stub(), rows + [too_long]) == rows

def test_rolling_cache_memory_is_bounded_by_the_window(monkeypatch):
    pm = prompt_model(window=8, context=32)
    caches = spy_caches(pm, monkeypatch)
    (resolved,) = resolve_prompts([PROMPTS[0]], fake_embed, DIM, CPU)
    embeds = pm.lm.embed(torch.tensor([pm.fmt.encode(resolved.parts)]), resolved.vectors)  # (1, 14, C)
    sizes = []
    for n in (20, 300):
        steps = decode_steps(pm.lm.decoder, embeds, None, n, Sampling(1.0), torch.Generator().manual_seed(0))
        next(steps)  # the prefill has made the caches
        pointers = [(c.k.data_ptr(), c.v.data_ptr()) for c in caches[-1]]
        assert 1 + sum(1 for _ in steps) == n
        assert all(isinstance(c, RollingKVCache) and c.length == 14 + n - 1 for c in caches[-1])
        assert [(c.k.data_ptr(), c.v.data_ptr()) for c in caches[-1]] == pointers  # in place, never reallocated
        sizes.append(sum(c.nbytes() for c in caches[-1]))
    layers, kv, slots, heads, head_dim, float32 = 2, 2, 2 * 8, 4, 8, 4
    assert sizes[0] == sizes[1] == layers * kv * slots * heads * head_dim * float32


@pytest.mark.parametrize("layers", [1, 2])
def test_training_forward_is_a_true_window(layers):
    """A position's logits depend on tokens within layers × (W - 1) before it, and no further."""
    torch.manual_seed(0)
    W = 5
    decoder = Decoder(300, width=32, layers=layers, heads=4, max_len=64, window=W).eval()
    ids = torch.randint(0, 300, (1, 40))
    reach = layers * (W - 1)  # the receptive field: W - 1 tokens back per block
    i = 35
    with torch.no_grad():
        base = decoder(ids)[0, i]
        for back, changes in [(reach, True), (reach + 1, False), (reach + 7, False)]:
            edited = ids.clone()
            edited[0, i - back] = (edited[0, i - back] + 1) % 300
            diff = float((decoder(edited)[0, i] - base).abs().max())
            assert (diff > 1e-4) if changes else (diff < 1e-6), (back, diff)
        no_window = Decoder(300, width=32, layers=layers, heads=4, max_len=64)
        no_window.load_state_dict(decoder.state_dict())
        edited = ids.clone()
        edited[0, i - reach - 7] = (edited[0, i - reach - 7] + 1) % 300
        assert float((no_window.eval()(edited)[0, i] - no_window(ids)[0, i]).abs().max()) > 1e-4  # windowless sees it


# ------------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------------


def test_window_from_yaml_reaches_the_decoder_and_survives_save_and_load(tmp_path):
    path = tmp_path / "config.yaml"
    decoder = {"width": 32, "layers": 2, "heads": 4, "context": 32, "window": 12, "soft_tokens": 3, "dropout": 0.0}
    path.write_text(yaml.safe_dump({"decoder": decoder}))
    cfg = load_config(path)
    assert cfg.decoder.window == 12
    pm = build_prompt_model(cfg.decoder, tokenizer(), DIM)
    assert pm.lm.decoder.window == 12 and all(b.attn.window == 12 for b in pm.lm.decoder.transformer.blocks)
    save_config(cfg, tmp_path / "saved.yaml")
    save_prompt_model(pm, tmp_path)
    loaded = load_prompt_model(tmp_path, load_config(tmp_path / "saved.yaml").decoder, tokenizer(), DIM)
    assert loaded.lm.decoder.window == 12
    ids = torch.randint(0, 300, (1, 40))  # longer than the context: only a window decoder reads it
    with torch.no_grad():
        torch.testing.assert_close(loaded.lm.decoder(ids), pm.lm.eval().decoder(ids), atol=0, rtol=0)
    for bad in (0, -3, True, 2.5, "8"):
        with pytest.raises(ConfigError, match="decoder.window"):
            load_config(path, [f"decoder.window={yaml.safe_dump(bad).splitlines()[0]}"])


def test_instruction_evaluation_of_a_sliding_decoder_keeps_the_rows_training_keeps():
    """With a window (rotary positions) evaluation scored every row, those that training and
    validation had left out as longer than the context too ("0 row(s) longer than the context")."""
    from mmembed.data.instructions import InstructionRow
    from mmembed.decoder.evaluate import fitting
    from mmembed.train.decoder_data import MediaTable, PromptDataset

    pm = prompt_model("rotary", window=8, context=32)
    assert pm.lm.decoder.slides

    class Stub:  # the part of a Model that fitting uses
        prompt_model = pm

    rows = [InstructionRow(1, ("what colour is the star?",), "blue"),
            InstructionRow(2, (" ".join(["one two"] * 40),), "no"),
            InstructionRow(3, (" ".join(["one two"] * 5),), "yes")]
    trained = PromptDataset(rows, pm.fmt, MediaTable(), context=32)
    assert [line for line, _ in trained.skipped] == [2]
    assert fitting(Stub(), rows) == [rows[0], rows[2]]
