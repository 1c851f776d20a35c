"""The training engine on a toy regression problem: guards, schedule, determinism, resume."""

import json
import math

import pytest
import torch
from torch import nn

from mmembed.config_train import TrainConfig
from mmembed.train.engine import NonFiniteLossError, StepOutput, Trainer
from mmembed.train.optim import lr_at, param_groups
from mmembed.train.state import latest_checkpoint

N, BS = 64, 8


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 16)
        self.norm = nn.LayerNorm(16)
        self.drop = nn.Dropout(0.1)  # consumes the torch RNG: resume must restore it
        self.out = nn.Linear(16, 4)

    def forward(self, x):
        return self.out(self.drop(self.norm(self.lin(x))))


def _data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, 4, generator=g)
    return x, x @ torch.randn(4, 4, generator=g)


def _make_loader(x, y, seed=0):
    def make(epoch, start):
        perm = torch.randperm(N, generator=torch.Generator().manual_seed(seed * 1000 + epoch))
        return ((x[perm[i:i + BS]], y[perm[i:i + BS]], perm[i:i + BS]) for i in range(start, N, BS))
    return make


def _trainer(tmp_path, nan_at=(), callbacks=(), weighted=False, **cfg):
    torch.manual_seed(0)
    model = Toy()
    x, y = _data()
    calls = {"n": 0}

    def step(batch):
        xb, yb, _ = batch
        calls["n"] += 1
        loss = ((model(xb) - yb) ** 2).mean()
        if calls["n"] in nan_at:
            loss = loss * float("nan")
        return StepOutput(loss, {}, samples=len(xb), weight=len(xb) if weighted else None)

    config = TrainConfig(**{"batch_size": BS, "epochs": 3, "lr": 3e-2, "warmup_steps": 2, "checkpoint_every": 1,
                            "log_every": 1, "keep_last": 100, **cfg})
    return model, Trainer(model, step, _make_loader(x, y), N // BS, config, tmp_path, callbacks=list(callbacks))


def _losses(run_dir):
    return [json.loads(l)["loss"] for l in (run_dir / "metrics.jsonl").read_text().splitlines() if "loss" in l]


def test_same_seed_same_loss_curve(tmp_path):
    _, a = _trainer(tmp_path / "a")
    a.fit()
    _, b = _trainer(tmp_path / "b")
    b.fit()
    la, lb = _losses(tmp_path / "a"), _losses(tmp_path / "b")
    assert len(la) == 24 and la == lb
    assert sum(la[-4:]) < 0.5 * sum(la[:4])


def test_nan_step_leaves_params_and_optimizer_unchanged(tmp_path):
    snap = {}

    def state(trainer):
        return ([p.detach().clone() for p in trainer.module.parameters()],
                [v.clone() for s in trainer.optimizer.state.values() for v in s.values() if torch.is_tensor(v)])

    def after_step(event, trainer, info):
        if event == "step" and trainer.progress.step == 3:
            snap["before"] = state(trainer)

    model, t = _trainer(tmp_path, nan_at={4}, callbacks=[after_step], epochs=1)
    inner = t.step_fn

    def step(batch):  # call 5 runs right after the skipped NaN step (call 4)
        if "before" in snap and "after" not in snap and t.progress.bad_steps == 1:
            snap["after"] = state(t)
        return inner(batch)

    t.step_fn = step
    t.fit()
    assert t.progress.step == 7 and t.progress.bad_steps == 1  # 8 batches, one skipped
    (p0, o0), (p1, o1) = snap["before"], snap["after"]
    assert len(o0) == len(o1) > 0
    assert all(torch.equal(a, b) for a, b in zip(p0 + o0, p1 + o1))


def test_nan_guard_skips_exactly(tmp_path):
    model, t = _trainer(tmp_path, nan_at={1, 2}, epochs=1, max_bad_steps=5)
    before = [p.detach().clone() for p in model.parameters()]
    t.make_loader = lambda e, s, _m=t.make_loader: (b for i, b in enumerate(_m(e, s)) if i < 2)
    t.fit()
    assert t.progress.step == 0 and t.progress.bad_steps == 2
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert not t.optimizer.state  # no moment estimates were created


@pytest.mark.parametrize("weighted", [False, True])
def test_repeated_nan_stops_with_message(tmp_path, weighted):
    """Weighted (the decoder's loss per answer token): a step whose every loss was non-finite
    has no gradients to rescale, and the rescale crashed before the guard could skip it."""
    _, t = _trainer(tmp_path, nan_at=set(range(1, 100)), max_bad_steps=3, weighted=weighted)
    with pytest.raises(NonFiniteLossError, match="3 non-finite steps in a row"):
        t.fit()


class _Crash(Exception):
    pass


def test_crash_then_resume_equals_uninterrupted(tmp_path):
    model_a, a = _trainer(tmp_path / "a")
    a.fit()

    def crash(event, trainer, info):
        if event == "checkpoint" and trainer.progress.step == 11:
            raise _Crash

    _, b = _trainer(tmp_path / "b", callbacks=[crash])
    with pytest.raises(_Crash):
        b.fit()
    assert latest_checkpoint(tmp_path / "b").name == "step_0000011"
    model_c, c = _trainer(tmp_path / "b")
    c.fit(resume=True)
    for p, q in zip(model_a.parameters(), model_c.parameters()):
        assert torch.equal(p, q)
    sa, sc = a.optimizer.state_dict()["state"], c.optimizer.state_dict()["state"]
    for i in sa:
        for k in sa[i]:
            assert torch.equal(torch.as_tensor(sa[i][k]), torch.as_tensor(sc[i][k]))
    assert _losses(tmp_path / "a") == _losses(tmp_path / "b")


def test_an_epochs_leftover_micro_batches_do_not_reach_the_next_step(tmp_path):
    """5 batches an epoch, accum_steps 2: two steps an epoch; the fifth batch's gradient is dropped,
    never added to the next epoch's first step (which also keeps resume from an epoch's end exact)."""
    model = nn.Linear(2, 1, bias=False)
    x = torch.ones(5, 1, 2)  # the same batch five times, and lr 0: every step's gradient is the same
    config = TrainConfig(batch_size=1, epochs=2, lr=0.0, warmup_steps=0, accum_steps=2, checkpoint_every=1000,
                         log_every=1, grad_clip=0.0, weight_decay=0.0)
    trainer = Trainer(model, lambda b: StepOutput((model(b) ** 2).mean(), {}, samples=1),
                      lambda epoch, start: iter(x[start:]), 5, config, tmp_path)
    trainer.fit()
    norms = [json.loads(l)["grad_norm"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines()
             if "grad_norm" in l]
    assert len(norms) == 4
    assert max(norms) == pytest.approx(min(norms), rel=1e-6)


def test_a_metric_a_micro_batch_lacks_is_left_out_of_the_steps_mean(tmp_path):
    """With accumulation, a value only some micro-batches measure (a modality's captioning loss when
    a batch has no row of it: NaN) is averaged over those that have it, not counted as 0."""
    model = nn.Linear(2, 1, bias=False)
    calls = {"n": 0}

    def step(batch):
        calls["n"] += 1
        has = calls["n"] % 2 == 1
        return StepOutput((model(batch) ** 2).mean(), {"present": 4.0 if has else math.nan, "always": 1.0},
                          samples=1)

    config = TrainConfig(batch_size=1, epochs=1, lr=0.0, warmup_steps=0, accum_steps=2, checkpoint_every=1000,
                         log_every=1, grad_clip=0.0, weight_decay=0.0)
    Trainer(model, step, lambda epoch, start: iter(torch.ones(4, 1, 2)[start:]), 4, config, tmp_path).fit()
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]
    assert [(r["present"], r["always"]) for r in rows] == [(4.0, 1.0), (4.0, 1.0)]


def test_schedule_warmup_then_cosine():
    lrs = [lr_at(s, 1.0, 10, 110, 0.1) for s in range(111)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[110] == pytest.approx(0.1)
    assert lrs[60] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))


def test_a_warmup_longer_than_half_the_run_is_cut_to_half():
    """With warm-up 50 and 12 steps the rate rose to 0.24 of `lr` and never annealed."""
    lrs = [lr_at(s, 1.0, 50, 12, 0.1) for s in range(13)]
    assert lrs[5] == pytest.approx(1.0) and lrs == [lr_at(s, 1.0, 6, 12, 0.1) for s in range(13)]
    assert lrs[12] == pytest.approx(0.1)
    assert lr_at(0, 1.0, 10, 110, 0.1) == pytest.approx(0.1)  # a warm-up within half the run is untouched


def test_time_progress_moves_the_cosine_on_never_back():
    # the warm-up holds a tenth of the steps (10 of 110), so it ends by a tenth of the budget too:
    # a budget spent inside it stopped the run at 0.6 of the rate, never annealed
    assert lr_at(5, 1.0, 10, 110, 0.1, time_progress=0.05) == pytest.approx(0.6)  # steps are further on
    assert lr_at(5, 1.0, 10, 110, 0.1, time_progress=0.08) == pytest.approx(0.08 * 110 / 10)  # time is
    # the cosine's part of the budget begins where the warm-up's tenth ends: 0.9 of it is 0.89 of the decay
    assert lr_at(5, 1.0, 10, 110, 0.1, time_progress=0.9) == pytest.approx(0.1 + 0.45 * (1 + math.cos(0.89 * math.pi)))
    assert lr_at(5, 1.0, 10, 110, 0.1, time_progress=1.0) == pytest.approx(0.1)  # annealed at the budget
    assert lr_at(60, 1.0, 10, 110, 0.1, time_progress=0.5) == pytest.approx(lr_at(60, 1.0, 10, 110, 0.1))
    assert lr_at(20, 1.0, 10, 110, 0.1, time_progress=0.5) == pytest.approx(lr_at(55, 1.0, 10, 110, 0.1))
    # a run exactly on plan (step s begins at s / 110 of the budget) follows the step schedule: the
    # raw fraction dropped the rate from 1.0 to 0.98 the moment the warm-up ended, and ran ahead
    for s in range(111):
        assert lr_at(s, 1.0, 10, 110, 0.1, time_progress=s / 110) == pytest.approx(lr_at(s, 1.0, 10, 110, 0.1))
    assert lr_at(60, 1.0, 10, 110, 0.1, time_progress=0.2) == pytest.approx(lr_at(60, 1.0, 10, 110, 0.1))
    assert lr_at(20, 1.0, 10, 110, 0.1, time_progress=1.7) == pytest.approx(0.1)


def test_time_schedule_anneals_by_the_budget(tmp_path, monkeypatch):
    """Steps "take" 1/10 of a 1-minute budget each (a fake clock): the cosine planned over 24
    steps is at its floor by the 10th, where the budget stops the run; by steps it would still be
    high there. The clock is saved in the checkpoint and runs on after a resume: a run killed
    half-way continues with the lrs of the uninterrupted one, and the budget counts every fit."""
    import mmembed.train.engine as engine

    now = {"t": 0.0}
    monkeypatch.setattr(engine.time, "monotonic", lambda: now["t"])
    def tick(event, trainer, row):
        if event == "step":
            now["t"] += 6.0
    _, by_time = _trainer(tmp_path / "t", callbacks=[tick], schedule_by="time", max_minutes=1.0)
    result = by_time.fit()
    rows = [json.loads(l) for l in (tmp_path / "t" / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in rows if "lr" in r]
    assert result.stopped_because == "time budget" and len(lrs) == 10
    # the 10th step starts 54 s in: 90% of the budget, 2.5% of the cosine's height left
    assert lrs[-1] == pytest.approx(lr_at(9, 3e-2, 2, 24, 0.1, time_progress=0.9)) and lrs[-1] < 0.13 * 3e-2
    assert lrs[-1] < lr_at(9, 3e-2, 2, 24, 0.1) / 5  # by steps: still high
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))  # after the warm-up, only down
    assert by_time.progress.seconds == pytest.approx(60.0, abs=6.0)
    _, ended = _trainer(tmp_path / "t", callbacks=[tick], schedule_by="time", max_minutes=1.0)
    assert ended.fit(resume=True).stopped_because == "time budget" and ended.progress.step == 10  # spent

    def crash(event, trainer, row):
        if event == "checkpoint" and trainer.progress.step == 5:
            raise _Crash
    now["t"] = 0.0
    _, killed = _trainer(tmp_path / "k", callbacks=[tick, crash], schedule_by="time", max_minutes=1.0)
    with pytest.raises(_Crash):
        killed.fit()
    now["t"] += 1000.0  # time between the kill and the resume is not training time
    _, resumed = _trainer(tmp_path / "k", callbacks=[tick], schedule_by="time", max_minutes=1.0)
    assert resumed.fit(resume=True).stopped_because == "time budget" and resumed.progress.step == 10
    rows = [json.loads(l) for l in (tmp_path / "k" / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in rows if "lr" in r] == pytest.approx(lrs)  # from 0 it would be the step schedule's
    with pytest.raises(engine.ConfigError, match="max_minutes"):
        _trainer(tmp_path / "x", schedule_by="time")


def test_no_weight_decay_on_norms_biases_embeddings_scalars():
    m = nn.ModuleDict({"emb": nn.Embedding(10, 4), "lin": nn.Linear(4, 4), "norm": nn.LayerNorm(4)})
    m.register_parameter("log_logit_scale", nn.Parameter(torch.tensor(1.0)))
    decay, no_decay = param_groups(m, 0.1)
    assert {id(p) for p in decay["params"]} == {id(m["lin"].weight)}
    assert len(no_decay["params"]) == 5 and no_decay["weight_decay"] == 0.0


def test_more_accumulation_than_an_epochs_batches_is_refused(tmp_path):
    """3 batches an epoch and accum_steps 4 would never step: the run trained nothing and said
    "finished". It is now one line before anything runs."""
    from mmembed.errors import UserError

    model = nn.Linear(2, 1)
    config = TrainConfig(batch_size=1, epochs=5, lr=0.1, warmup_steps=0, accum_steps=4)
    with pytest.raises(UserError, match=r"an epoch gives 3 batch\(es\) of 1 rows, fewer than accum_steps=4"):
        Trainer(model, lambda b: StepOutput(model(b).sum(), {}), lambda e, s: iter([]), 3, config, tmp_path)


def _token_step(model, seen):
    """A decoder-like step: the mean loss over a batch's 'answer tokens' (rows of ones in the mask)."""
    def step(batch):
        x, keep = batch
        per_token = (model(x).squeeze(-1) - 1.0) ** 2  # (rows, tokens)
        seen.append(int(keep.sum()))
        return StepOutput(per_token[keep].mean(), {}, samples=len(x), weight=int(keep.sum()))
    return step


def test_weighted_micro_batches_accumulate_to_the_mean_over_every_token(tmp_path):
    """Micro-batches of 10 and 2 answer tokens, accumulated, give the update of one batch holding
    all 12 (a mean of the two means over-weighed the short one's tokens 5×)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, 3, generator=g)
    keep = torch.zeros(4, 6, dtype=torch.bool)
    keep[:2, :5] = True  # rows 0-1: 10 tokens
    keep[2:, :1] = True  # rows 2-3: 2 tokens

    def fit(batches, accum, out):
        torch.manual_seed(0)
        model = nn.Linear(3, 1)
        seen = []
        config = TrainConfig(batch_size=len(batches[0][0]), epochs=1, lr=0.1, warmup_steps=0, accum_steps=accum,
                             checkpoint_every=1000, log_every=1, grad_clip=0.0, weight_decay=0.0)
        Trainer(model, _token_step(model, seen), lambda e, s: iter(batches[s // len(batches[0][0]):]), len(batches),
                config, out).fit()
        rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]
        return model, rows, seen

    one, one_rows, _ = fit([(x, keep)], 1, tmp_path / "one")
    two, two_rows, seen = fit([(x[:2], keep[:2]), (x[2:], keep[2:])], 2, tmp_path / "two")
    assert seen == [10, 2]
    for a, b in zip(one.parameters(), two.parameters()):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=0)
    assert two_rows[0]["loss"] == pytest.approx(one_rows[0]["loss"], rel=1e-6)
    assert two_rows[0]["grad_norm"] == pytest.approx(one_rows[0]["grad_norm"], rel=1e-5)


def test_a_step_whose_batches_learned_nothing_changes_nothing(tmp_path):
    """A batch with no pair of two rows (`learned=False`) still goes backward, but a step made only
    of such batches is skipped: parameters and optimizer state stay put, and the batches are counted."""
    model = nn.Linear(2, 1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = TrainConfig(batch_size=1, epochs=1, lr=0.1, warmup_steps=0, checkpoint_every=1000, weight_decay=0.1)
    trainer = Trainer(model, lambda b: StepOutput(model(b).sum() * 0.0, {}, samples=1, learned=False),
                      lambda e, s: iter(torch.ones(3, 1, 2)[s:]), 3, config, tmp_path)
    from mmembed.errors import UserError

    with pytest.raises(UserError, match="no training step was taken: none of the 3 batch"):  # not a "finished" run
        trainer.fit()
    assert trainer.progress.step == 0 and trainer.progress.empty_batches == 3
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not trainer.optimizer.state


@pytest.mark.parametrize("rowless", [False, True], ids=["no-pair", "rows-skipped"])
def test_a_run_that_took_no_step_blames_skipped_rows_only_when_rows_were_skipped(tmp_path, rowless):
    """Batches with rows but no pair (a misnamed modality column) were reported as having "no
    usable row ... (the skipped rows are counted above)", though no row was skipped."""
    from mmembed.errors import UserError

    model = nn.Linear(2, 1)
    config = TrainConfig(batch_size=1, epochs=1, lr=0.1, warmup_steps=0, checkpoint_every=1000)
    step = (lambda b: None) if rowless else (lambda b: StepOutput(model(b).sum() * 0.0, {}, samples=1, learned=False))
    trainer = Trainer(model, step, lambda e, s: iter(torch.ones(3, 1, 2)[s:]), 3, config, tmp_path)
    with pytest.raises(UserError) as caught:
        trainer.fit()
    message = str(caught.value)
    assert message.startswith("no training step was taken") and ("skipped rows" in message) == rowless
    assert ("pair of modalities" in message) != rowless


def _evaluated(tmp_path, values, callbacks=(), **cfg):
    """A linear model, 10 one-row batches an epoch, accum_steps 3 (3 steps and a leftover batch an
    epoch), validated at every epoch's end with the next of `values`."""
    torch.manual_seed(0)
    model = nn.Linear(2, 1)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(10, 2, generator=g), torch.randn(10, 1, generator=g)
    config = TrainConfig(**{"batch_size": 1, "epochs": 2, "lr": 1e-2, "warmup_steps": 0, "accum_steps": 3,
                            "checkpoint_every": 1000, "log_every": 1, "keep_last": 100, **cfg})
    trainer = Trainer(model, lambda b: StepOutput(((model(b[0]) - b[1]) ** 2).mean(), {}, samples=1),
                      lambda e, s: ((x[i:i + 1], y[i:i + 1]) for i in range(s, 10)), 10, config, tmp_path,
                      evaluate=lambda: {"recall@1": next(values)}, callbacks=list(callbacks))
    return model, trainer


def _val_rows(run):
    return [(r["step"], r["epoch"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if "val/recall@1" in r]


def test_a_raised_epoch_budget_trains_on_instead_of_scoring_the_last_step_again(tmp_path):
    """The last epoch ends on "step budget" with its leftover batch unread; resumed with more epochs,
    that batch ends the epoch without a step, and its model (evaluated already) was scored again:
    a second row for step 6 that counted against patience and early-stopped with nothing trained."""
    values = iter([0.5] * 10)  # flat: every evaluation counts against patience 2
    _, first = _evaluated(tmp_path, values, early_stop_patience=2)
    assert first.fit().progress.step == 6
    _, more = _evaluated(tmp_path, values, early_stop_patience=2, epochs=3)
    result = more.fit(resume=True)
    assert result.progress.step == 9 and _val_rows(tmp_path) == [(3, 1), (6, 2), (9, 3)]


def test_a_resumed_run_writes_each_validation_row_once(tmp_path):
    """Killed after the checkpoint of step 6 (the epoch's last step, taken before the epoch's end
    and its validation): the validation row written after the checkpoint is dropped with the rest
    and written again, once."""
    def crash(event, trainer, info):
        if event == "step" and trainer.progress.step == 7:
            raise _Crash

    _, ref = _evaluated(tmp_path / "ref", iter([0.1, 0.2, 0.3]), epochs=3, checkpoint_every=3)
    ref.fit()
    _, killed = _evaluated(tmp_path / "run", iter([0.1, 0.2, 0.3]), [crash], epochs=3, checkpoint_every=3)
    with pytest.raises(_Crash):
        killed.fit()
    assert latest_checkpoint(tmp_path / "run").name.endswith("6")
    _, resumed = _evaluated(tmp_path / "run", iter([0.2, 0.3]), epochs=3, checkpoint_every=3)
    resumed.fit(resume=True)
    assert _val_rows(tmp_path / "run") == _val_rows(tmp_path / "ref") == [(3, 1), (6, 2), (9, 3)]


def test_a_resumed_run_takes_weight_decay_and_betas_from_its_config(tmp_path):
    """The optimizer's state comes back from the checkpoint, its hyperparameters from the config:
    they came back as the checkpoint had them, whatever the resumed config said."""
    _, first = _evaluated(tmp_path, iter([0.5] * 10), weight_decay=0.1, betas=(0.9, 0.98))
    first.fit()
    _, more = _evaluated(tmp_path, iter([0.5] * 10), weight_decay=0.0, betas=(0.5, 0.9), epochs=3)
    more.fit(resume=True)
    assert [(g["weight_decay"], tuple(g["betas"])) for g in more.optimizer.param_groups] == [(0.0, (0.5, 0.9))] * 2


def test_a_resume_with_another_batch_size_trains_the_rest_of_its_epoch(tmp_path):
    """4 batches of 8 (32 of 64 rows), resumed with batch 16: the place was read as 4 batches of
    16, so the epoch's other 32 rows were skipped and the run stopped at step 6 of 2 + 4."""
    x, y = _data()

    def trainer(batch_size, **cfg):
        config = TrainConfig(batch_size=batch_size, epochs=2, lr=1e-2, warmup_steps=1, checkpoint_every=1,
                             log_every=1, keep_last=100, **cfg)
        return _resizable_trainer(tmp_path, x, y, config)

    trainer(8, max_steps=4).fit()
    resumed = trainer(16)
    resumed.fit(resume=True)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    # 32 rows left of epoch 0: 2 steps of 16; then 4 steps of epoch 1
    assert [(r["step"], r["epoch"]) for r in rows[4:]] == [(5, 0), (6, 0), (7, 1), (8, 1), (9, 1), (10, 1)]
    assert resumed.progress.samples == N * 2


def _resizable_trainer(tmp_path, x, y, config):
    """The Toy model on batches of `config.batch_size`, dealt as EpochBatchSampler does (a
    partial last batch dropped), each epoch a list (sized)."""
    torch.manual_seed(0)
    model = Toy()
    bs = config.batch_size

    def make(epoch, start):
        perm = torch.randperm(N, generator=torch.Generator().manual_seed(epoch))
        return [(x[perm[i:i + bs]], y[perm[i:i + bs]]) for i in range(start, N - bs + 1, bs)]

    def step(batch):
        return StepOutput(((model(batch[0]) - batch[1]) ** 2).mean(), {}, samples=len(batch[0]))

    return Trainer(model, step, make, N // bs, config, tmp_path)


def test_a_resume_whose_rows_left_end_in_a_partial_batch_plans_the_steps_it_takes(tmp_path):
    """3 batches of 8 (24 of 64 rows), resumed with batch 16: 40 rows left are 2 batches (the
    partial third dropped), but the plan counted 4 - 24 // 16 = 3, so the cosine never reached its end."""
    x, y = _data()

    def config(batch_size, **cfg):
        return TrainConfig(batch_size=batch_size, epochs=2, lr=1e-2, warmup_steps=1, checkpoint_every=1,
                           log_every=1, keep_last=100, **cfg)

    _resizable_trainer(tmp_path, x, y, config(8, max_steps=3)).fit()
    resumed = _resizable_trainer(tmp_path, x, y, config(16))
    resumed.fit(resume=True)
    assert resumed.progress.step == 3 + 2 + 4
    assert resumed.total_steps == resumed.progress.step
    last = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"lr"' in line][-1]
    assert last["lr"] == pytest.approx(lr_at(8, 1e-2, 1, 9, TrainConfig().min_lr_ratio))  # the plan's last step


def test_a_batch_the_ranks_skip_together_is_handed_to_on_skipped(tmp_path, caplog):
    """Under DDP a batch some rank found empty was skipped before step_fn, where its bad rows are
    counted: they were never counted, and the empty-batch summary came once per rank."""
    import logging

    from mmembed.train.distributed import World

    x, y = _data()
    empty = {1, 4}  # the batches (in order) some rank's share of which has no row
    handed, seen = [], []

    def make(epoch, start):
        return [(x[i:i + BS], y[i:i + BS], i // BS) for i in range(start, N, BS)]

    def step(batch):
        seen.append(batch[2])
        return StepOutput(((model(batch[0]) - batch[1]) ** 2).mean(), {}, samples=BS)

    for rank in (0, 1):
        torch.manual_seed(0)
        model = Toy()
        config = TrainConfig(batch_size=BS, epochs=1, lr=1e-2, warmup_steps=1, checkpoint_every=100, log_every=1)
        (tmp_path / str(rank)).mkdir()  # (rank 0 makes the run folder)
        trainer = Trainer(model, step, make, N // BS, config, tmp_path / str(rank), on_skipped=handed.append)
        trainer.world = World(rank=rank, size=2)  # its collectives stay one process's (none is joined)
        trainer._agree_empty = lambda batch, batches=iter(range(N // BS)): (next(batches) in empty, True)
        handed.clear()
        seen.clear()
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="mmembed.train.engine"):
            trainer.fit()
        assert [b[2] for b in handed] == sorted(empty) and sorted(seen + sorted(empty)) == list(range(N // BS))
        assert trainer.progress.empty_batches == len(empty)
        assert ("had no usable row" in caplog.text) == (rank == 0)


@pytest.mark.parametrize("field, value", [("seconds", None), ("samples_in_epoch", "16"), ("best_metric", "0.5"),
                                          ("step", -1), ("world_size", 0)])
def test_a_damaged_progress_field_is_a_checkpoint_error(tmp_path, field, value):
    """Each was a TypeError traceback deep in training (or, step -1, accepted)."""
    from mmembed.errors import CheckpointError

    _, t = _trainer(tmp_path, epochs=1, max_steps=2)
    t.fit()
    meta_path = latest_checkpoint(tmp_path) / "trainer.json"
    meta = json.loads(meta_path.read_text())
    meta["progress"][field] = value
    meta_path.write_text(json.dumps(meta))
    _, again = _trainer(tmp_path, epochs=1)
    with pytest.raises(CheckpointError, match=f"progress.{field} is"):
        again.fit(resume=True)


@pytest.mark.parametrize("accum", [1, 2])
def test_step_time_runs_from_the_first_fetch_to_the_update(tmp_path, monkeypatch, accum):
    """A fake clock: fetching a batch takes 1, its forward and backward 2. The step time added the
    data time twice (4 for 3) and, accumulating, counted the last micro-batch alone (4 for 6)."""
    import mmembed.train.engine as engine

    now = [0.0]
    monkeypatch.setattr(engine.time, "perf_counter", lambda: now[0])
    x, y = _data()
    torch.manual_seed(0)
    model = Toy()

    def make(epoch, start):
        for i in range(start, N, BS):
            now[0] += 1.0
            yield x[i:i + BS], y[i:i + BS]

    def step(batch):
        now[0] += 2.0
        return StepOutput(((model(batch[0]) - batch[1]) ** 2).mean(), {}, samples=len(batch[0]))

    config = TrainConfig(batch_size=BS, epochs=1, lr=1e-2, warmup_steps=1, checkpoint_every=100, log_every=1,
                         accum_steps=accum)
    Trainer(model, step, make, N // BS, config, tmp_path).fit()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert {(r["step_time"], r["data_time"]) for r in rows} == {(3.0 * accum, 1.0 * accum)}
    assert {r["samples_per_s"] for r in rows} == {BS / 3.0}
