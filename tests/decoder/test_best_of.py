"""best_of: the greedy answer and sampled ones, ranked by the decoder's log-probability and the shared
space (decoder/score.py); generation never writes a prompt-only id. A tiny untrained but lively run."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import mmembed as mm
from mmembed.cli import main
from mmembed.config import ModelConfig, from_dict
from mmembed.config_decoder import DecoderConfig
from mmembed.decoder import build_prompt_model, resolve_prompts
from mmembed.decoder.score import answer_logprobs
from mmembed.errors import UserError
from mmembed.model import build_model
from tests.conftest import TINY_MODEL
from tests.decoder.helpers import lively
from tests.conftest import tiny_model
from tests.memory.conftest import picture

DECODER = DecoderConfig(width=32, layers=2, heads=4, context=64, dropout=0.0, soft_tokens=2)


def with_decoder(model):
    torch.manual_seed(0)
    model.config.decoder = DECODER
    model.prompt_model = lively(build_prompt_model(DECODER, model.tokenizer, model.embed_dim), std=0.5)
    return model


@pytest.fixture(scope="module")
def model():
    return with_decoder(tiny_model(0))


def prompt(seed: int = 0) -> list:
    return ["describe", mm.Image(picture(seed)), "please"]


def resolved(model, p):
    (r,) = resolve_prompts([p], model.embed, model.embed_dim, model.device)
    return r


def test_teacher_forced_logprobs_equal_what_sampling_at_t1_reported(model):
    pm = model.prompt_model
    outs = model.generate([prompt()] * 4, max_new_tokens=10, temperature=1.0, seed=3)
    assert len({tuple(o.token_ids) for o in outs}) > 1  # several different answers were checked
    forced = answer_logprobs(pm.lm, pm.fmt, resolved(model, prompt()), [o.token_ids for o in outs])
    for o, f in zip(outs, forced):
        assert f == pytest.approx(o.logprobs, abs=1e-5)


def test_the_answer_is_the_candidate_with_the_best_score_recomputed_from_scratch(model):
    pm = model.prompt_model
    out = model.generate(prompt(), max_new_tokens=10, temperature=1.5, best_of=12, seed=0)
    cands = out.candidates
    assert 2 < len(cands) <= 12 and len({c.text for c in cands}) == len(cands)
    assert out.text == cands[0].text and out.token_ids == cands[0].token_ids
    assert model.generate(prompt(), max_new_tokens=10).text in {c.text for c in cands}  # greedy is a candidate
    scale = float(model.space.logit_scale.detach())
    image = model.embed("image", [picture(0)])[0]
    forced = answer_logprobs(pm.lm, pm.fmt, resolved(model, prompt()), [c.token_ids for c in cands])
    for c, f in zip(cands, forced):
        similarity = float(F.cosine_similarity(model.embed("text", [c.text])[0], image, dim=0))
        assert c.logprob == pytest.approx(sum(f) / len(f), abs=1e-5)
        assert c.similarity == pytest.approx(similarity, abs=1e-5)
        assert c.score == pytest.approx(c.logprob + scale * similarity, abs=1e-4)
    assert [c.score for c in cands] == sorted((c.score for c in cands), reverse=True)


def test_weight_zero_ranks_by_log_probability_and_a_large_one_by_similarity(model):
    by_lp = model.generate(prompt(), max_new_tokens=10, temperature=1.5, best_of=12, seed=0, rerank_weight=0)
    assert all(c.similarity is None for c in by_lp.candidates)
    assert [c.score for c in by_lp.candidates] == [c.logprob for c in by_lp.candidates]
    assert [c.logprob for c in by_lp.candidates] == sorted((c.logprob for c in by_lp.candidates), reverse=True)
    by_sim = model.generate(prompt(), max_new_tokens=10, temperature=1.5, best_of=12, seed=0, rerank_weight=1e6)
    sims = [c.similarity for c in by_sim.candidates]
    assert sims == sorted(sims, reverse=True)
    said = {c.text for c in by_lp.candidates if c.text.strip()}
    assert said == {c.text for c in by_sim.candidates}  # the same draws in another order, empty answers left out
    order = [c.text for c in by_lp.candidates if c.text.strip()]
    assert order != [c.text for c in by_sim.candidates]  # the rankings disagree, so each check above could fail


def test_same_seed_same_answer_and_batches_answer_every_prompt(model):
    a = model.generate(prompt(), max_new_tokens=10, temperature=1.0, best_of=6, seed=7)
    b = model.generate(prompt(), max_new_tokens=10, temperature=1.0, best_of=6, seed=7)
    assert a.candidates == b.candidates
    outs = model.generate([prompt(0), prompt(1), ["just text"]], max_new_tokens=10, temperature=1.0, best_of=6, seed=7)
    assert len(outs) == 3 and all(o.candidates and o.text == o.candidates[0].text for o in outs)
    assert all(c.similarity is None for c in outs[2].candidates)  # no media to judge against: log-probability


def test_a_seeded_batch_of_more_than_64_prompts_draws_on_one_stream(model):
    """`generate` runs 64 prompts at a time, drawing on one seeded generator throughout: 128 copies
    of a prompt are 128 samples, not 64 twice over, and the same seed gives them all again."""
    def answers():
        outs = model.generate([["describe the picture"]] * 128, max_new_tokens=8, temperature=1.5, seed=7)
        return [tuple(o.token_ids) for o in outs]

    ids = answers()
    assert sum(a == b for a, b in zip(ids[:64], ids[64:])) < 4  # row i and row i + 64 drew apart
    assert answers() == ids


def test_numpy_settings_and_a_seed_at_max_seed_take_every_batch(model):
    """best_of and rerank_weight refused numpy numbers that seed and temperature took; and the seed of
    best_of's second batch of 64 samples (seed + 1) was checked again, so MAX_SEED failed there."""
    from mmembed.decoder.generate import MAX_SEED

    kwargs = {"max_new_tokens": 4, "temperature": 1.5}
    out = model.generate(prompt(), best_of=np.int64(3), rerank_weight=np.float32(0.5), seed=np.int64(1), **kwargs)
    assert out == model.generate(prompt(), best_of=3, rerank_weight=0.5, seed=1, **kwargs)
    out = model.generate(prompt(), best_of=66, seed=MAX_SEED, **kwargs)  # two batches of samples
    assert out.candidates and out == model.generate(prompt(), best_of=66, seed=MAX_SEED, **kwargs)
    rows = model.temperature_sweep(prompt(), [0.5, 1.0], samples=np.int64(2), max_new_tokens=3)
    assert len(rows) == 2


@pytest.mark.parametrize("kwargs, match", [
    ({"best_of": 0, "temperature": 1.0}, r"best_of must be an integer in \[1, 1024\]"),
    ({"best_of": 2.5, "temperature": 1.0}, r"best_of must be an integer in \[1, 1024\]"),
    ({"best_of": True, "temperature": 1.0}, r"best_of must be an integer in \[1, 1024\]"),
    ({"best_of": 2_000_000_000, "temperature": 1.0}, r"best_of must be an integer in \[1, 1024\]"),  # exhausted memory
    ({"best_of": 4}, "give a temperature > 0"),
    ({"best_of": 4, "temperature": 1.0, "rerank_weight": -1.0}, "rerank_weight must be a finite number >= 0"),
    ({"best_of": 4, "temperature": 1.0, "rerank_weight": math.nan}, "rerank_weight must be a finite number >= 0"),
    ({"best_of": 4, "temperature": 1.0, "rerank_weight": math.inf}, "rerank_weight must be a finite number >= 0"),
    ({"best_of": 4, "temperature": 1.0, "rerank_weight": 10**400}, "rerank_weight must be a finite number >= 0"),
    ({"best_of": np.bool_(True), "temperature": 1.0}, r"best_of must be an integer in \[1, 1024\]"),
])
def test_bad_best_of_arguments_are_value_errors(model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        model.generate(prompt(), max_new_tokens=4, **kwargs)


def test_a_space_without_a_text_tower_ranks_by_log_probability_only_when_asked():
    torch.manual_seed(0)
    cfg = mm.load_config("demo")
    towers = copy.deepcopy(TINY_MODEL)
    del towers["towers"]["text"]
    cfg.model = from_dict(ModelConfig, towers, "model", "test")
    tok = mm.Tokenizer.train(["a large red circle on the left", "a small blue star"] * 20, vocab_size=300)
    model = with_decoder(build_model(cfg, tok))
    with pytest.raises(UserError, match="pass rerank_weight=0"):
        model.generate(prompt(), max_new_tokens=4, temperature=1.0, best_of=4)
    out = model.generate(prompt(), max_new_tokens=4, temperature=1.0, best_of=4, rerank_weight=0)
    assert out.candidates and all(c.similarity is None for c in out.candidates)


def test_generation_never_writes_a_prompt_only_id(model):
    """A placeholder written by the decoder would be read back as a media slot (best_of and the entropy
    view feed answers back); markers, <bos>, <answer> and padding belong to prompts too."""
    m = with_decoder(tiny_model(0))
    fmt, decoder = m.prompt_model.fmt, m.prompt_model.lm.decoder
    with torch.no_grad():  # every final hidden state leans along one direction, which only the placeholder reads
        direction = F.normalize(torch.randn(decoder.width), dim=0)
        decoder.transformer.norm.bias += 20 * direction
        decoder.lm_head.weight[fmt.placeholder_id] = 20 * direction
    r = resolved(m, prompt())
    ids = torch.tensor([fmt.encode(r.parts)])
    with torch.no_grad():
        assert int(m.prompt_model.lm(ids, r.vectors)[0, -1].argmax()) == fmt.placeholder_id
    outs = m.generate([prompt()] * 8, max_new_tokens=12, temperature=1.0, seed=0)
    written = {t for o in outs for t in o.token_ids}
    assert written and not written & set(fmt.prompt_only_ids)
    assert fmt.eos_id not in fmt.prompt_only_ids and fmt.placeholder_id in fmt.prompt_only_ids
    out = m.generate(prompt(), max_new_tokens=12, temperature=1.0, best_of=4, seed=0)  # feeds answers back
    assert out.candidates


def test_cli_best_of_prints_the_chosen_answer_and_its_candidates(model, tmp_path, capsys):
    model.save(tmp_path / "run")
    picture(0).save(tmp_path / "a.png")
    argv = ["generate", str(tmp_path / "run"), "--prompt", f"describe <image:{tmp_path / 'a.png'}> please",
            "--max-new-tokens", "10", "--temperature", "1.5", "--seed", "0", "--best-of", "8", "--json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    api = model.generate(prompt(), max_new_tokens=10, temperature=1.5, seed=0, best_of=8)
    assert out["text"] == api.text and [c["text"] for c in out["candidates"]] == [c.text for c in api.candidates]
    assert out["candidates"][0]["score"] == pytest.approx(api.candidates[0].score, abs=1e-6)


@pytest.mark.parametrize("extra, match", [
    (["--best-of", "4"], "give a temperature > 0"),
    (["--best-of", "4", "--temperature", "1", "--stream"], "--best-of chooses among whole answers"),
    (["--best-of", "4", "--temperature", "1", "--rerank-weight", "-2"], "rerank_weight must be"),
])
def test_cli_best_of_mistakes_are_one_line(model, tmp_path, capsys, extra, match):
    model.save(tmp_path / "run")
    assert main(["generate", str(tmp_path / "run"), "--prompt", "describe", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("mmembed: error:") and match in err, err


def test_the_best_of_benchmark_compares_greedy_and_both_rankings_on_each_split(model, tiny_world, tmp_path):
    from benchmarks.best_of import run, table

    model.save(tmp_path / "run")
    result = run(tmp_path / "run", tiny_world, n=4, temperature=1.0, weight=1.0, seed=0)
    from benchmarks.best_of import GROUPS

    seen = {(r["split"], r["group"]) for r in result["rows"]}
    assert {(s, g) for s in ("test", "held-out") for g in GROUPS[:2]} <= seen
    assert all(g in GROUPS for _, g in seen)
    for r in result["rows"]:
        assert r["n"] > 0 and 1 <= r["distinct candidates (mean)"] <= 4
        chosen = (r["best of n, log-probability"], r["best of n, with the space"])
        assert all(0 <= x <= r["a candidate was right"] <= 1 for x in chosen)  # the ceiling bounds both rankings
    assert table(result).count("| held-out |") == sum(s == "held-out" for s, _ in seen)


def test_answers_are_teacher_forced_in_chunks_with_each_answers_own_logprobs():
    """All N answers' (N, L, V) logits were built at once, and their log-softmax copied twice:
    1.6 GB for best_of=128 over CLIP's vocabulary. Chunks of FORCED_ROWS give each answer the
    log-probabilities it has alone."""
    from mmembed.decoder.score import FORCED_ROWS
    from tests.decoder.helpers import DIM, fake_embed, lively, prompt_model

    pm = lively(prompt_model(), std=0.3)
    (prompt,) = resolve_prompts([["describe", torch.ones(DIM)]], fake_embed, DIM, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    answers = [torch.randint(3, 300, (int(n),), generator=g).tolist()
               for n in torch.randint(1, 9, (FORCED_ROWS + 5,), generator=g)]
    together = answer_logprobs(pm.lm, pm.fmt, prompt, answers)
    for i in (0, FORCED_ROWS - 1, FORCED_ROWS, FORCED_ROWS + 4):
        assert together[i] == pytest.approx(answer_logprobs(pm.lm, pm.fmt, prompt, [answers[i]])[0], abs=1e-5)
    assert [len(t) for t in together] == [len(a) for a in answers]


def test_an_answer_the_text_tower_refuses_is_scored_without_a_vector_not_the_end_of_best_of():
    """CLIP's cleaning empties some non-blank answers (a control character, '&nbsp;'): the one
    text-tower call over every candidate raised BadInput and best_of failed outright."""
    from mmembed.decoder import Sampling, Stops
    from mmembed.decoder.score import best_of
    from mmembed.errors import BadInput
    from tests.decoder.helpers import DIM, fake_embed, lively, prompt_model

    pm = lively(prompt_model(), std=0.5)
    (prompt,) = resolve_prompts([["describe", torch.ones(DIM)]], fake_embed, DIM, torch.device("cpu"))
    refused = set()

    def embed_answers(texts):
        if len(texts) > 1 or texts[0] == refuse:
            refused.add(len(texts))
            raise BadInput("text item 0: empty caption")
        return fake_embed(mm.Modality.TEXT, texts)

    probe = best_of(pm.lm, pm.fmt, [prompt], 6, 8, Sampling(1.0), Stops(), 0, torch.device("cpu"),
                    embed_answers=lambda texts: fake_embed(mm.Modality.TEXT, texts), logit_scale=10.0, weight=1.0)[0]
    refuse = probe.candidates[0].text  # the best answer, refused by the tower from now on
    out = best_of(pm.lm, pm.fmt, [prompt], 6, 8, Sampling(1.0), Stops(), 0, torch.device("cpu"),
                  embed_answers=embed_answers, logit_scale=10.0, weight=1.0)[0]
    assert refused and refuse not in [c.text for c in out.candidates]
    assert len(out.candidates) == len(probe.candidates) - 1 and all(c.similarity is not None for c in out.candidates)
