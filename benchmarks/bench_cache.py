"""B-cache: generation with the KV cache vs recomputing the whole context at every step (nanoGPT).

    python -m benchmarks.bench_cache            # 6 blocks of 384, sequences ending at T = 64 … 512
    python -m benchmarks.bench_cache --quick    # 2 blocks of 128, T = 64 and 256

Work: a random prompt of T − 32 tokens, then 32 greedy tokens, so the sequence ends at T; batch 1,
fp32, 2 threads, a random `Decoder` (rotary positions, vocabulary 8,192). Ours is the generation
loop (`decode_steps`: one prefill fills the caches, then each step feeds one token); the anchor is
the same model without a cache, as nanoGPT's `generate` runs it: each step feeds the whole sequence
so far and keeps the last position's logits. A step without the cache costs a forward over all t
tokens, with it one token's against t cached keys, so the speed-up should grow with T; both sides
include the prompt's forward. `tokens_equal` checks that both wrote the same tokens (the same
model, so only float summation order differs between them); a row is `correct` when they did.
Medians of interleaved rounds.
Goal: the speed-up grows with T; identical tokens.
"""

from __future__ import annotations

import torch

from benchmarks.bench_train import interleaved_times, timing_stats
from benchmarks.common import ratio_report, rounds_main, setup
from mmembed.decoder import Sampling, decode_steps
from mmembed.decoder.model import Decoder

NEW, VOCAB = 32, 8192
MODELS = {"full": {"width": 384, "layers": 6, "heads": 6}, "quick": {"width": 128, "layers": 2, "heads": 4}}
LENGTHS = {"full": (64, 128, 256, 512), "quick": (64, 256)}
GREEDY = Sampling(0.0)


@torch.inference_mode()
def cached(decoder: Decoder, prompt: torch.Tensor) -> torch.Tensor:
    """NEW greedy tokens through the KV-cached loop: (B, NEW)."""
    embeds = decoder.token_embedding(prompt)
    return torch.stack([c.tokens for c in decode_steps(decoder, embeds, None, NEW, GREEDY)], dim=1)


@torch.inference_mode()
def recomputed(decoder: Decoder, prompt: torch.Tensor) -> torch.Tensor:
    """NEW greedy tokens, the whole sequence fed again at every step: (B, NEW)."""
    ids = prompt
    for _ in range(NEW):
        logits = decoder.lm_head(decoder.hidden(ids)[:, -1])  # (B, V)
        ids = torch.cat([ids, logits.argmax(dim=-1, keepdim=True)], dim=1)
    return ids[:, prompt.shape[1]:]


def bench_length(decoder: Decoder, length: int, rounds: int) -> dict:
    prompt = torch.randint(0, VOCAB, (1, length - NEW), generator=torch.Generator().manual_seed(length))
    ours, anchor = cached(decoder, prompt), recomputed(decoder, prompt)
    same = ours == anchor  # (1, NEW)
    equal = bool(same.all())
    times = interleaved_times({"ours": lambda: cached(decoder, prompt), "anchor": lambda: recomputed(decoder, prompt)},
                              rounds=rounds, warmup=1)
    stats = timing_stats(times)
    tps = {k: NEW / v for k, v in stats["seconds"].items()}
    kv_bytes = 2 * decoder.layers * length * decoder.width * 4
    return ratio_report(f"B-cache T={length}", tps["ours"], tps["anchor"], "tokens/s", higher_is_better=True,
                        goal="grows with T", sequence=length, prompt_tokens=length - NEW, new_tokens=NEW,
                        correct=equal, correct_if=f"tokens_equal (all {NEW} tokens)", tokens_equal=equal,
                        agreeing_prefix=int(same.long().cumprod(dim=1).sum()), kv_cache_bytes=kv_bytes, **stats)


def run(quick: bool = False, rounds: int | None = None) -> dict:
    setup(threads=2, seed=0)
    size = "quick" if quick else "full"
    decoder = Decoder(VOCAB, max_len=max(LENGTHS[size]), positional="rotary", **MODELS[size]).eval()
    rounds = rounds or (3 if quick else 5)
    rows = [bench_length(decoder, t, rounds) for t in LENGTHS[size]]
    speedups = [r["ratio"] for r in rows]
    return {"benchmark": "B-cache",
            "goal": "the KV cache's speed-up over recomputing the context grows with T; identical tokens",
            "model": {"vocab": VOCAB, **MODELS[size], "positional": "rotary"},
            "work": f"prompt of T - {NEW} tokens + {NEW} greedy tokens, batch 1, fp32, 2 threads",
            "rounds": rounds, "speedup_grows_with_T": all(b > a for a, b in zip(speedups, speedups[1:])),
            "all_tokens_equal": all(r["tokens_equal"] for r in rows), "results": rows}


def main() -> None:
    rounds_main(run, __doc__, "a small model, T = 64 and 256")


if __name__ == "__main__":
    main()
