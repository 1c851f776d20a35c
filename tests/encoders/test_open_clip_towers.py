"""open_clip towers: local weights round trip equals open_clip exactly; unsafe pickles are refused."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

open_clip = pytest.importorskip("open_clip")

from encoders import WeightsFileError, build_encoder, load_state_dict_file  # noqa: E402
from encoders.linear import Linear, onednn  # noqa: E402

TINY = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
# CLIP keeps the text tower on the model itself; CustomTextCLIP keeps it in `model.text`.
ARCHS = {"mmembed-test-clip": TINY, "mmembed-test-customtext": TINY | {"custom_text": True}}


@pytest.fixture(autouse=True)
def _torch_kernels():
    """Bit-identity with open_clip's forward needs the same kernels on both sides: our towers'
    linear layers run through oneDNN on the CPU (`encoders.linear`), open_clip's through F.linear.
    `test_onednn_towers_agree_with_open_clip` checks the towers as they run."""
    with onednn(False):
        yield


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, dict]:
    """Register the tiny architectures, build random reference models, save their weights."""
    folder = tmp_path_factory.mktemp("open_clip")
    out = {}
    for name, cfg in ARCHS.items():
        (folder / f"{name}.json").write_text(json.dumps(cfg))
        open_clip.add_model_config(folder / f"{name}.json")
        torch.manual_seed(0)
        model = open_clip.create_model(name).eval()
        torch.save(model.state_dict(), folder / f"{name}.pt")
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / f"{name}.safetensors"))
        out[name] = {"model": model, "pt": str(folder / f"{name}.pt"), "st": str(folder / f"{name}.safetensors")}
    return out


@pytest.mark.parametrize("name", sorted(ARCHS))
@pytest.mark.parametrize("fmt", ["pt", "st"])
def test_image_tower_equals_open_clip_encode_image(saved, name, fmt):
    ref = saved[name]["model"]
    tower = build_encoder("open_clip_image", arch=name, pretrained=saved[name][fmt]).eval()
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        out = tower(images)
        expected = ref.encode_image(images)
    assert tower.width == 32
    assert torch.equal(out.pooled, expected)  # bit-identical
    assert out.tokens.shape == (3, 16, 32) and out.mask.shape == (3, 16) and out.mask.all()
    assert tower.preprocess_cfg == {"size": (32, 32)}  # a file's weights take any mean and std
    # Only the visual tower is kept.
    n_visual = sum(p.numel() for p in ref.visual.parameters())
    assert sum(p.numel() for p in tower.parameters()) == n_visual


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_onednn_towers_agree_with_open_clip(saved, name, monkeypatch):
    import encoders.linear

    monkeypatch.setattr(encoders.linear, "_MIN_MACS", 0)  # these towers' products are tiny: take oneDNN anyway
    ref = saved[name]["model"]
    image = build_encoder("open_clip_image", arch=name, pretrained=saved[name]["st"]).eval()
    text = build_encoder("open_clip_text", arch=name, pretrained=saved[name]["st"]).eval()
    assert any(isinstance(m, Linear) for m in image.modules()) and any(isinstance(m, Linear) for m in text.modules())
    images = torch.randn(3, 3, 32, 32)
    ids = open_clip.get_tokenizer(name)(["a red circle", "a much longer caption about a blue square"])
    with torch.no_grad(), onednn(True):
        torch.testing.assert_close(image(images).pooled, ref.encode_image(images), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(text(ids).pooled, ref.encode_text(ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_text_tower_equals_open_clip_encode_text(saved, name):
    ref = saved[name]["model"]
    tower = build_encoder("open_clip_text", arch=name, pretrained=saved[name]["pt"]).eval()
    ids = open_clip.get_tokenizer(name)(["a red circle", "a much longer caption about a blue square"])  # (2, 77)
    with torch.no_grad():
        expected = ref.encode_text(ids)
        full = tower(ids)
        short = tower(ids[:, :12], torch.arange(12)[None] <= ids[:, :12].argmax(-1, keepdim=True))
        garbage = tower(ids[:, :12].masked_fill(~short.mask, 5), short.mask)
    assert torch.equal(full.pooled, expected)
    assert full.tokens.shape == (2, 77, 32) and full.mask.sum(1).tolist() == [5, 10]  # sot + words + eot
    assert torch.equal(short.pooled, expected)  # padded to the context length like open_clip's tokenizer
    assert short.tokens.shape == (2, 12, 32)
    torch.testing.assert_close(short.tokens[short.mask], full.tokens[:, :12][short.mask])
    assert torch.equal(garbage.pooled, expected)  # masked positions are reset to the pad id
    assert not any(n.startswith("visual") for n, _ in tower.named_parameters())
    with pytest.raises(ValueError, match="context length 77"):
        tower(torch.zeros(1, 78, dtype=torch.long))


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_image_pooled_equals_encode_image_with_the_last_block_at_the_class_token(saved, name):
    ref = saved[name]["model"]
    tower = build_encoder("open_clip_image", arch=name, pretrained=saved[name]["st"]).eval()
    assert tower.class_token_last_block  # a class-token ViT: the pruned last block is what runs
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = ref.encode_image(images)
        pooled = tower.pooled(images)
        tower.visual.transformer.grad_checkpointing = True  # open_clip's own forward then, as is
        plain = tower.pooled(images)
        tower.visual.transformer.grad_checkpointing = False
    torch.testing.assert_close(pooled, expected, atol=1e-6, rtol=0)  # float rounding only
    assert torch.equal(plain, expected)
    with pytest.raises(ValueError, match="no mask"):
        tower.pooled(images, torch.ones(3, 16, dtype=torch.bool))


def test_image_pooled_of_an_average_pooling_vit_is_encode_image(tmp_path):
    """Every patch's output is pooled: nothing can be skipped, `pooled` is open_clip's forward."""
    cfg = TINY | {"vision_cfg": TINY["vision_cfg"] | {"pool_type": "avg"}}
    (tmp_path / "mmembed-test-avg.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / "mmembed-test-avg.json")
    torch.manual_seed(0)
    ref = open_clip.create_model("mmembed-test-avg").eval()
    torch.save(ref.state_dict(), tmp_path / "avg.pt")
    tower = build_encoder("open_clip_image", arch="mmembed-test-avg", pretrained=str(tmp_path / "avg.pt")).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert not tower.class_token_last_block
        assert torch.equal(tower.pooled(images), ref.encode_image(images))


def _positions_run(tower, fn) -> list[int]:
    """Sequence lengths the text transformer was run on while `fn()` ran."""
    seen = []
    hook = tower.transformer.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[1]))
    try:
        fn()
    finally:
        hook.remove()
    return seen


def test_text_pooled_runs_only_up_to_the_last_eot_and_equals_encode_text(saved):
    name = "mmembed-test-clip"
    ref = saved[name]["model"]
    tower = build_encoder("open_clip_text", arch=name, pretrained=saved[name]["pt"]).eval()
    ids = open_clip.get_tokenizer(name)(["a red circle", "a much longer caption about a blue square"])  # (2, 77)
    mask = torch.arange(12)[None] <= ids[:, :12].argmax(-1, keepdim=True)
    with torch.no_grad():
        expected = ref.encode_text(ids)
        assert tower.prefix_suffices
        out = {}
        assert _positions_run(tower, lambda: out.update(short=tower.pooled(ids[:, :12], mask))) == [10]  # sot+8+eot
        assert _positions_run(tower, lambda: out.update(full=tower.pooled(ids))) == [10]
        assert _positions_run(tower, lambda: tower(ids[:, :12], mask)) == [77]  # forward keeps open_clip's run
    for pooled in out.values():
        torch.testing.assert_close(pooled, expected, atol=1e-6, rtol=0)


def test_text_pooled_runs_the_whole_context_when_later_positions_matter(saved, tmp_path):
    """A text tower without a causal mask: every position can change the pooled token, so `pooled`
    runs all 77 and is open_clip's encode_text exactly; cutting it would change the vectors."""
    cfg = TINY | {"text_cfg": TINY["text_cfg"] | {"no_causal_mask": True}}
    (tmp_path / "mmembed-test-bidir.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / "mmembed-test-bidir.json")
    torch.manual_seed(0)
    ref = open_clip.create_model("mmembed-test-bidir").eval()
    torch.save(ref.state_dict(), tmp_path / "bidir.pt")
    tower = build_encoder("open_clip_text", arch="mmembed-test-bidir", pretrained=str(tmp_path / "bidir.pt")).eval()
    ids = open_clip.get_tokenizer("mmembed-test-bidir")(["a red circle", "a blue square on the left"])
    with torch.no_grad():
        assert not tower.prefix_suffices
        seen = _positions_run(tower, lambda: tower.pooled(ids[:, :8]))
        pooled, expected = tower.pooled(ids[:, :8]), ref.encode_text(ids)
        cut = tower._clip_forward(ids[:, :8])[0]  # what running only the caption's positions would give
    assert seen == [77] and torch.equal(pooled, expected)
    assert (cut - expected).abs().max() > 1e-3  # positive control: the pad positions do matter here


def test_customtext_pooled_equals_encode_text(saved):
    name = "mmembed-test-customtext"
    ref = saved[name]["model"]
    tower = build_encoder("open_clip_text", arch=name, pretrained=saved[name]["pt"]).eval()
    ids = open_clip.get_tokenizer(name)(["a red circle", "a much longer caption about a blue square"])
    with torch.no_grad():
        assert torch.equal(tower.pooled(ids[:, :12]), ref.encode_text(ids))


def _register(tmp_path, name: str, cfg: dict):
    """A random reference model of a tiny architecture, and its weights saved for our tower."""
    (tmp_path / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / f"{name}.json")
    torch.manual_seed(0)
    ref = open_clip.create_model(name).eval()
    for module in ref.modules():  # CoCa never initialises its text decoder's projection: torch.empty, NaN at
        if isinstance(module, open_clip.transformer.MultimodalTransformer):  # times, which loading refuses
            torch.nn.init.normal_(module.text_projection, std=module.width ** -0.5)
    torch.save(ref.state_dict(), tmp_path / f"{name}.pt")
    return ref, str(tmp_path / f"{name}.pt")


def test_a_siglip_text_tower_pads_as_its_tokenizer_does(tmp_path):
    """SigLIP's towers pool the last position, so the pad id decides the vector: its T5 vocabulary
    pads with </s> (1), as big_vision and its tokenizers do; SigLIP 2 (Gemma) and CLIP with 0."""
    text = {"context_length": 16, "vocab_size": 1000, "width": 64, "heads": 2, "layers": 2, "no_causal_mask": True,
            "pool_type": "last", "proj_bias": True, "hf_tokenizer_name": "timm/ViT-B-16-SigLIP"}
    cfg = TINY | {"custom_text": True, "text_cfg": text, "init_logit_bias": -10}
    ref, path = _register(tmp_path, "mmembed-test-siglip", cfg)
    tower = build_encoder("open_clip_text", arch="mmembed-test-siglip", pretrained=path).eval()
    assert tower.pad_id == 1
    ids = torch.tensor([[5, 9, 42, 1], [7, 8, 1, 0]])  # content, then </s>; the second row is shorter
    mask = torch.tensor([[True] * 4, [True, True, True, False]])
    padded = torch.full((2, 16), 1)
    padded[0, :4], padded[1, :3] = ids[0], ids[1, :3]  # what the tokenizer gives: </s> to the context
    with torch.no_grad():
        assert torch.equal(tower.pooled(ids, mask), ref.encode_text(padded))
    for name, pad in (("timm/ViT-B-16-SigLIP2", 0), ("timm/ViT-B-16-SigLIP-i18n-256", 1)):
        cfg2 = cfg | {"text_cfg": text | {"hf_tokenizer_name": name}}
        _, path2 = _register(tmp_path, f"mmembed-test-{pad}-{name[-4:]}", cfg2)
        assert build_encoder("open_clip_text", arch=f"mmembed-test-{pad}-{name[-4:]}", pretrained=path2).pad_id == pad


def test_coca_towers_return_open_clips_vectors(tmp_path):
    """CoCa's config asks its towers for their tokens (an attention pooler's, a cls token's): our
    towers read the pooled vector alone, which is `encode_image` / `encode_text`."""
    cfg = {"embed_dim": 32, "custom_text": True,
           "vision_cfg": TINY["vision_cfg"] | {"attentional_pool": True, "attn_pooler_heads": 2, "output_tokens": True},
           "text_cfg": TINY["text_cfg"] | {"context_length": 76, "embed_cls": True, "output_tokens": True},
           "multimodal_cfg": {"context_length": 76, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1,
                              "attn_pooler_heads": 2}}
    ref, path = _register(tmp_path, "mmembed-test-coca", cfg)
    image = build_encoder("open_clip_image", arch="mmembed-test-coca", pretrained=path).eval()
    text = build_encoder("open_clip_text", arch="mmembed-test-coca", pretrained=path).eval()
    pictures = torch.randn(2, 3, 32, 32)
    ids = open_clip.get_tokenizer("mmembed-test-coca")(["a red circle", "a blue square on the left"])
    with torch.no_grad():
        expected_image = ref.encode_image(pictures, normalize=False)  # CoCa normalises by default
        expected_text = ref.encode_text(ids, normalize=False)
        assert torch.equal(image.pooled(pictures), expected_image)
        assert torch.equal(image(pictures).pooled, expected_image)
        assert torch.allclose(text.pooled(ids), expected_text, atol=1e-6)
        assert torch.allclose(text(ids).pooled, expected_text, atol=1e-6)


def test_trained_weights_differ_from_random_init(saved):
    """The round trip above is only meaningful if a fresh random tower differs."""
    torch.manual_seed(123)
    fresh = build_encoder("open_clip_image", arch="mmembed-test-clip").eval()
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert not torch.allclose(fresh(images).pooled, saved["mmembed-test-clip"]["model"].encode_image(images))


class _Payload:
    """Unpickling this calls open(marker, "w"): a file appears if the pickle runs code."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_malicious_pickle_is_refused_and_runs_nothing(saved, tmp_path, writer):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.bin"
    payload = {"visual.proj": _Payload(str(marker))}
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(WeightsFileError, match="refused or unreadable"):
        build_encoder("open_clip_image", arch="mmembed-test-clip", pretrained=str(path))
    with pytest.raises(WeightsFileError, match="refused or unreadable"):
        load_state_dict_file(path)
    assert not marker.exists()
    # Positive control: an unrestricted load does run the payload, so the check above can fail.
    if writer == "torch.save":
        torch.load(path, weights_only=False)
    else:
        pickle.loads(path.read_bytes())
    assert marker.exists()


def test_bad_names_and_tags_are_clear_errors(saved, tmp_path):
    with pytest.raises(ValueError, match="unknown open_clip architecture 'ViT-Q-99'.*ViT-B-32"):
        build_encoder("open_clip_text", arch="ViT-Q-99")
    with pytest.raises(ValueError, match="neither a weights file nor an open_clip tag"):
        build_encoder("open_clip_image", arch="mmembed-test-clip", pretrained="not-a-tag")
    with pytest.raises(WeightsFileError, match="not found"):
        build_encoder("open_clip_image", arch="mmembed-test-clip", pretrained=str(tmp_path / "missing.pt"))
    torch.save({"visual.positional_embedding": torch.zeros(7, 5)}, tmp_path / "odd.pt")  # open_clip's resize chokes
    with pytest.raises(WeightsFileError, match="not a CLIP state dict"):
        build_encoder("open_clip_image", arch="mmembed-test-clip", pretrained=str(tmp_path / "odd.pt"))
    torch.save({"visual.proj": torch.zeros(3)}, tmp_path / "partial.pt")
    with pytest.raises(WeightsFileError, match="missing"):
        build_encoder("open_clip_image", arch="mmembed-test-clip", pretrained=str(tmp_path / "partial.pt"))


@pytest.mark.parametrize("kind", ["open_clip_image", "open_clip_text"])
def test_grad_checkpointing_reaches_open_clip_towers(saved, kind):
    """`train.grad_checkpointing` switched our stacks only: an open_clip tower kept every block's
    activations (0 stacks switched). Now its transformer recomputes: the same gradients, less kept."""
    from encoders.blocks import set_grad_checkpointing

    name = "mmembed-test-clip"
    x = torch.randn(2, 3, 32, 32) if kind == "open_clip_image" else torch.randint(1, 400, (2, 12))

    def run(on: bool):
        tower = build_encoder(kind, arch=name, pretrained=saved[name]["st"]).train()
        assert set_grad_checkpointing(tower, on) >= 1
        kept = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t.numel()) or t, lambda t: t):
            y = tower.pooled(x)
        y.square().sum().backward()
        return [p.grad.clone() for p in tower.parameters() if p.grad is not None], sum(kept)

    plain, kept_plain = run(False)
    recomputed, kept_recomputed = run(True)
    for a, b in zip(recomputed, plain):  # (the image tower's pooled path then runs its last block whole)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert len(recomputed) == len(plain) and kept_recomputed < 0.6 * kept_plain



def test_a_local_dir_architecture_that_is_not_there_is_a_value_error(tmp_path):
    """open_clip opens local-dir:/hf-hub: configs itself: a missing one was a FileNotFoundError
    traceback through build_space, which turns ValueErrors into one config line."""
    with pytest.raises(ValueError, match="unknown open_clip architecture 'local-dir:"):
        build_encoder("open_clip_image", arch=f"local-dir:{tmp_path / 'nope'}")


def test_a_weights_file_under_a_name_of_undecodable_bytes_loads(tmp_path):
    """safetensors opens UTF-8 names only: a weights file in a folder named with undecodable bytes
    was "refused or unreadable" though it was neither."""
    import os

    from safetensors.torch import save_file

    path = tmp_path / os.fsdecode(b"w\xff") / "tower.safetensors"
    path.parent.mkdir()
    save_file({"proj": torch.arange(4.0)}, str(tmp_path / "plain.safetensors"))
    path.write_bytes((tmp_path / "plain.safetensors").read_bytes())
    assert torch.equal(load_state_dict_file(path)["proj"], torch.arange(4.0))


def test_pretrained_none_on_a_local_dir_holding_weights_starts_random(tmp_path):
    """pretrained=None on a local-dir: folder loaded the folder's weights (the docstring promises random init)."""
    from safetensors.torch import save_file

    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY}))
    torch.manual_seed(0)
    ref = open_clip.create_model(f"local-dir:{tmp_path}")
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "open_clip_model.safetensors"))
    torch.manual_seed(1)
    tower = build_encoder("open_clip_image", arch=f"local-dir:{tmp_path}", pretrained=None)
    assert not torch.equal(tower.visual.proj, ref.visual.proj)


def test_a_pickle_keyed_by_a_non_string_is_a_weights_file_error(saved, tmp_path):
    """A .pt file with an int key raised AttributeError ('int' object has no attribute 'startswith')."""
    state = torch.load(saved["mmembed-test-clip"]["pt"], weights_only=True)
    torch.save({0: torch.zeros(1), **state}, tmp_path / "intkey.pt")
    with pytest.raises(WeightsFileError, match="tensor key 0 is not a name"):
        load_state_dict_file(tmp_path / "intkey.pt")


@pytest.mark.parametrize("spoil, match", [
    (lambda t: t.long(), "visual.proj holds torch.int64 values"),  # load_state_dict cast them to float
    (lambda t: t > 0, "visual.proj holds torch.bool values"),
    (lambda t: t.index_fill(0, torch.tensor([0]), float("nan")), "visual.proj holds NaN or infinite values"),
])
def test_a_weights_file_of_integer_or_nan_values_is_refused(saved, tmp_path, spoil, match):
    """Integer, bool and NaN tensors of the right shape loaded silently (cast, or as NaN)."""
    state = torch.load(saved["mmembed-test-clip"]["pt"], weights_only=True)
    state["visual.proj"] = spoil(state["visual.proj"])
    torch.save(state, tmp_path / "spoilt.pt")
    with pytest.raises(WeightsFileError, match=match):
        build_encoder("open_clip_image", arch="mmembed-test-clip", pretrained=str(tmp_path / "spoilt.pt"))


def test_weights_of_another_architecture_name_both_widths(saved, tmp_path):
    """A file whose text tower is narrower (another architecture's) crashed in open_clip's resize
    with a bare AssertionError ('text pos_embed width changed!'), no file named."""
    narrow = TINY | {"text_cfg": TINY["text_cfg"] | {"width": 32}}
    (tmp_path / "mmembed-test-narrow-text.json").write_text(json.dumps(narrow))
    open_clip.add_model_config(tmp_path / "mmembed-test-narrow-text.json")
    other = open_clip.create_model("mmembed-test-narrow-text")
    torch.save(other.state_dict(), tmp_path / "narrow.pt")
    for kind in ("open_clip_image", "open_clip_text"):
        with pytest.raises(WeightsFileError, match=r"narrow\.pt: not a CLIP state dict .*\(positional_embedding "
                                                   r"is 32 wide, this architecture's is 64"):
            build_encoder(kind, arch="mmembed-test-clip", pretrained=str(tmp_path / "narrow.pt"))
