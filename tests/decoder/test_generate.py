"""Generation: KV cache vs recomputation, left-padded batches, sampling, seeds, streaming, stops."""

import gc
import math

import pytest
import torch

from mmembed.decoder import Sampling, Stops, choose, generate, resolve_prompts, stream
from mmembed.decoder.decode import pad_left
from tests.decoder.helpers import DIM, fake_embed, lively, prompt_model, with_conv

CPU = torch.device("cpu")
PROMPTS = [
    ["what colour is", torch.nn.functional.normalize(torch.randn(DIM, generator=torch.Generator().manual_seed(1)), dim=0),
     "?"],
    ["describe the picture", torch.ones(DIM), "and the sound", -torch.ones(DIM), "please, in a few words"],
    ["one two"],
]


def run(pm, prompts, n=12, seed=None, **sampling):
    resolved = resolve_prompts(prompts, fake_embed, DIM, CPU)
    return generate(pm.lm, pm.fmt, resolved, n, Sampling(**sampling), Stops(), seed, CPU)


def uncached_tokens(pm, prompt, n, sampling, seed):
    """Reference: recompute the whole sequence at every step (nanoGPT's loop), no cache."""
    (resolved,) = resolve_prompts([prompt], fake_embed, DIM, CPU)
    ids = pm.fmt.encode(resolved.parts)
    media = resolved.vectors
    g = torch.Generator().manual_seed(seed)
    tokens, logprobs = [], []
    with torch.no_grad():
        for _ in range(n):
            logits = pm.lm(torch.tensor([ids + tokens]), media)[:, -1]
            logits[:, pm.fmt.prompt_only_ids] = -math.inf  # generation never writes what only prompts hold
            c = choose(logits, sampling, g)
            tokens.append(int(c.tokens[0]))
            logprobs.append(float(c.logprobs[0]))
    return tokens, logprobs


@pytest.mark.parametrize("positional, conv_kernel", [("rotary", 0), ("learned", 0), ("sinusoidal", 0), ("rotary", 3)])
def test_kv_cached_generation_equals_recomputing_the_context(positional, conv_kernel):
    pm = prompt_model(positional, conv_kernel=conv_kernel)
    if conv_kernel:
        with_conv(pm)  # the cache carries each block's last inputs for the convolution
    sampling = Sampling(temperature=1.0)  # random draws: any logit difference would change the path
    for prompt in PROMPTS[:2]:
        (out,) = run(pm, [prompt], n=20, seed=5, temperature=1.0)
        tokens, logprobs = uncached_tokens(pm, prompt, 20, sampling, seed=5)
        assert out.token_ids == tokens[: len(out.token_ids)]
        assert out.logprobs == pytest.approx(logprobs[: len(out.logprobs)], abs=1e-5)
        assert len(set(tokens)) > 3  # the check exercised a varied sequence, not one repeated id


@pytest.mark.parametrize("conv_kernel", [0, 3])  # convolutions must not reach into the left padding
def test_left_padded_batch_equals_each_row_alone(conv_kernel):
    # an untrained model at the usual init writes one id over and over
    spread = lively(prompt_model(conv_kernel=conv_kernel))
    if conv_kernel:
        with_conv(spread)  # std 1 convolutions would blow the residual stream up
    batch = run(spread, PROMPTS, n=10)
    alone = [run(spread, [p], n=10)[0] for p in PROMPTS]
    assert [b.token_ids for b in batch] == [a.token_ids for a in alone]
    # varied answers, a different one per row: the equality above could fail
    assert len({tuple(b.token_ids) for b in batch}) == len(batch) and len({t for b in batch for t in b.token_ids}) > 3
    # Logits at every position of prompt + answer, teacher-forced, batch vs alone: within 1e-5
    # (at the usual init, whose logits have the scale a trained model's have).
    pm = prompt_model(conv_kernel=conv_kernel)
    if conv_kernel:
        with_conv(pm)
    resolved = resolve_prompts(PROMPTS, fake_embed, DIM, CPU)
    rows = [pm.fmt.encode(r.parts) + b.token_ids for r, b in zip(resolved, batch)]
    ids, mask = pad_left(pm.fmt, rows, CPU)
    positions = (mask.long().cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        emb = pm.lm.embed(ids, torch.cat([r.vectors for r in resolved]))
        together = pm.lm.decoder(inputs_embeds=emb, mask=mask, positions=positions)
        for b, (row, r) in enumerate(zip(rows, resolved)):
            single = pm.lm(torch.tensor([row]), r.vectors if r.vectors.shape[0] else None)[0]
            torch.testing.assert_close(together[b, -len(row):], single, atol=1e-5, rtol=0)


def test_a_long_prompt_does_not_cut_the_answers_of_its_batch_short():
    """A batch shares one context: a prompt that leaves room for 2 new tokens would cap every row at 2.
    generate runs such a prompt apart, so each row's answer is its own."""
    spread = lively(prompt_model())
    fmt, context = spread.fmt, spread.lm.decoder.max_len
    words = 40  # the longest run of "one two" that leaves at least 2 tokens of room (2 or 3)
    while fmt.length([" ".join(["one two"] * words)]) > context + 1 - 2:
        words -= 1
    long = [" ".join(["one two"] * words)]
    prompts = [PROMPTS[0], long, PROMPTS[2]]
    together = run(spread, prompts, n=12)
    alone = [run(spread, [p], n=12)[0] for p in prompts]
    assert [t.token_ids for t in together] == [a.token_ids for a in alone]
    assert len(together[0].token_ids) > context + 1 - fmt.length(long)  # longer than a shared batch would allow
    assert len(together[1].token_ids) <= context + 1 - fmt.length(long)


def test_room_batches_keep_every_answer_its_room():
    from mmembed.decoder.generate import room_batches

    lengths = [10, 100, 20, 90, 100, 5, 81, 80]
    batches = room_batches(lengths, context=128, max_new_tokens=48)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:  # what any member gets in its batch is what it gets alone
        assert b == sorted(b)
        assert all(min(48, 129 - max(lengths[j] for j in b)) == min(48, 129 - lengths[i]) for i in b)
    assert [0, 2, 5, 6, 7] in batches  # prompts that leave 48 tokens of room (81 of 128 does) go together
    assert all(len(b) <= 2 for b in room_batches(lengths, 128, 48, batch_size=2))


@pytest.mark.parametrize("positional", ["learned", "rotary"])
def test_a_prompt_as_long_as_the_context_still_gets_its_next_token(positional):
    """The last position predicts one token past the context (it is never fed back): a prompt of
    `context` tokens gets 1, of `context - 1` tokens 2, each what recomputing the context gives."""
    spread = lively(prompt_model(positional))
    context = spread.lm.decoder.max_len
    for room in (1, 2):
        prompts = ([" ".join(["one two"] * a + ["yes"] * b)] for a in range(context) for b in range(4))
        prompt = next(p for p in prompts if spread.fmt.length(p) == context + 1 - room)
        (out,) = run(spread, prompt, n=5)
        assert len(out.token_ids) == room and out.finish_reason in ("length", "eos")
        assert out.token_ids == uncached_tokens(spread, prompt, room, Sampling(), seed=0)[0]


def test_temperature_zero_top_k_one_and_tiny_top_p_all_equal_greedy():
    pm = prompt_model()
    greedy = [o.token_ids for o in run(pm, PROMPTS, n=15)]
    assert [o.token_ids for o in run(pm, PROMPTS, n=15, seed=3, temperature=0.9, top_k=1)] == greedy
    assert [o.token_ids for o in run(pm, PROMPTS, n=15, seed=3, temperature=1.3, top_p=1e-9)] == greedy
    assert all(h == 0 for o in run(pm, PROMPTS, n=15, seed=3, temperature=0.9, top_k=1) for h in o.entropy)
    tiny = run(pm, PROMPTS, n=15, seed=3, temperature=1e-40)  # z / T would overflow to inf (NaN probabilities)
    assert [o.token_ids for o in tiny] == greedy
    assert all(lp == 0 and h == 0 for o in tiny for lp, h in zip(o.logprobs, o.entropy))


def test_same_seed_same_sample_and_another_seed_another():
    pm = prompt_model()
    a = run(pm, PROMPTS, n=15, seed=7, temperature=1.5, top_p=0.95)
    b = run(pm, PROMPTS, n=15, seed=7, temperature=1.5, top_p=0.95)
    c = run(pm, PROMPTS, n=15, seed=8, temperature=1.5, top_p=0.95)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    assert [o.token_ids for o in a] != [o.token_ids for o in c]


def test_top_k_larger_than_the_vocabulary_is_clamped():
    pm = prompt_model()
    big = run(pm, PROMPTS, n=10, seed=4, temperature=1.0, top_k=10**6)
    plain = run(pm, PROMPTS, n=10, seed=4, temperature=1.0)
    assert [o.token_ids for o in big] == [o.token_ids for o in plain]


@pytest.mark.parametrize("kwargs", [
    {"temperature": -0.1}, {"temperature": float("nan")}, {"temperature": float("inf")}, {"temperature": "1"},
    {"top_p": 0.0}, {"top_p": 1.5}, {"top_p": float("nan")}, {"top_k": 0}, {"top_k": -3}, {"top_k": 2.5},
    {"top_k": True},
])
def test_invalid_sampling_arguments_raise_value_error(kwargs):
    with pytest.raises(ValueError):
        Sampling(**{"temperature": 1.0, **kwargs})


def test_logprobs_and_entropy_are_those_of_the_distribution_sampled_from():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, 0.0]])
    c = choose(logits, Sampling(temperature=2.0, top_k=3), torch.Generator().manual_seed(0))
    p = torch.softmax(torch.tensor([2.0, 1.0, 0.5]) / 2.0, dim=0)
    assert float(c.entropy) == pytest.approx(float(-(p * p.log()).sum()), abs=1e-6)
    chosen = [2.0, 1.0, 0.5].index(float(logits[0, int(c.tokens)]))
    assert float(c.logprobs) == pytest.approx(float(p[chosen].log()), abs=1e-6)
    uniform = choose(torch.zeros(2, 1000), Sampling(temperature=1.0), torch.Generator().manual_seed(0))
    torch.testing.assert_close(uniform.entropy, torch.full((2,), math.log(1000)))
    # top-p keeps the smallest set reaching p: here the first two tokens (0.5 + 0.3 >= 0.7)
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    draws = {int(choose(probs.log(), Sampling(1.0, top_p=0.7), torch.Generator().manual_seed(s)).tokens)
             for s in range(200)}
    assert draws == {0, 1}


def test_draw_samples_each_column_at_its_probability_and_never_a_zero_one():
    from mmembed.decoder.sampling import draw

    probs = torch.tensor([[0.0, 0.5, 0.3, 0.0, 0.15, 0.05, 0.0],
                          [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0],
                          [0.25, 0.25, 0.0, 0.25, 0.0, 0.25, 0.0]])
    g = torch.Generator().manual_seed(0)
    picks = torch.cat([draw(probs, g) for _ in range(20_000)], dim=1)  # (3, 20000)
    counts = torch.zeros_like(probs).scatter_add_(1, picks, torch.ones_like(picks, dtype=probs.dtype))
    freq = counts / picks.shape[1]
    assert torch.equal(freq > 0, probs > 0)  # every possible column drawn, no impossible one
    torch.testing.assert_close(freq, probs, rtol=0, atol=0.015)  # binomial sd <= 0.0036 at 20k draws
    # rows that sum to 1 only up to rounding (a softmax over 50k columns) still draw inside the row
    big = torch.randn(4, 50257, generator=torch.Generator().manual_seed(1)).softmax(dim=-1)
    assert int(torch.cat([draw(big, g) for _ in range(200)]).max()) < 50257


def sampled_distributions(settings: dict, spread: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(ours, transformers') distributions over a GPT-2-sized vocabulary, eight rows of N(0, spread²)
    logits. The reference is what `generate(do_sample=True)` samples from: transformers'
    temperature, top-k and top-p warpers, then a softmax."""
    pytest.importorskip("transformers")
    from benchmarks.bench_sample import anchor_warpers
    from mmembed.decoder.sampling import distribution

    s = Sampling(**settings)
    logits = torch.randn(8, 50257, generator=torch.Generator().manual_seed(8)) * spread
    expected = anchor_warpers(s)(torch.zeros(8, 1, dtype=torch.long), logits.clone()).softmax(dim=-1)
    return distribution(logits, s), expected


@pytest.mark.parametrize("settings", [
    {"temperature": 0.8}, {"temperature": 1.3, "top_k": 50}, {"temperature": 0.8, "top_p": 0.95},
    {"temperature": 0.7, "top_k": 200, "top_p": 0.9}, {"temperature": 1.0, "top_p": 0.5},
])
def test_the_sampled_distribution_equals_transformers_warpers(settings):
    ours, expected = sampled_distributions(settings)
    assert torch.equal(ours > 0, expected > 0)  # the same tokens kept, the edge of top-p included
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("settings", [{"temperature": 1.0, "top_k": 2}, {"temperature": 1.0, "top_k": 2, "top_p": 0.95}])
def test_top_k_keeps_every_token_tied_with_the_kth_as_transformers_does(settings):
    """`topk` kept exactly k tokens, which of the tied ones depending on the kernel (ties are common in
    half-precision logits)."""
    pytest.importorskip("transformers")
    from benchmarks.bench_sample import anchor_warpers
    from mmembed.decoder.sampling import distribution

    s = Sampling(**settings)
    for vocab in (6, 40, 5000):
        logits = torch.full((2, vocab), -1.0)
        logits[:, :4] = torch.tensor([3.0, 1.0, 1.0, 1.0])
        logits[1] = logits[1].flip(0)  # the tied tokens at the other end of the row
        expected = anchor_warpers(s)(torch.zeros(2, 1, dtype=torch.long), logits.clone()).softmax(dim=-1)
        ours = distribution(logits, s)
        assert torch.equal(ours > 0, expected > 0) and int((ours > 0).sum()) == 8, vocab
        torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("temperature", [1e-46, 1e-50, 1e39])
def test_temperatures_past_float32s_range_sample_sensibly(temperature):
    """They rounded to 0 or inf in float32: 0/0 or -inf/inf gave NaN, then an index error."""
    from mmembed.decoder.sampling import choose

    logits = torch.tensor([[2.0, 1.0, float("-inf"), 0.5]])
    choice = choose(logits, Sampling(temperature), torch.Generator().manual_seed(0))
    assert torch.isfinite(choice.logprobs).all() and int(choice.tokens) != 2
    if temperature < 1:
        assert int(choice.tokens) == 0 and float(choice.entropy) == pytest.approx(0.0, abs=1e-6)
    else:  # uniform over the three finite tokens
        assert float(choice.entropy) == pytest.approx(math.log(3), abs=1e-6)


def test_a_nucleus_wider_than_the_candidates_is_found_by_sorting_the_whole_row():
    from mmembed.decoder.sampling import NUCLEUS_CANDIDATES

    ours, expected = sampled_distributions({"temperature": 0.8, "top_p": 0.99})  # 2,929 to 6,528 tokens a row
    kept = (expected > 0).sum(dim=-1)
    assert int(kept.max()) > NUCLEUS_CANDIDATES > int(kept.min())  # one row needs the sort, others not
    assert torch.equal(ours > 0, expected > 0)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)


def test_stop_strings_cut_the_text_and_stop_ids_end_generation():
    pm = prompt_model()
    (full,) = run(pm, [PROMPTS[0]], n=20, seed=1, temperature=1.2)
    assert len(full.text) > 4
    cut_at = len(full.text) // 2
    stop = full.text[cut_at: cut_at + 2]
    resolved = resolve_prompts([PROMPTS[0]], fake_embed, DIM, CPU)
    (stopped,) = generate(pm.lm, pm.fmt, resolved, 20, Sampling(1.2), Stops.parse(stop), 1, CPU)
    assert stopped.finish_reason == "stop" and stopped.text == full.text[: full.text.find(stop)]
    (by_id,) = generate(pm.lm, pm.fmt, resolved, 20, Sampling(1.2), Stops.parse(full.token_ids[0]), 1, CPU)
    assert by_id.token_ids == full.token_ids[:1] and by_id.text == "" and by_id.finish_reason == "stop"
    with pytest.raises(ValueError):
        Stops.parse(["", 3])
    # any integer type is a token id (numpy's was "not iterable", or not an id); ids are checked
    # against the vocabulary when it is known (an id past it could never stop anything)
    import numpy as np

    assert Stops.parse(np.int64(3)).ids == Stops.parse([np.int64(3), 3]).ids == frozenset({3})
    for bad in (3.5, [-5], [10**9], b"the", bytearray(b"ab")):  # bytes were read as token ids 116, 104, 101
        with pytest.raises(ValueError, match="stop"):
            Stops.parse(bad, vocab_size=300)


def test_stream_pieces_join_to_the_generated_text():
    pm = prompt_model()
    (resolved,) = resolve_prompts([PROMPTS[1]], fake_embed, DIM, CPU)
    pieces = list(stream(pm.lm, pm.fmt, resolved, 25, Sampling(1.0), Stops(), 11, CPU))
    (out,) = run(pm, [PROMPTS[1]], n=25, seed=11, temperature=1.0)
    assert len(pieces) > 1 and "".join(pieces) == out.text


def test_a_suspended_stream_leaves_the_decoders_mode_as_its_caller_sets_it():
    """A half-read stream held the decoder in eval mode, and once collected undid a later eval()."""
    pm = lively(prompt_model(dropout=0.5), std=0.3)  # dropout: a step run in training mode would differ
    (resolved,) = resolve_prompts([PROMPTS[1]], fake_embed, DIM, CPU)
    (out,) = run(pm, [PROMPTS[1]], n=25, seed=11, temperature=1.0)
    pm.lm.train()
    pieces = stream(pm.lm, pm.fmt, resolved, 25, Sampling(1.0), Stops(), 11, CPU)
    text = next(pieces)
    assert pm.lm.training  # suspended: the caller's mode
    text += "".join(pieces)
    assert text == out.text and len(out.token_ids) > 5 and pm.lm.training  # every step ran in eval mode
    suspended = stream(pm.lm, pm.fmt, resolved, 25, Sampling(1.0), Stops(), 11, CPU)
    next(suspended)
    pm.lm.eval()
    del suspended
    gc.collect()
    assert not pm.lm.training


def test_generation_reports_one_entropy_and_logprob_per_token():
    pm = prompt_model()
    for out in run(pm, PROMPTS, n=9, seed=2, temperature=0.8):
        assert len(out.token_ids) == len(out.logprobs) == len(out.entropy) <= 9
        assert all(lp <= 0 for lp in out.logprobs) and all(h >= 0 for h in out.entropy)
        assert out.finish_reason in ("eos", "length")



@pytest.mark.parametrize("seed", [1.5, True, "3", -1, 2**64])
def test_a_seed_that_is_not_a_non_negative_integer_is_a_value_error(seed):
    """1.5, True, "3" raised RuntimeError; 2**64 an OverflowError's ValueError; -1 and 2**64 - 1 drew alike."""
    from mmembed.decoder.score import check_generation

    pm = prompt_model()
    with pytest.raises(ValueError, match="seed must be an integer in"):
        run(pm, [PROMPTS[2]], n=2, seed=seed, temperature=1.0)
    with pytest.raises(ValueError, match="seed must be an integer in"):
        check_generation(seed=seed)  # what chat checks before a session starts


def test_a_float64_vector_past_float32s_range_is_read_by_its_direction():
    """1e300 reported "holds NaN or Inf" and 1e-300 "a zero vector": it was cast to float32 first."""
    direction = torch.nn.functional.normalize(torch.randn(DIM, dtype=torch.float64), dim=0)
    (a,) = resolve_prompts([["x", direction * 1e300]], fake_embed, DIM, CPU)
    (b,) = resolve_prompts([["x", direction * 1e-300]], fake_embed, DIM, CPU)
    torch.testing.assert_close(a.vectors[0], direction.float(), atol=1e-6, rtol=0)
    torch.testing.assert_close(b.vectors[0], direction.float(), atol=1e-6, rtol=0)


def test_numpy_numbers_are_numbers_and_nan_logits_are_an_error():
    """np.int64(8) was 'max_new_tokens must be an integer >= 1, got np.int64(8)'; greedy argmax of
    NaN logits answered '' with finish_reason eos."""
    import numpy as np

    pm = prompt_model()
    (resolved,) = resolve_prompts([PROMPTS[1]], fake_embed, DIM, CPU)
    (a,) = generate(pm.lm, pm.fmt, [resolved], np.int64(6), Sampling(np.float32(0.7), np.int64(5), np.float64(0.9)),
                    Stops(), np.int64(3), CPU)
    (b,) = generate(pm.lm, pm.fmt, [resolved], 6, Sampling(0.7, 5, 0.9), Stops(), 3, CPU)
    assert a.token_ids == b.token_ids
    logits = torch.zeros(2, 10)
    logits[1, 3] = float("nan")
    with pytest.raises(ValueError, match="logits hold NaN or inf"):
        choose(logits, Sampling())


def test_a_batch_prompt_too_long_for_the_context_is_named():
    from mmembed.errors import BadInput

    pm = prompt_model()
    long = " ".join(["one two"] * 200)
    resolved = resolve_prompts([PROMPTS[0], [long], PROMPTS[1]], fake_embed, DIM, CPU)
    with pytest.raises(BadInput, match=r"^prompt 1 of (more than )?\d+ tokens exceeds the decoder's context"):
        generate(pm.lm, pm.fmt, resolved, 4, Sampling(), Stops(), None, CPU)


def test_a_decoder_in_eval_mode_is_not_switched_at_every_step(monkeypatch):
    """The mode was set around each step even for a decoder already in eval mode (as a loaded one
    is): two walks over every module per token, 30% of a token's time."""
    pm = prompt_model()
    pm.lm.eval()
    calls = []
    monkeypatch.setattr(type(pm.lm), "train", lambda self, mode=True: calls.append(mode) or self)
    run(pm, [PROMPTS[1]], n=5)
    assert calls == []
