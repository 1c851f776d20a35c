"""Best-of-N descriptions (`decoder/score.py`): greedy answers against the best of N, ranked by the
decoder alone and by the decoder with the shared space, on the world's test split and its held-out
combinations (shape–colour pairs no training row holds).

    instruct-{test,heldout}.jsonl ─► description prompts with one picture or one sound
        ─► greedy                                  ─┐
        ─► best_of N at temperature T, weight W     ├► correct when every object's shape and colour is named
           the same candidates ranked by log-probability alone (weight 0)  ─┘
    and the candidates' ceiling: how often one of them was right (what a perfect judge would reach).

    python -m benchmarks.best_of runs/demo [--world data/shapes] [--n 16] [--temperature 1.0]
           [--weight 1.0] [--seed 0] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path
from typing import Any

from benchmarks.common import load_run, require_run, require_world
from mmembed.data.instructions import read_instructions
from mmembed.decoder.evaluate import fitting, row_prompt
from mmembed.decoder.score import check_generation
from mmembed.demo_prompting import row_group
from mmembed.evaluate_instructions import world_score
from mmembed.model import Model

GROUPS = ("description from an image", "description from a sound", "description from an image and its sound",
          "description from a caption")
SPLITS = {"test": "instruct-test.jsonl", "held-out": "instruct-heldout.jsonl"}
NEW_TOKENS = 48
FLAGS = {"best_of": "--n", "temperature": "--temperature", "rerank_weight": "--weight", "seed": "--seed"}


def run(run_dir: Path, world: Path, n: int, temperature: float, weight: float, seed: int) -> dict[str, Any]:
    model = load_run(run_dir)
    if model.prompt_model is None:  # was an AttributeError on its missing language model
        raise SystemExit(f"{run_dir}: the run has no decoder to describe with; train one with a decoder: section "
                         "(`mmembed demo` does)")
    out: dict[str, Any] = {"best_of": n, "temperature": temperature, "weight": weight, "seed": seed, "rows": []}
    for split, name in SPLITS.items():
        if not (world / name).is_file():
            continue
        rows = fitting(model, read_instructions(world / name).rows)
        for group in GROUPS:
            mine = [r for r in rows if row_group(r) == group]
            if mine:
                out["rows"].append({"split": split, "group": group, "n": len(mine),
                                    **_compare(model, mine, n, temperature, weight, seed)})
    return out


def _compare(model: Model, rows: list, n: int, temperature: float, weight: float, seed: int) -> dict[str, float]:
    prompts = [row_prompt(r) for r in rows]
    t0 = time.monotonic()
    greedy = model.generate(prompts, max_new_tokens=NEW_TOKENS)
    t1 = time.monotonic()
    best = model.generate(prompts, max_new_tokens=NEW_TOKENS, temperature=temperature, best_of=n, seed=seed,
                          rerank_weight=weight)
    t2 = time.monotonic()
    by_logprob = [max(b.candidates, key=lambda c: c.logprob).text if b.candidates else b.text for b in best]
    return {
        "greedy": _share(rows, [g.text for g in greedy]),
        "best of n, log-probability": _share(rows, by_logprob),
        "best of n, with the space": _share(rows, [b.text for b in best]),
        "a candidate was right": sum(any(world_score(r, c.text) for c in b.candidates) or world_score(r, b.text)
                                     for r, b in zip(rows, best)) / len(rows),
        "distinct candidates (mean)": sum(len(b.candidates) for b in best) / len(rows),
        "seconds greedy": t1 - t0,
        "seconds best of n": t2 - t1,
    }


def _share(rows: list, texts: list[str]) -> float:
    return sum(world_score(r, t) for r, t in zip(rows, texts)) / len(rows)


def table(result: dict[str, Any]) -> str:
    lines = [f"best of {result['best_of']} at temperature {result['temperature']:g}, space weight "
             f"{result['weight']:g}, seed {result['seed']}", "",
             "| split | prompts | n | greedy | best of n: log-prob | best of n: + space | a candidate right | "
             "distinct | s greedy | s best of n |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['split']} | {r['group']} | {r['n']} | {r['greedy']:.3f} | "
                     f"{r['best of n, log-probability']:.3f} | **{r['best of n, with the space']:.3f}** | "
                     f"{r['a candidate was right']:.3f} | {r['distinct candidates (mean)']:.1f} | "
                     f"{r['seconds greedy']:.1f} | {r['seconds best of n']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", type=Path, help="a run with a decoder stage")
    ap.add_argument("--world", type=Path, default=Path("data/shapes"))
    ap.add_argument("--n", type=int, default=16, help="candidates per prompt (best_of)")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--weight", type=float, default=1.0, help="rerank_weight: the shared space's weight")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="also write the result here")
    args = ap.parse_args(argv)
    try:  # was a ValueError after the first greedy pass
        check_generation(NEW_TOKENS, temperature=args.temperature, seed=args.seed, best_of=args.n,
                         rerank_weight=args.weight)
    except ValueError as e:  # "best_of must be ..." -> "--n must be ...": the flag the user gave
        raise SystemExit(re.sub(r"^\w+", lambda m: FLAGS.get(m[0], m[0]), str(e))) from None
    require_world(args.world, list(SPLITS.values()), "--world", any_of=True)  # was an empty table
    require_run(args.run)
    result = run(args.run, args.world, args.n, args.temperature, args.weight, args.seed)
    print(table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
