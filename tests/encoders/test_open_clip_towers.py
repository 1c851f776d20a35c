"""open_clip towers: local weights round trip equals open_clip exactly; unsafe pickles are refused."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

open_clip = pytest.importorskip("open_clip")

from encoders import WeightsFileError, build_encoder, load_state_dict_file  # noqa: E402

TINY = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
# CLIP keeps the text tower on the model itself; CustomTextCLIP keeps it in `model.text`.
ARCHS = {"mmembed-test-clip": TINY, "mmembed-test-customtext": TINY | {"custom_text": True}}


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
    assert tower.preprocess_cfg["size"] == (32, 32) and len(tower.preprocess_cfg["mean"]) == 3
    # Only the visual tower is kept.
    n_visual = sum(p.numel() for p in ref.visual.parameters())
    assert sum(p.numel() for p in tower.parameters()) == n_visual


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
