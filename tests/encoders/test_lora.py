"""`encoders.lora`: a wrapped layer starts as its base, computes W x + b + (α/r)·B A x, trains only
A and B, and merges back into a plain `Linear` that gives the same outputs."""

import pytest
import torch
import torch.nn.functional as F

from encoders.blocks import Transformer
from encoders.linear import Linear
from encoders.lora import LoRALinear, add_lora_, merge_lora_


def randomised(layer: LoRALinear, seed: int = 0) -> LoRALinear:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora_a.copy_(torch.randn(layer.lora_a.shape, generator=g))
        layer.lora_b.copy_(torch.randn(layer.lora_b.shape, generator=g) * 0.1)
    return layer


def test_a_fresh_adapter_is_exactly_its_base_layer():
    torch.manual_seed(0)
    base = Linear(24, 40)
    x = torch.randn(3, 5, 24)
    assert torch.equal(LoRALinear(base, rank=4, alpha=8)(x), base(x))


def test_the_update_is_alpha_over_rank_times_b_a_and_only_a_and_b_train():
    torch.manual_seed(0)
    base = Linear(24, 40)
    layer = randomised(LoRALinear(base, rank=4, alpha=8))
    x = torch.randn(3, 5, 24)
    expected = F.linear(x, base.weight + 2.0 * layer.lora_b @ layer.lora_a, base.bias)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["lora_a", "lora_b"]
    layer(x).sum().backward()
    assert base.weight.grad is None and layer.lora_a.grad is not None


def test_merging_gives_a_plain_linear_with_the_same_outputs_and_keys():
    torch.manual_seed(0)
    base = Linear(24, 40)
    layer = randomised(LoRALinear(base, rank=3, alpha=5))
    merged = layer.merged()
    x = torch.randn(7, 24)
    assert type(merged) is Linear and set(merged.state_dict()) == {"weight", "bias"}
    torch.testing.assert_close(merged(x), layer(x), atol=1e-5, rtol=1e-5)


def test_a_whole_transformer_adapted_then_merged_computes_what_the_adapted_one_did():
    torch.manual_seed(0)
    net = Transformer(32, 2, 4, 4.0, 0.0, True, "rotary", 16).eval()
    keys = set(net.state_dict())
    x = torch.randn(2, 9, 32)
    before = net(x)
    net.requires_grad_(False)  # what the decoder stage does first
    n = add_lora_(net, rank=4, alpha=8)
    assert n == 2 * 4  # per block: attention qkv and proj, MLP fc and proj
    assert torch.equal(net(x), before)  # B = 0: nothing changed yet
    assert add_lora_(net, rank=4, alpha=8) == 0  # wrapped layers are not wrapped again
    assert all("lora_" in name for name, p in net.named_parameters() if p.requires_grad)
    for i, m in enumerate(m for m in net.modules() if isinstance(m, LoRALinear)):
        randomised(m, seed=i)
    adapted = net(x)
    assert not torch.allclose(adapted, before)
    assert merge_lora_(net) == n
    assert set(net.state_dict()) == keys and not any(isinstance(m, LoRALinear) for m in net.modules())
    torch.testing.assert_close(net(x), adapted, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rank", [0, -1, 2.5, True])
def test_a_bad_rank_is_refused(rank):
    with pytest.raises(ValueError, match="LoRA rank"):
        LoRALinear(Linear(4, 4), rank=rank, alpha=1.0)
