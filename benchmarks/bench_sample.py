"""B-sample: choosing the next token (temperature, top-k, top-p) from 50k logits, ours vs transformers.

    python -m benchmarks.bench_sample            # batch 1 and 8, three settings
    python -m benchmarks.bench_sample --quick    # fewer rounds

Work: one sampling step over (B, 50,257) logits (GPT-2's vocabulary), drawn once per batch size as
N(0, 3²), about as spread as a trained LM's logits. Three settings: temperature 0.8 + top-k 50 +
top-p 0.95 (top-p then sees only top-k's 50 candidates), temperature 0.8 + top-p 0.95 (the anchor
sorts the whole vocabulary; ours looks among the best 4,096 first and keeps 547–2,122 tokens a
row here), and temperature 0.8 alone (a draw over the whole vocabulary). Ours is
`mmembed.decoder.sampling.choose`, which also returns each pick's log-probability and the entropy
of the distribution it drew from; the anchor is what `generate` does with `do_sample=True`:
transformers' `TemperatureLogitsWarper`, `TopKLogitsWarper` and `TopPLogitsWarper` in a
`LogitsProcessorList`, a softmax and `torch.multinomial`.

Both sides must sample from the same distribution: `max_abs_prob_diff` compares our filtered
distribution (scattered back to the vocabulary) with the softmax of the anchor's warped scores,
and `same_support` says whether both kept exactly the same tokens; a row is `correct` when the
support is the same and `max_abs_prob_diff` <= TOLERANCE = 1e-6 (<= 2e-7 measured). Medians of
interleaved rounds of `CALLS` steps each; 2 threads. Goal: ratio ≥ 1.0.
"""

from __future__ import annotations

import logging

import torch

from benchmarks.bench_train import interleaved_times, timing_stats
from benchmarks.common import ratio_report, rounds_main, setup
from mmembed.decoder.sampling import Sampling, choose, distribution

VOCAB, SPREAD, CALLS = 50257, 3.0, 50
TOLERANCE = 1e-6  # max_abs_prob_diff of a correct row: float rounding of the two softmaxes (<= 2e-7)
SETTINGS = {"T+k+p": Sampling(0.8, top_k=50, top_p=0.95), "T+p": Sampling(0.8, top_p=0.95), "T": Sampling(0.8)}


def anchor_warpers(s: Sampling):
    """The `LogitsProcessorList` `generate` builds for these settings (temperature, top-k, top-p)."""
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    warpers = LogitsProcessorList([TemperatureLogitsWarper(s.temperature)])
    if s.top_k is not None:
        warpers.append(TopKLogitsWarper(s.top_k))
    if s.top_p is not None:
        warpers.append(TopPLogitsWarper(s.top_p))
    return warpers


def anchor_step(warpers, input_ids: torch.Tensor, logits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One sampling step as transformers' `generate` takes it: (B,) token ids."""
    probs = warpers(input_ids, logits).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def compare(logits: torch.Tensor, s: Sampling, warpers) -> dict:
    """How far the two sides' sampling distributions are apart."""
    ours = distribution(logits, s)
    anchor = warpers(torch.zeros(logits.shape[0], 1, dtype=torch.long), logits.clone()).softmax(dim=-1)
    diff, same = float((ours - anchor).abs().max()), bool(torch.equal(ours > 0, anchor > 0))
    return {"correct": same and diff <= TOLERANCE,
            "correct_if": f"same_support and max_abs_prob_diff <= {TOLERANCE:g}",
            "max_abs_prob_diff": diff, "same_support": same,
            "kept_tokens": [int(n) for n in (ours > 0).sum(dim=-1)]}


def bench(batch: int, name: str, s: Sampling, rounds: int, calls: int = CALLS) -> dict:
    logits = torch.randn(batch, VOCAB, generator=torch.Generator().manual_seed(batch)) * SPREAD
    input_ids = torch.zeros(batch, 1, dtype=torch.long)  # the warpers ignore it (no repetition penalty)
    warpers = anchor_warpers(s)
    g_ours, g_anchor = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)

    def ours():
        for _ in range(calls):
            choose(logits, s, g_ours)

    def anchor():
        for _ in range(calls):
            anchor_step(warpers, input_ids, logits, g_anchor)

    with torch.inference_mode():
        check = compare(logits, s, warpers)
        times = interleaved_times({"ours": ours, "anchor": anchor}, rounds=rounds)
    stats = timing_stats(times)
    per_s = {k: calls / v for k, v in stats["seconds"].items()}
    return ratio_report(f"B-sample B={batch} {name}", per_s["ours"], per_s["anchor"], "steps/s",
                        higher_is_better=True, goal=">= 1.0", batch=batch, vocab=VOCAB,
                        settings={"temperature": s.temperature, "top_k": s.top_k, "top_p": s.top_p},
                        calls_per_timing=calls, **check, **stats)


def run(quick: bool = False, rounds: int | None = None, calls: int = CALLS) -> dict:
    """Run B-sample. `quick`: 5 rounds instead of 15; `calls`: sampling steps per timing."""
    setup(threads=2, seed=0)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    rounds = rounds or (5 if quick else 15)
    rows = [bench(b, name, s, rounds, calls) for b in (1, 8) for name, s in SETTINGS.items()]
    return {"benchmark": "B-sample",
            "goal": "steps/s ratio >= 1.0 against transformers' warpers + softmax + multinomial, same distribution",
            "work": f"one sampling step over (B, {VOCAB}) logits, {calls} per timing, 2 threads",
            "rounds": rounds, "results": rows}


def main() -> None:
    rounds_main(run, __doc__, "fewer rounds")


if __name__ == "__main__":
    main()
