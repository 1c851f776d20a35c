"""Short convolutions in the decoder (`decoder.conv_kernel`): the layer against torch's conv1d,
token boundaries from positions, zero start = the same model, GPT-2 parity, the config round trip
— and what it is for: associative recall. Cached and chunked decoding, left-padded batches and
packing with convolutions: test_generate.py, test_window.py, test_packing.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import yaml

from encoders.short_conv import ShortConv
from mmembed.config import load_config, save_config
from mmembed.decoder import Decoder, build_prompt_model, load_prompt_model, save_prompt_model
from mmembed.errors import ConfigError
from tests.decoder.helpers import DIM, prompt_model, tokenizer, with_conv


def test_the_layer_is_a_causal_depthwise_conv1d_added_to_its_input():
    torch.manual_seed(0)
    conv = ShortConv(8, 4).double()
    torch.nn.init.normal_(conv.weight)
    x = torch.randn(3, 11, 8, dtype=torch.float64)
    # conv1d is a cross-correlation: tap i of its kernel meets x_{t-(K-1)+i}, our row j meets x_{t-j}
    kernel = conv.weight.flip(0).t()[:, None, :]  # (C, 1, K)
    ref = x + F.conv1d(F.pad(x.transpose(1, 2), (3, 0)), kernel, groups=8).transpose(1, 2)
    torch.testing.assert_close(conv(x), ref, atol=1e-12, rtol=0)


def test_positions_keep_each_prompt_to_its_own_tokens():
    """Two sequences packed into one row (positions restart at 0), and a left-padded row: each
    token gets what it gets alone."""
    torch.manual_seed(0)
    conv = ShortConv(4, 3)
    torch.nn.init.normal_(conv.weight)
    a, b = torch.randn(1, 5, 4), torch.randn(1, 7, 4)
    packed = conv(torch.cat([a, b], 1), positions=torch.cat([torch.arange(5), torch.arange(7)]))
    torch.testing.assert_close(packed, torch.cat([conv(a), conv(b)], 1), atol=1e-6, rtol=0)
    pads = torch.full((1, 2, 4), 9.0)  # left padding: whatever it holds must not reach b
    padded = conv(torch.cat([pads, b], 1), positions=torch.tensor([[0, 0, 0, 1, 2, 3, 4, 5, 6]]))
    torch.testing.assert_close(padded[:, 2:], conv(b), atol=1e-6, rtol=0)


def test_a_fresh_convolution_changes_nothing_bit_for_bit():
    """It starts at zero, and building it draws no random numbers: the same seed gives the same
    model, with or without it."""
    plain, conv = prompt_model(), prompt_model(conv_kernel=3)
    assert all(b.conv is not None for b in conv.lm.decoder.transformer.blocks)
    ids = torch.randint(0, 300, (2, 30))
    with torch.no_grad():
        assert torch.equal(plain.lm.decoder(ids), conv.lm.decoder(ids))


def test_gpt2_with_convolutions_still_matches_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    from mmembed.decoder import load_gpt2
    from tests.decoder.helpers import save_tiny_gpt2

    folder = save_tiny_gpt2(tmp_path)
    hf = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()
    ours = load_gpt2(folder, conv_kernel=3)
    assert all(b.conv is not None and not b.conv.weight.any() for b in ours.transformer.blocks)
    ids = torch.randint(0, hf.config.vocab_size, (2, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-4, rtol=0)


def test_conv_kernel_from_yaml_survives_save_and_load(tmp_path):
    path = tmp_path / "config.yaml"
    decoder = {"width": 32, "layers": 2, "heads": 4, "context": 32, "conv_kernel": 3, "soft_tokens": 3, "dropout": 0.0}
    path.write_text(yaml.safe_dump({"decoder": decoder}))
    cfg = load_config(path)
    pm = with_conv(build_prompt_model(cfg.decoder, tokenizer(), DIM))
    save_config(cfg, tmp_path / "saved.yaml")
    save_prompt_model(pm, tmp_path)
    loaded = load_prompt_model(tmp_path, load_config(tmp_path / "saved.yaml").decoder, tokenizer(), DIM)
    ids = torch.randint(0, 300, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(loaded.lm.decoder(ids), pm.lm.eval().decoder(ids), atol=0, rtol=0)
    for bad in (1, -2, True, 2.5, "3"):
        with pytest.raises(ConfigError, match="decoder.conv_kernel"):
            load_config(path, [f"decoder.conv_kernel={yaml.safe_dump(bad).splitlines()[0]}"])


STEPS = 600  # the convolved decoder reads 0.98-1.0 from step 500, the plain one 0.17-0.19 at 600 (seed 0)


def associative_recall_accuracy(conv_kernel: int, steps: int) -> float:
    """Train a 2-block decoder on associative recall — 6 key/value pairs, then a key; answer its
    value, loss on that token only — and return its accuracy on fresh sequences."""
    torch.manual_seed(0)
    pairs, batch = 6, 64
    model = Decoder(66, width=64, layers=2, heads=4, max_len=16, conv_kernel=conv_kernel)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.05)

    def sample(n):
        keys = torch.stack([torch.randperm(32)[:pairs] for _ in range(n)])
        values = torch.randint(32, 64, (n, pairs))
        which = torch.randint(0, pairs, (n,))
        seq = torch.cat([torch.stack([keys, values], 2).reshape(n, -1), torch.full((n, 1), 64),
                         keys.gather(1, which[:, None])], 1)
        return seq, values.gather(1, which[:, None])[:, 0]

    for _ in range(steps):
        seq, answer = sample(batch)
        loss = F.cross_entropy(model(seq)[:, -1], answer)
        opt.zero_grad()
        loss.backward()
        opt.step()
    seq, answer = sample(1024)
    with torch.no_grad():
        return float((model(seq)[:, -1].argmax(-1) == answer).float().mean())


@pytest.mark.slow  # two 600-step trainings: 15-40 s; the layer itself is tested above, in the default suite
def test_a_short_convolution_makes_associative_recall_learnable():
    """The lookup behind "what colour is the circle?": without the convolution the same steps
    leave the decoder picking one of the six values at random (1/6)."""
    convolved, plain = associative_recall_accuracy(3, STEPS), associative_recall_accuracy(0, STEPS)
    assert convolved > 0.9 and plain < 0.4
