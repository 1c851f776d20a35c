"""What an optimizer step leaves idle (`IdleParts`): the parts no process learned from get no
gradient, so DDP's zeros never reach AdamW where one process's None would not."""

from mmembed.train.align_step import IdleParts
from tests.conftest import tiny_model


def _ids(params):
    return {id(p) for p in params}


def test_a_step_that_only_wrote_captions_leaves_the_logit_scale_and_bias_idle():
    """A global batch with no pair of two rows but a caption still ran the captioner: the logit scale
    and bias were not left idle, so under DDP their zero gradients let AdamW's momentum move them."""
    space = tiny_model().space
    scale = _ids([space.log_logit_scale, space.logit_bias])
    idle = IdleParts(space)
    names = [str(m) for m in space.towers]
    idle.saw(names[:1], captioned=True)  # one tower's vectors wrote captions; no pair ran
    left = _ids(idle())
    assert scale <= left
    assert _ids(space.towers[space.modalities[0]].parameters()).isdisjoint(left)
    idle.saw(names[:2], paired=True)  # a pair ran: the scale learned
    assert scale.isdisjoint(_ids(idle()))
    assert scale <= _ids(idle())  # and the next step starts afresh
