"""Scoring given answers, and best-of-N answers ranked by the decoder and the shared space.

    prompt ─► the greedy answer + (N − 1) answers sampled at the caller's temperature
           ─► distinct candidates ─► mean log-probability per token (the decoder, teacher-forced, T = 1)
                                   ─► + weight · logit_scale · mean cosine(answer's vector, prompt's media)
           ─► the best candidate, with every candidate and its scores in `Generation.candidates`

Why the shared space judges: a decoder trained by maximum likelihood learns which words follow which,
so a combination it never saw in training (a "yellow square" when yellow squares were held out) gets
little probability after "yellow" however clearly the picture shows a square. The contrastive space
was trained to place whole captions near their media, and it places captions of unseen combinations
too (held-out retrieval), so it can tell the decoder's right answer from its likelier wrong ones. This
is re-ranking a captioner's candidates with an image–sentence ranking model (Nikolaus et al.,
"Compositional Generalization in Image Captioning", CoNLL 2019), as DALL·E's samples were re-ranked by
CLIP. The weight-0 ranking is OpenAI's `best_of` (highest log-probability), per token so that a short
answer is not favoured for its length.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mmembed.decoder.fusion import MultimodalLM
from mmembed.decoder.answer import Generation, Stops
from mmembed.decoder.generate import check_max_new_tokens, check_seed, generate
from mmembed.decoder.prompt import PromptFormat, Resolved
from mmembed.decoder.sampling import Sampling
from mmembed.errors import BadInput
from mmembed.scalars import as_integer

BATCH = 64  # prompts per generation batch
FORCED_ROWS = 64  # answers teacher-forced in one pass (best_of, a sweep's entropies)
MAX_COPIES = 1024  # copies of one prompt in a batch (best_of, a temperature sweep's samples): 2e9 exhausted memory


@dataclass(frozen=True)
class Candidate:
    """One distinct answer considered by `best_of`.

    Attributes:
        text: the answer.
        token_ids: its generated ids.
        logprob: its mean log-probability per token under the decoder's own distribution (T = 1).
        similarity: mean cosine between its vector and the prompt's media vectors in the shared
            space; None when not used (weight 0, or a prompt without media).
        score: logprob + weight · logit_scale · similarity (logprob alone when similarity is None).
    """

    text: str
    token_ids: list[int]
    logprob: float
    similarity: float | None
    score: float


@torch.inference_mode()
def teacher_forced_logits(lm: MultimodalLM, fmt: PromptFormat, prompt: Resolved,
                          answers: Sequence[Sequence[int]]) -> Tensor:
    """Logits (N, L, V) of each answer's tokens given the prompt and the answer's earlier tokens:
    entry [i, t] is the distribution token t of answer i was drawn from at T = 1 (prompt-only ids at
    -inf, as in generation), for t below that answer's length L_i (L = the longest, at least 1;
    shorter answers are right-padded, which nothing before the padding sees)."""
    head = fmt.encode(prompt.parts)
    P = len(head)
    rows = [head + list(a[:-1]) for a in answers]  # nothing reads what follows an answer's last token
    width = max(len(r) for r in rows)
    device = lm.decoder.token_embedding.weight.device
    ids = torch.tensor([r + [fmt.pad_id] * (width - len(r)) for r in rows], device=device)  # (N, P + L - 1)
    media = prompt.vectors.to(device).repeat(len(rows), 1) if prompt.vectors.shape[0] else None  # row-major slots
    was_training = lm.training
    lm.eval()
    try:
        hidden = lm.decoder.hidden(inputs_embeds=lm.embed(ids, media))[:, P - 1:]  # (N, L, C)
        never = torch.tensor(fmt.never_written(lm.decoder.vocab_size), dtype=torch.long, device=device)  # as generation
        return lm.decoder.lm_head(hidden).float().index_fill_(-1, never, float("-inf"))
    finally:
        lm.train(was_training)


def per_token(lm: MultimodalLM, fmt: PromptFormat, prompt: Resolved, answers: Sequence[Sequence[int]],
              reduce: Callable[[Tensor, Tensor], Tensor]) -> list[list[float]]:
    """`reduce(logits (n, L, V), ids (n, L))` → (n, L) per answer token, teacher-forced `FORCED_ROWS`
    answers at a time (the logits of 1,024 answers over a 50k vocabulary are GBs); one list per
    answer, as long as it."""
    out: list[list[float]] = []
    for start in range(0, len(answers), FORCED_ROWS):
        chunk = answers[start:start + FORCED_ROWS]
        logits = teacher_forced_logits(lm, fmt, prompt, chunk)  # (n, L, V)
        ids = torch.zeros(logits.shape[:2], dtype=torch.long, device=logits.device)  # (n, L), right-padded
        for i, a in enumerate(chunk):
            ids[i, :len(a)] = torch.tensor(a, dtype=torch.long)
        values = reduce(logits, ids).cpu()
        out += [values[i, :len(a)].tolist() for i, a in enumerate(chunk)]
    return out


def answer_logprobs(lm: MultimodalLM, fmt: PromptFormat, prompt: Resolved,
                    answers: Sequence[Sequence[int]]) -> list[list[float]]:
    """Log-probability of every token of each answer under the decoder (T = 1), teacher-forced."""
    return per_token(lm, fmt, prompt, answers,
                     lambda logits, ids: logits.gather(-1, ids[..., None])[..., 0] - logits.logsumexp(dim=-1))


def check_best_of(best_of: int, weight: float, sampling: Sampling) -> None:
    """ValueError for a best_of that is not a positive integer, a weight that is not a finite number
    >= 0, or several candidates asked of greedy decoding (they would all be the same)."""
    if (n := as_integer(best_of)) is None or not 1 <= n <= MAX_COPIES:  # numpy's ints too, as seed takes
        raise ValueError(f"best_of must be an integer in [1, {MAX_COPIES}], got {best_of!r}")
    if not _finite(weight) or weight < 0:
        raise ValueError(f"rerank_weight must be a finite number >= 0, got {weight!r}")
    if best_of > 1 and sampling.greedy:
        raise ValueError("best_of > 1 samples its candidates: give a temperature > 0")


def check_generation(max_new_tokens: int = 32, temperature: float = 0.0, top_k: int | None = None,
                     top_p: float | None = None, stop: Any = None, seed: int | None = None, best_of: int = 1,
                     rerank_weight: float = 1.0) -> None:
    """What `Model.generate` checks of its settings, without a prompt or a model: ValueError for a
    bad one (TypeError for an unknown name). A caller that stores a turn before answering it asks
    first, so a refused setting stores nothing."""
    check_max_new_tokens(max_new_tokens)
    sampling = Sampling(temperature, top_k, top_p)
    Stops.parse(stop)
    check_seed(seed)
    check_best_of(best_of, rerank_weight, sampling)


def best_of(lm: MultimodalLM, fmt: PromptFormat, prompts: list[Resolved], n: int, max_new_tokens: int,
            sampling: Sampling, stop: Stops, seed: int | None, device: torch.device,
            embed_answers: Callable[[list[str]], Tensor] | None, logit_scale: float,
            weight: float) -> list[Generation]:
    """The best of `n` candidates per prompt (the greedy answer and n − 1 samples), see the module.

    Args:
        embed_answers: answers → (N, D) unit vectors in the shared space (the text tower); None
            ranks by log-probability alone (so does weight 0).
        logit_scale: the space's contrastive scale, which puts cosines on the scale of log-odds.
        seed: seeds the samples; batch i of 64 sampled rows draws with seed + i.

    Returns:
        One `Generation` per prompt: the chosen candidate as generated (its `logprobs` and `entropy`
        are those of the distribution it was drawn from), with `candidates` best first.
    """
    greedy = _in_batches(lm, fmt, prompts, max_new_tokens, Sampling(), stop, None, device)
    copies = [p for p in prompts for _ in range(n - 1)]
    sampled = _in_batches(lm, fmt, copies, max_new_tokens, sampling, stop, seed, device)
    distinct = [_distinct([greedy[i], *sampled[i * (n - 1):(i + 1) * (n - 1)]]) for i in range(len(prompts))]
    vectors = None  # answer text → its vector, for the prompts with media; one text-tower call for all of them
    if embed_answers is not None and weight > 0:
        said = list(dict.fromkeys(t for d, p in zip(distinct, prompts) if p.vectors.shape[0] for t in d if t.strip()))
        vectors = _answer_vectors(embed_answers, said)
    return [_choose(lm, fmt, p, d, g, vectors, logit_scale * weight) for p, d, g in zip(prompts, distinct, greedy)]


def _answer_vectors(embed_answers: Callable, texts: list[str]) -> dict[str, Tensor]:
    """Answer text → its vector; a text the text tower refuses (one its cleaning empties, as CLIP's
    does a control character) gets none and is scored as an empty answer is, not the end of best_of."""
    if not texts:
        return {}
    try:
        return dict(zip(texts, embed_answers(texts).float().cpu()))
    except BadInput:
        out = {}
        for text in texts:
            try:
                out[text] = embed_answers([text]).float().cpu()[0]
            except BadInput:
                continue
        return out


def _finite(x: object) -> bool:
    """A finite real number of any type (numpy's too), not a bool; 10**400 is not (as a float, inf)."""
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, numbers.Real):
        return False
    try:
        return math.isfinite(x)
    except OverflowError:
        return False


def _in_batches(lm: MultimodalLM, fmt: PromptFormat, prompts: list[Resolved], max_new_tokens: int,
                sampling: Sampling, stop: Stops, seed: int | None, device: torch.device) -> list[Generation]:
    out: list[Generation] = []
    for b, start in enumerate(range(0, len(prompts), BATCH)):
        # a generator, not `seed + b`: the seed was checked, and MAX_SEED leaves room for b; checked
        # again, a seed near MAX_SEED was refused at the second batch, after the first had run
        batch_seed = None if seed is None else torch.Generator(device=device).manual_seed(int(seed) + b)
        out += generate(lm, fmt, prompts[start:start + BATCH], max_new_tokens, sampling, stop, batch_seed, device)
    return out


def _distinct(drawn: list[Generation]) -> dict[str, Generation]:
    """Answer text → its first generation (the greedy answer comes first: it wins ties); answers
    without a single token (no room left in the context) are left out."""
    first: dict[str, Generation] = {}
    for g in drawn:
        if g.token_ids:
            first.setdefault(g.text, g)
    return first


def _choose(lm: MultimodalLM, fmt: PromptFormat, prompt: Resolved, first: dict[str, Generation], greedy: Generation,
            vectors: dict[str, Tensor] | None, scale: float) -> Generation:
    """Score the distinct candidates of one prompt and return the best, with all of them attached."""
    if not first:  # no room for a single token: nothing to choose from
        return greedy
    texts = list(first)
    similarity: list[float | None] = [None] * len(texts)
    judged = [t for t in texts if t in vectors] if vectors is not None and prompt.vectors.shape[0] else []
    if judged:  # an answer without a vector (empty, or refused by the text tower) is dropped while others are left
        texts = judged
        z = torch.stack([vectors[t] for t in texts])  # (S, D)
        similarity = (z @ prompt.vectors.float().cpu().T).mean(dim=1).tolist()  # mean over the prompt's media
    logprob = [sum(lp) / len(lp) for lp in answer_logprobs(lm, fmt, prompt, [first[t].token_ids for t in texts])]
    candidates = [Candidate(t, first[t].token_ids, lp, s, lp if s is None else lp + scale * s)
                  for t, lp, s in zip(texts, logprob, similarity)]
    order = sorted(range(len(texts)), key=lambda k: -candidates[k].score)  # stable: ties keep the greedy answer
    best = first[texts[order[0]]]
    best.candidates = [candidates[k] for k in order]
    return best
