"""B-decode: greedy decoding tokens/s, our decoder vs transformers' `generate`, same weights.

    python -m benchmarks.bench_decode            # GPT-2 124M shape and a 6-layer 384-wide model
    python -m benchmarks.bench_decode --quick    # the small model only
    python -m benchmarks.bench_decode --device cuda   # on a GPU (each timed call ends with a synchronize)

A random `GPT2LMHeadModel` is saved with `save_pretrained` and loaded by `load_gpt2` (the path a
user takes), so both sides hold the same weights. Work: a 32-token prompt, 128 new tokens, greedy,
batch 1 and 8, no early stop (both sides write all 128 tokens). `agreement` compares the tokens:
random weights give near-flat logits, so a near-tie can flip one argmax and the row's continuation
then differs; it reports the first tokens and the share of each row written before a first flip. A
row is `correct` when every row's first token agrees and, on average, at least MIN_PREFIX = 0.9 of
each row comes before a first flip (a near-tie flip is rare: every token agreed in the runs so far;
a wrong position, mask or cache differs from the second token on, in every row). Anchors:
`generate` with its default dynamic cache, and with `cache_implementation="static"`; the ratio is
against the faster of the two. `ours_f_linear` is our loop with oneDNN switched off
(`encoders.linear.onednn(False)`): every linear through `F.linear`, i.e. MKL on the CPU, as the
anchor's.

Hardware bound: one decoding step reads every weight once, so tokens/s ≤ batch × bandwidth /
weight bytes; `fraction_of_bound` is ours against it, with the bandwidth measured now. The KV
cache's memory is reported (2 × layers × batch × heads × (32 + 128) × head_dim × 4 bytes).
Each figure is the median of interleaved repeats after a warm-up; 2 threads. On a GPU the bandwidth
is a sum over a device buffer and every timed call synchronises before the clock is read.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import tempfile
from pathlib import Path

import torch

from benchmarks.bench_train import interleaved_times, timing_stats
from benchmarks.common import count, memory_bandwidth, ratio_report, setup
from encoders.linear import onednn
from mmembed.decoder import Sampling, decode_steps, load_gpt2

PROMPT, NEW = 32, 128
SIZES = {
    "gpt2-124M": {"vocab_size": 50257, "n_embd": 768, "n_layer": 12, "n_head": 12, "n_positions": 1024},
    "6x384": {"vocab_size": 8192, "n_embd": 384, "n_layer": 6, "n_head": 6, "n_positions": 1024},
}
GREEDY = Sampling(0.0)
MIN_PREFIX = 0.9  # agreement["agreeing_prefix"] of a correct row (1.0 measured)


def ours_generate(decoder, ids: torch.Tensor) -> torch.Tensor:
    """128 greedy tokens through our KV-cached loop: (B, NEW) ids."""
    with torch.inference_mode():
        embeds = decoder.token_embedding(ids)
        steps = [c.tokens for c in decode_steps(decoder, embeds, None, NEW, GREEDY)]
    return torch.stack(steps, dim=1)


def ours_f_linear(decoder, ids: torch.Tensor) -> torch.Tensor:
    """The same loop with every linear layer through `F.linear` (MKL on the CPU), not oneDNN."""
    with onednn(False):
        return ours_generate(decoder, ids)


def hf_generate(model, ids: torch.Tensor, static: bool) -> torch.Tensor:
    extra = {"cache_implementation": "static"} if static else {}
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, min_new_tokens=NEW,
                             do_sample=False, pad_token_id=0, eos_token_id=None, **extra)
    return out[:, PROMPT:]


def synchronised(fn, device: torch.device):
    """`fn` that returns only once the device has finished its work (a no-op on the CPU)."""
    if device.type != "cuda":
        return fn

    def call():
        out = fn()
        torch.cuda.synchronize(device)
        return out

    return call


def bench_size(name: str, cfg: dict, batches: tuple[int, ...], rounds: int, bandwidth: float,
               device: torch.device) -> list[dict]:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(**cfg)).eval()
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        ours = load_gpt2(Path(tmp))
    hf, ours = hf.to(device), ours.to(device)
    weight_bytes = sum(p.numel() * p.element_size() for p in {id(p): p for p in ours.parameters()}.values())
    rows = []
    for batch in batches:
        ids = torch.randint(0, cfg["vocab_size"], (batch, PROMPT), generator=torch.Generator().manual_seed(batch))
        ids = ids.to(device)
        fns = {"ours": lambda: ours_generate(ours, ids), "hf_dynamic": lambda: hf_generate(hf, ids, False),
               "hf_static": lambda: hf_generate(hf, ids, True), "ours_f_linear": lambda: ours_f_linear(ours, ids)}
        fns = {k: synchronised(fn, device) for k, fn in fns.items()}
        same = fns["ours"]() == fns["hf_dynamic"]()  # (B, NEW)
        # random weights give near-flat logits: a near-tie can flip one argmax, after which a row's
        # continuation differs; the prefix agreement says how far the two agree
        agree = {"all_tokens_equal": bool(same.all()), "first_token_equal": float(same[:, 0].float().mean()),
                 "agreeing_prefix": float(same.long().cumprod(dim=1).sum(dim=1).float().mean() / NEW)}
        correct = agree["first_token_equal"] == 1.0 and agree["agreeing_prefix"] >= MIN_PREFIX
        times = interleaved_times(fns, rounds=rounds, warmup=1)
        anchor_name = min(("hf_dynamic", "hf_static"), key=lambda k: sorted(times[k])[len(times[k]) // 2])
        stats = timing_stats(times, anchor=anchor_name)
        tps = {k: batch * NEW / v for k, v in stats["seconds"].items()}
        bound = batch * bandwidth / weight_bytes
        kv_bytes = 2 * cfg["n_layer"] * batch * (PROMPT + NEW) * cfg["n_embd"] * 4
        bf16 = ours_bf16(ours, ids, rounds, device)
        rows.append(ratio_report(
            f"decode {name} batch {batch}", tps["ours"], tps[anchor_name], "tokens/s", higher_is_better=True,
            correct=correct, correct_if=f"agreement: first_token_equal == 1.0 and agreeing_prefix >= {MIN_PREFIX}",
            anchor_impl=anchor_name, tokens_per_s=tps, agreement=agree, bound_tokens_per_s=bound,
            fraction_of_bound=tps["ours"] / bound, weight_bytes=weight_bytes, kv_cache_bytes=kv_bytes,
            ratio_paired=stats["ratio_paired"], ratio_best=stats["ratio_best"], ours_bf16=bf16))
    return rows


def ours_bf16(decoder, ids: torch.Tensor, rounds: int, device: torch.device) -> dict:
    """The same work with bf16 weights (half the bytes per step): tokens/s and agreement."""
    fp32 = ours_generate(decoder, ids)
    low = copy.deepcopy(decoder).to(torch.bfloat16)  # a copy: bf16 and back would leave the weights rounded
    fn = synchronised(lambda: ours_generate(low, ids), device)
    times = interleaved_times({"bf16": fn}, rounds=max(3, rounds), warmup=1)
    same = float((ours_generate(low, ids) == fp32).float().mean())
    seconds = statistics.median(times["bf16"])  # of 3 or more calls (of 2 it took the slower one)
    return {"tokens_per_s": ids.shape[0] * NEW / seconds, "tokens_same_as_fp32": same}


def run(quick: bool = False, rounds: int | None = None, device: str = "cpu") -> dict:
    setup(threads=2, seed=0)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    dev = torch.device(device)
    bandwidth = memory_bandwidth(device=dev)
    sizes = {"6x384": SIZES["6x384"]} if quick else SIZES
    rows = []
    for name, cfg in sizes.items():
        rows += bench_size(name, cfg, (1, 8), rounds or (3 if name == "gpt2-124M" else 5), bandwidth, dev)
    return {
        "benchmark": "B-decode",
        "goal": "tokens/s ratio >= 1.15 (GPT-2 124M fp32) and >= 1.5 (6x384) against transformers generate",
        "work": f"prompt {PROMPT} + {NEW} new tokens, greedy, fp32, 2 threads, on {dev}",
        "bandwidth_bytes_per_s": bandwidth,
        "results": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the small model only")
    parser.add_argument("--rounds", type=count, default=None)
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    args = parser.parse_args()
    print(json.dumps(run(quick=args.quick, rounds=args.rounds, device=args.device), indent=2))


if __name__ == "__main__":
    main()
